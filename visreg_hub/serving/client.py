"""``visreg_hub.Client``: the HTTP API with the local API's shape (standard library HTTP only).

Moving from a local model to the service is one line::

    model = visreg_hub.from_pretrained("vit-mini-p7-fmnist")      # local
    model = visreg_hub.Client("http://127.0.0.1:8000")            # the same calls, on the server
    embeddings = model.encode(["a.png", "b.jpg"])                  # (2, E) float32 tensor

Inputs are what ``encode()`` takes (paths, folders, bytes, PIL images, arrays, tensors). Files and bytes
are sent as they are; in-memory images are decoded here with the library's rules and sent as lossless
PNG, so the server computes the same embeddings as a local ``encode()`` of the same model.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from visreg_hub.errors import ImageDecodeError, UserInputError, VisregHubError


class ServerError(VisregHubError, RuntimeError):
    """The server answered with an error; ``status`` is the HTTP status, the message is the server's.

    ``code`` is the error's code (``"no_input_embedded"`` when no image of a request could be decoded,
    ``"item_not_found"``, ...) and ``item_errors`` the per-input messages that come with it (input index ->
    message). ``added_ids``: for :meth:`Client.add` split into several requests, the ids of the items the
    requests before the failed one added (durably), in input order; empty otherwise.
    """

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: float | None = None,
        *,
        code: str | None = None,
        item_errors: dict[int, str] | None = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after
        self.code = code
        self.item_errors = item_errors or {}
        self.added_ids = np.zeros(0, dtype=np.int64)


class Client:
    """Talk to a ``visreg-hub serve`` server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        model: the served model to use (None: the server's default).
        timeout: seconds per HTTP request.
        retries: how often a 429 (server busy) is retried after its ``Retry-After``.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UserInputError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.retries = int(retries)

    def __repr__(self) -> str:
        return f"Client({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; returns the decoded JSON answer.

        Raises:
            ServerError: an HTTP error status (after ``retries`` retries of 429).
            ConnectionError: the server cannot be reached.
        """
        data = None if body is None else json.dumps(body, default=_json_default).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                error = _server_error(exc)
                if exc.code == 429 and attempt < self.retries:
                    time.sleep(min(error.retry_after or 1.0, 30.0))
                    continue
                raise error from None
            except urllib.error.URLError as exc:
                raise ConnectionError(f"cannot reach {self.url}: {exc.reason}") from None
            except (TimeoutError, http.client.HTTPException, ConnectionResetError) as exc:  # after connecting
                what = "timed out" if isinstance(exc, TimeoutError) else f"dropped the connection ({exc!r})"
                raise ConnectionError(f"{self.url}{path}: the server {what}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ local-API mirror
    def encode(
        self,
        images: Any,
        *,
        batch_size: int = 64,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool | None = None,
        normalize: bool | None = None,
        precision: str = "float32",
        calibration_embeddings: Any = None,
        show_progress_bar: bool | None = None,
        on_error: str = "raise",
        truncate_dim: int | None = None,
    ):
        """Embed images on the server, like ``model.encode(images)`` (the served pooling, L2-normalised).

        Args:
            images: one input or a list (see :func:`visreg_hub.inference.encode`).
            batch_size: images per HTTP request (at most the server's ``max_items``).
            convert_to_numpy: return a numpy array instead of a torch tensor.
            convert_to_tensor: return a tensor (the default; wins over ``convert_to_numpy``, as in
                sentence-transformers).
            normalize_embeddings, normalize: True or None only: the server returns L2-normalised
                embeddings (un-normalised features need a local ``from_pretrained``).
            precision, calibration_embeddings: quantise the returned embeddings as ``encode`` does
                (``"int8"``, ``"uint8"``, ``"binary"``, ``"ubinary"``; here, after the float32 answer).
            show_progress_bar: a bar over the images sent; None shows it when stderr is a terminal.
            on_error: ``"raise"`` (first bad image raises :class:`ImageDecodeError`) or ``"skip"``
                (returns ``EncodeResult(embeddings, failures)`` as ``encode`` does).
            truncate_dim: keep the first ``truncate_dim`` dimensions, re-normalised, as ``encode`` does
                (sent as the API's ``dimensions``).

        Returns:
            float32 embeddings as ``encode`` returns them: ``(N, E)`` for a list (``E`` the model's
            width, or ``truncate_dim``), ``(E,)`` for a single image, or the ``precision``'s dtype and
            width; with ``on_error="skip"`` an ``EncodeResult`` whose ``embeddings`` are ``(N', E)`` for
            the ``N'`` images embedded.
        """
        import sys

        import torch
        from tqdm.auto import tqdm

        from visreg_hub.inference import EncodeFailure, EncodeResult
        from visreg_hub.inference.inputs import expand_inputs, is_single_image
        from visreg_hub.inference.pipeline import check_batch_size
        from visreg_hub.inference.quantize import EMBEDDING_PRECISIONS, quantize_embeddings

        if on_error not in ("raise", "skip"):
            raise UserInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        for name, value in (("normalize_embeddings", normalize_embeddings), ("normalize", normalize)):
            if value is not None and value is not True:
                raise UserInputError(
                    f"{name}={value!r}: the server returns L2-normalised embeddings only; for raw features "
                    "load the model locally (visreg_hub.from_pretrained(...).encode(..., normalize=False))"
                )
        if precision not in EMBEDDING_PRECISIONS:
            raise UserInputError(f"precision must be one of {EMBEDDING_PRECISIONS}, got {precision!r}")
        batch_size = check_batch_size(batch_size)
        sources = expand_inputs(images)
        rows: dict[int, np.ndarray] = {}
        failures: list[EncodeFailure] = []
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty()
        bar = tqdm(total=len(sources), desc="encode (server)", unit="img", disable=not show_progress_bar)
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            payloads, local_errors = [], {}
            for offset, source in enumerate(chunk):
                try:
                    payloads.append(_payload(source))
                except ImageDecodeError as exc:
                    local_errors[start + offset] = str(exc)
                    payloads.append(None)
            sent = [(start + o, p) for o, p in enumerate(payloads) if p is not None]
            server_errors: dict[int, str] = {}
            if sent:
                # "skip" whatever the server's default: the failures are sorted out here, by input index
                body = {"input": [p for _, p in sent], "encoding_format": "base64", "on_error": "skip"}
                if self.model:
                    body["model"] = self.model
                if truncate_dim is not None:
                    body["dimensions"] = truncate_dim
                try:
                    answer = self.request("POST", "/v1/embeddings", body)
                except ServerError as exc:
                    if exc.code != "no_input_embedded":  # a request-level error, not the images'
                        raise
                    errors = exc.item_errors or dict.fromkeys(range(len(sent)), str(exc))
                    answer = {"data": [], "errors": [{"index": j, "message": m} for j, m in errors.items()]}
                for item in answer["data"]:
                    rows[sent[item["index"]][0]] = np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                for item in answer.get("errors", []):
                    server_errors[sent[item["index"]][0]] = item["message"]
            for index, message in sorted({**local_errors, **server_errors}.items()):
                label = chunk[index - start].label
                reason = message if message.startswith(label) else f"{label}: {message}"
                if on_error == "raise":
                    bar.close()
                    raise ImageDecodeError(
                        f"{reason} (input index {index}; pass on_error='skip' to embed the others)"
                    )
                failures.append(EncodeFailure(index, reason))
            bar.update(len(chunk))
        bar.close()
        ordered = [rows[i] for i in sorted(rows)]
        dim = ordered[0].shape[0] if ordered else (truncate_dim or self._dim())
        array = np.stack(ordered).astype(np.float32) if ordered else np.zeros((0, dim), np.float32)
        if precision != "float32":
            array = quantize_embeddings(array, precision, calibration_embeddings=calibration_embeddings)
        if on_error == "raise" and is_single_image(images):
            array = array[0]  # as encode(): a single image gives a 1-D vector
        embeddings = array if convert_to_numpy and not convert_to_tensor else torch.from_numpy(array)
        return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings

    def search(self, queries: Any, k: int = 10, *, index: str):
        """Nearest items of a server index, like ``EmbeddingIndex.search(queries, k)``.

        Args:
            queries: a (D,) or (Q, D) float array, tensor or list of vectors (as for
                ``EmbeddingIndex.search``), or an image (path, bytes, PIL, uint8 array) or a list of
                images, embedded on the server with the index's model.
            k: neighbours per query.
            index: the server index's name.

        Returns:
            ``SearchResult(scores (Q, k'), ids (Q, k'), metadata)``, ``k' = min(k, count)``; the last
            columns hold ``-1`` / ``-inf`` where a query found fewer hits.
        """
        from visreg_hub.inference.inputs import expand_inputs
        from visreg_hub.retrieval import SearchResult

        if _is_vectors(queries):
            vectors = np.asarray(queries, dtype=np.float32)
            vectors = vectors.reshape(-1, vectors.shape[-1])
            bodies = [{"index": index, "vector": v.tolist(), "k": k} for v in vectors]
        else:
            bodies = [{"index": index, "image": _payload(s), "k": k} for s in expand_inputs(queries)]
        answers = [self.request("POST", "/v1/search", body)["hits"] for body in bodies]
        width = max((len(hits) for hits in answers), default=0)
        ids = np.full((len(answers), width), -1, dtype=np.int64)
        scores = np.full((len(answers), width), -np.inf, dtype=np.float32)
        metadata: list[list[dict | None]] = []
        for row, hits in enumerate(answers):
            ids[row, : len(hits)] = [h["id"] for h in hits]
            scores[row, : len(hits)] = [h["score"] for h in hits]
            metadata.append([h.get("metadata") for h in hits] + [None] * (width - len(hits)))
        return SearchResult(scores=scores, ids=ids, metadata=metadata)

    def add(
        self,
        index: str,
        images: Any = None,
        *,
        vectors: Any = None,
        metadata: list | None = None,
        ids: list[int] | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Add images or vectors to a server index durably (answered after the server's fsync).

        Args:
            index: the server index's name.
            images: one image, a list or a folder, embedded on the server with the index's model.
            vectors: instead of images, ``(N, D)`` float vectors of the index's width.
            metadata: one JSON object (or None) per item.
            ids: one int64 id per item (default: the index assigns them).
            batch_size: items per HTTP request (at most the server's ``max_items``); each request is
                added as a whole or not at all.

        Returns:
            ``(N,)`` int64: the items' ids.

        Raises:
            ServerError: a request was refused; the items of the requests before it stay added, and
                the error's ``added_ids`` lists their ids (in input order).
        """
        from visreg_hub.inference.inputs import expand_inputs
        from visreg_hub.inference.pipeline import check_batch_size

        batch_size = check_batch_size(batch_size)
        if vectors is not None:
            items: list = np.asarray(vectors, dtype=np.float32).tolist()
        else:
            items = expand_inputs(images)
        for name, values in (("metadata", metadata), ("ids", ids)):
            if values is not None and len(values) != len(items):
                raise UserInputError(
                    f"{name} has {len(values)} entries for {len(items)} items; give one each"
                )
        added: list[np.ndarray] = []
        path = f"/v1/indexes/{_segment(index)}/items"
        for start in range(0, len(items), batch_size):
            part = slice(start, start + batch_size)
            body: dict[str, Any] = {
                "metadata": None if metadata is None else list(metadata[part]),
                "ids": None if ids is None else list(ids[part]),
            }
            if vectors is not None:
                body["vectors"] = items[part]
            else:  # read and encoded one request at a time: a large folder is never all in memory
                body["images"] = [_payload(s) for s in items[part]]
            try:
                answer = self.request("POST", path, body)
            except ServerError as exc:
                exc.added_ids = np.concatenate(added) if added else np.zeros(0, dtype=np.int64)
                raise
            added.append(np.asarray(answer["ids"], dtype=np.int64))
        return np.concatenate(added) if added else np.zeros(0, dtype=np.int64)

    def remove(self, index: str, item_id: int) -> bool:
        """Remove one item; False when the index has no such id."""
        try:
            self.request("DELETE", f"/v1/indexes/{_segment(index)}/items/{int(item_id)}")
        except ServerError as exc:
            # the code since 0.2.5; the message for servers before it
            if exc.status == 404 and (exc.code == "item_not_found" or "has no item" in str(exc)):
                return False
            raise
        return True

    def metadata(self, index: str, item_id: int) -> dict[str, Any] | None:
        """The metadata stored with one item (None when it was added without); raises
        :class:`ServerError` (404) when the index has no such id."""
        return self.request("GET", f"/v1/indexes/{_segment(index)}/items/{int(item_id)}")["metadata"]

    def index_info(self, index: str) -> dict[str, Any]:
        """One served index: name, count, dim, model, metric, kind, normalize, snapshot/write errors."""
        return self.request("GET", f"/v1/indexes/{_segment(index)}")

    def indexes(self) -> list[dict[str, Any]]:
        """The served indexes: name, count, dim, model, metric, kind, ... (as :meth:`index_info` gives)."""
        return self.request("GET", "/v1/indexes")["data"]

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models")["data"]

    def _dim(self) -> int:
        models = {m["id"]: m for m in self.models()}
        return int(
            models[self.model]["embedding_dim"]
            if self.model
            else next(iter(models.values()))["embedding_dim"]
        )


def _segment(name: str) -> str:
    """An index name as one URL path segment: percent-encoded UTF-8 (``café``, ``a/b``, ``a b``)."""
    return urllib.parse.quote(str(name), safe="")


def _is_vectors(queries: Any) -> bool:
    """Float arrays/tensors of 1 or 2 dimensions and lists of numbers are query vectors; the rest images."""
    if isinstance(queries, np.ndarray):
        return queries.dtype.kind == "f" and queries.ndim in (1, 2)
    if type(queries).__module__.startswith("torch") and hasattr(queries, "is_floating_point"):
        return bool(queries.is_floating_point()) and queries.ndim in (1, 2)
    if not isinstance(queries, list) or not queries or isinstance(queries[0], bool):
        return False
    # a list of numbers (ints too: [1, 0, ...]) or of number lists; images never come as bare numbers
    return isinstance(queries[0], (int, float, np.number, list, tuple))


def _payload(source) -> str:
    """An ImageSource -> base64 of bytes the server decodes to the same RGB pixels as a local decode."""
    from pathlib import Path

    from visreg_hub.inference.images import decode_image

    if source.error is None and isinstance(source.payload, Path):
        try:
            return base64.b64encode(source.payload.read_bytes()).decode("ascii")
        except OSError as exc:
            raise ImageDecodeError(f"{source.label}: file cannot be read ({exc})") from None
    if source.error is None and isinstance(source.payload, bytes):
        return base64.b64encode(source.payload).decode("ascii")
    image = decode_image(source, max_pixels=None)  # the caller's own memory: no bomb to guard against
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _server_error(exc: urllib.error.HTTPError) -> ServerError:
    code, items = None, {}
    try:
        body = json.loads(exc.read())
        message, code = body["error"]["message"], body["error"].get("code")
        items = {int(e["index"]): str(e["message"]) for e in body.get("errors") or []}
    except Exception:  # why: a proxy or a non-JSON answer; keep the status
        message = exc.reason or "error"
    retry = exc.headers.get("Retry-After") if exc.headers else None
    return ServerError(
        exc.code,
        str(message),
        float(retry) if retry and retry.isdigit() else None,
        code=code,
        item_errors=items,
    )


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (ids from an array, np.int64 dims) as the JSON the local API accepts."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable; send numbers, strings or lists")
