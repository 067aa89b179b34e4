"""The one embedding loop: decode -> preprocess -> batch -> backend forward (pooled) -> normalise.

``encode()``, ``extract_patch_features()``, :class:`~visreg_hub.inference.onnx.OnnxEmbedder`, the CLI,
the demo, ``training/evaluate.py`` and the HTTP service all embed through :class:`EmbeddingPipeline`.

Two entry points:

* :meth:`EmbeddingPipeline.run`: any number of inputs (paths, folders, bytes, PIL images, arrays,
  tensors, 4-D batches), decoded in DataLoader workers (``num_workers > 0``) or in-process, batched,
  embedded; the contract of ``encode()``.
* :meth:`EmbeddingPipeline.embed_batch`: one batch of items as a server's dynamic batcher holds them
  (encoded bytes or already decoded PIL images / arrays), decoded in this thread, embedded in one
  forward pass, per-item failures reported; and :meth:`EmbeddingPipeline.embed_pixels` for a batch that
  is already preprocessed to uint8 pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from visreg_hub.errors import ImageDecodeError, UserInputError
from visreg_hub.inference.backends import Backend
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS, ImageSource
from visreg_hub.inference.inputs import expand_inputs
from visreg_hub.inference.preprocess import Collate, ImageDataset

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_FLUSH_BYTES = 64 * 2**20


class EncodeFailure(NamedTuple):
    """An item that could not be embedded.

    Attributes:
        index: position in the expanded input list (see :func:`~visreg_hub.inference.inputs.expand_inputs`;
            the input position when no folder or 4-D batch was given).
        reason: the item's label (path or ``item K``) and what went wrong.
    """

    index: int
    reason: str


class EncodeResult(NamedTuple):
    """Return value of ``encode(..., on_error="skip")`` (and of ``extract_patch_features``).

    Attributes:
        embeddings: the good items' outputs, in input order: (N_good, E) for ``encode``,
            (N_good, h, w, D) for ``extract_patch_features``; a tensor, or a numpy array with
            ``convert_to_numpy=True``.
        failures: one :class:`EncodeFailure` per bad item, in input order.
    """

    embeddings: torch.Tensor | np.ndarray
    failures: list[EncodeFailure]


class BatchEmbeddings(NamedTuple):
    """What :meth:`EmbeddingPipeline.embed_batch` returns for one batch of B items.

    Attributes:
        embeddings: (B_good, *output_shape) float32 on the CPU, the good items in input order.
        indices: (B_good,) positions of those items in the batch.
        failures: one :class:`EncodeFailure` per bad item (its position in the batch and the reason).
    """

    embeddings: torch.Tensor
    indices: list[int]
    failures: list[EncodeFailure]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (numpy integers included, as sentence-transformers
    accepts them), else None; booleans are not integers here."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` as an int, or a ValueError naming it (``encode()``, ``Client.encode/add``)."""
    size = as_int(batch_size)
    if size is None or size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return size


def check_run_args(batch_size: Any, num_workers: Any, on_error: Any) -> tuple[int, int]:
    """``(batch_size, num_workers)`` as ints, or a ValueError naming the bad argument of ``encode()``."""
    size, workers = check_batch_size(batch_size), as_int(num_workers)
    if workers is None or workers < 0:
        raise UserInputError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if on_error not in ON_ERROR:
        raise UserInputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return size, workers


def prefetched(batches: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``batches`` in a background thread, up to ``depth`` items ahead, in order.

    The producer's exceptions are raised here; leaving the loop early (an exception in the consumer)
    stops the producer within one item.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put((done, exc))

    thread = threading.Thread(target=produce, name="visreg-decode", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item, error = items.get()
            if error is not None:
                finished = True  # the producer has returned after handing over its exception
                raise error
            if item is done:
                finished = True
                return
            yield item
    finally:
        stop.set()
        # why: a producer that handed over `done` is exiting and needs no unblocking; waiting on the empty
        # queue there cost up to 50 ms per call (measured: a 1-image encode() paid it most calls)
        while not finished and thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.05)
        thread.join()


def _worker_init(_worker_id: int) -> None:
    # why: PIL decoding is single-threaded; intra-op torch threads per worker would oversubscribe cores
    torch.set_num_threads(1)


class EmbeddingPipeline:
    """Decode, preprocess, batch, run a :class:`~visreg_hub.inference.backends.Backend`, normalise.

    Args:
        backend: what runs the model (torch or ONNX Runtime), with its transform and shapes.
        normalize: L2-normalise each output along its last axis.
        max_pixels: decompression-bomb cap per image (width * height); None disables it.
        truncate_dim: keep the first ``truncate_dim`` features of each output (before normalising).
        draft_decode: decode JPEGs far larger than the model's input at a reduced scale (faster, close
            to but not bit-identical with a full decode; see :mod:`visreg_hub.inference.images`).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        normalize: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        truncate_dim: int | None = None,
        draft_decode: bool = False,
    ) -> None:
        width = backend.output_shape[-1]
        if truncate_dim is not None:
            dims = as_int(truncate_dim)
            if dims is None or not 1 <= dims <= width:
                raise UserInputError(
                    f"truncate_dim must be an integer in [1, {width}] or None, got {truncate_dim!r}"
                )
            truncate_dim = dims
        if max_pixels is not None and (as_int(max_pixels) is None or as_int(max_pixels) < 1):
            raise UserInputError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
        if not isinstance(normalize, bool | np.bool_):  # why: "no" or 0.0 would be read as a truth value
            raise UserInputError(f"normalize must be True or False, got {normalize!r}")
        self.backend = backend
        self.normalize = normalize
        self.max_pixels = None if max_pixels is None else as_int(max_pixels)
        self.truncate_dim = truncate_dim
        self.draft_decode = bool(draft_decode)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one output item, e.g. (E,) (or (truncate_dim,))."""
        shape = tuple(self.backend.output_shape)
        return shape if self.truncate_dim is None else (*shape[:-1], self.truncate_dim)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, *output_shape) float32 on the backend's device; inside ``session()``."""
        outputs = self.backend.forward(pixels).float()
        if self.truncate_dim is not None:
            outputs = outputs[..., : self.truncate_dim]
        return nn.functional.normalize(outputs, dim=-1) if self.normalize else outputs

    def _dataset(self, sources: list[ImageSource]) -> ImageDataset:
        return ImageDataset(sources, self.backend.transform, self.max_pixels, self.draft_decode)

    # -------------------------------------------------------------------------- batch entry points
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """One forward pass on already preprocessed images.

        Args:
            pixels: (B, C, H, W) uint8, each image resized and cropped by ``backend.transform``.

        Returns:
            (B, *output_shape) float32 on the CPU.
        """
        if pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != tuple(self.backend.input_shape):
            raise UserInputError(
                f"pixels must be uint8 (B, {', '.join(map(str, self.backend.input_shape))}), got "
                f"{pixels.dtype} {tuple(pixels.shape)}; use embed_batch for images of any size"
            )
        if len(pixels) == 0:
            return torch.empty((0, *self.output_shape), dtype=torch.float32)
        with self.backend.session():
            return self._forward(pixels).cpu()

    def embed_batch(self, items: Sequence[Any]) -> BatchEmbeddings:
        """Decode and embed one batch in this thread: a server's dynamic batcher calls this.

        Args:
            items: B single images of any kind ``encode()`` takes (encoded bytes, PIL images, arrays,
                tensors, paths); a folder or a 4-D batch as one item is a failure of that item.

        Returns:
            :class:`BatchEmbeddings`: the good items' embeddings in one (B_good, E) tensor, their
            positions, and a failure per bad item. Never raises for a bad item.
        """
        sources = []
        for position, item in enumerate(items):
            expanded = expand_inputs([item])
            if len(expanded) != 1:
                reason = f"one image per item, got {len(expanded)} (a folder or a 4-D batch)"
                sources.append(ImageSource(None, f"item {position}", reason))
                continue
            label = expanded[0].label  # "item 0..." for in-memory items: renumber to the batch position
            if label.startswith("item 0"):
                label = f"item {position}{label[len('item 0') :]}"
            sources.append(dataclasses.replace(expanded[0], label=label))
        dataset = self._dataset(sources)
        pixels, indices, failures = [], [], []
        for position in range(len(sources)):
            decoded = dataset[position]
            if decoded.error is not None:
                failures.append(EncodeFailure(position, decoded.error))
            else:
                pixels.append(decoded.pixels)
                indices.append(position)
        stacked = (
            torch.stack(pixels) if pixels else torch.empty((0, *self.backend.input_shape), dtype=torch.uint8)
        )
        return BatchEmbeddings(self.embed_pixels(stacked), indices, failures)

    # ---------------------------------------------------------------------------------- the loop
    def run(
        self,
        images: Any,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        on_error: str = "raise",
        show_progress_bar: bool | None = None,
        desc: str = "encode",
        prefetch: bool = True,
    ) -> tuple[torch.Tensor, list[EncodeFailure]]:
        """Embed any number of inputs in order (the body of ``encode()``).

        Args:
            images: see :func:`visreg_hub.inference.encode`.
            batch_size: images per forward pass.
            num_workers: DataLoader worker processes for decoding; 0 decodes in this process.
            on_error: ``"raise"``: :class:`ImageDecodeError` at the first bad item; ``"skip"``: collect.
            show_progress_bar: None shows it only when stderr is a terminal.
            desc: progress bar label.
            prefetch: with ``num_workers=0``, decode the next batch in a thread while this one runs.

        Returns:
            ((N_good, *output_shape) float32 CPU tensor, failures in input order).
        """
        batch_size, num_workers = check_run_args(batch_size, num_workers, on_error)
        backend = self.backend
        sources = expand_inputs(images)
        loader = torch.utils.data.DataLoader(
            self._dataset(sources),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=Collate(backend.input_shape),
            pin_memory=backend.pin_memory,
            worker_init_fn=_worker_init if num_workers > 0 else None,
        )
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty()
        on_host = backend.device.type == "cpu"
        failures: list[EncodeFailure] = []
        outputs: list[torch.Tensor] = []  # on the CPU
        pending: list[torch.Tensor] = []  # on the device, not yet copied back

        def flush() -> None:
            if pending:
                outputs.append(torch.cat(pending).cpu())
                pending.clear()

        with (
            backend.session(),
            tqdm(total=len(sources), desc=desc, unit="img", disable=not show_progress_bar) as progress,
        ):
            # why: with num_workers=0 a thread decodes the next batch while this one runs; PIL's decode and
            # resize and the backends' forward release the GIL, so the two overlap where a core is free.
            # One batch has nothing to overlap with: starting the thread would only cost (ms on a busy CPU)
            threaded = num_workers == 0 and prefetch and len(sources) > batch_size
            for batch in prefetched(loader) if threaded else loader:
                if batch.failures and on_error == "raise":
                    index, reason = batch.failures[0]
                    raise ImageDecodeError(
                        f"{reason} (input index {index}; pass on_error='skip' to embed the others)"
                    )
                failures.extend(EncodeFailure(index, reason) for index, reason in batch.failures)
                if len(batch.indices):
                    pending.append(self._forward(batch.pixels))
                    # why: copying every batch back would make the host wait for the device each batch
                    # and stall kernel launches; a few dozen MiB of results per copy keeps the queue full
                    if on_host or sum(t.numel() for t in pending) * 4 >= _FLUSH_BYTES:
                        flush()
                progress.update(len(batch.indices) + len(batch.failures))
            flush()
        result = torch.cat(outputs) if outputs else torch.empty((0, *self.output_shape), dtype=torch.float32)
        if failures:
            logger.warning(
                "%d of %d images could not be decoded and were skipped; first: %s",
                len(failures), len(sources), failures[0].reason,
            )  # fmt: skip
        return result, failures
