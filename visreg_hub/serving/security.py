"""API keys (stored as sha256 digests, compared in constant time), the request-body size limit and the
request-body deadline."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterable
from pathlib import Path

from starlette.exceptions import HTTPException

from visreg_hub.errors import ConfigError
from visreg_hub.serving.schemas import error_body


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key (what the server keeps; never the key itself)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_api_keys(path: str | Path) -> frozenset[str]:
    """Read an API-key file: one entry per line, ``sha256:<64 hex>`` (preferred) or the raw key.

    Blank lines and ``#`` comments are skipped. Raw keys are hashed at once and not kept.

    Raises:
        ConfigError: the file is missing, unreadable or has no key.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --api-keys file {path}: {exc}") from exc
    digests = set()
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("sha256:"):
            digest = entry[len("sha256:") :].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{path}:{number}: 'sha256:' must be followed by 64 hex digits")
            digests.add(digest)
        else:
            digests.add(hash_key(entry))
    if not digests:
        raise ConfigError(f"--api-keys file {path} has no key; one key (or sha256:<hex>) per line")
    return frozenset(digests)


def key_matches(token: str, digests: Iterable[str]) -> bool:
    """True when ``token``'s digest is one of ``digests``; every digest is compared, in constant time."""
    candidate = hash_key(token).encode("ascii")
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest.encode("ascii"))
    return found


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body is larger than max_body_bytes={limit:,}; send fewer or smaller images"
        )
        self.limit = limit


DRAIN_FACTOR = 4  # a declared body up to this many times the limit is read and dropped before the 413


class BodyLimitMiddleware:
    """ASGI middleware: refuse a body above ``limit`` bytes from Content-Length, or while it streams in.

    A body is never buffered past the limit, whatever the client claims in its headers. A declared body
    up to :data:`DRAIN_FACTOR` times the limit is read and dropped (within ``drain_timeout_s``) before the
    413 goes out on a connection kept open. why: closing while the client still uploads resets the
    connection, and async HTTP clients (``openai.AsyncOpenAI``, ``httpx.AsyncClient``) then report a
    connection error, never the 413 naming the limit, and retry the whole upload. Larger claims, bodies
    that do not arrive in time, and clients waiting for ``100 Continue`` (curl's uploads over 1 MB) get
    the 413 on a closing connection, with nothing uploaded.
    """

    def __init__(self, app, limit: int, on_refuse=None, drain_timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = int(limit)
        self.on_refuse = on_refuse or (lambda: None)  # called once per refused request (metrics)
        self.drain_timeout_s = float(drain_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and (len(declared) > 20 or int(declared) > self.limit):
            self.on_refuse()
            # a client waiting for "100 Continue" has sent no body yet: reading one would invite it to
            # upload what is refused (uvicorn answers 100 on the first read), so it gets the 413 at once
            waiting = headers.get(b"expect", b"").lower() == b"100-continue"
            drainable = not waiting and len(declared) <= 20 and int(declared) <= DRAIN_FACTOR * self.limit
            drained = drainable and await self._drain(receive)
            message = BodyTooLargeError(self.limit).detail
            return await send_closing_error(send, 413, message, "max_body_bytes", close=not drained)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    self.on_refuse()
                    raise BodyTooLargeError(self.limit)  # the app's handler answers 413
            return message

        return await self.app(scope, limited_receive, send)

    async def _drain(self, receive) -> bool:
        """Read and drop the request body; True when all of it arrived within ``drain_timeout_s``."""
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return False  # the client left
                    if not message.get("more_body", False):
                        return True
        except TimeoutError:
            return False


async def send_closing_error(send, status: int, message: str, limit: str, *, close: bool = True) -> None:
    """Answer from raw ASGI with the API's JSON error for a refused ``limit``; with ``close`` (the rest of
    the request body is never read) the connection is closed after it."""
    body = json.dumps(error_body(message, status, limit)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


MIN_BODY_RATE = 64 * 1024  # bytes/s a body keeps arriving at to earn time beyond timeout_s (~0.5 Mbit/s)


class BodyDeadlineMiddleware:
    """ASGI middleware: the next part of a request body must arrive within ``timeout_s`` of the request's
    start plus the time the bytes received so far earn at :data:`MIN_BODY_RATE` (at most
    ``max_body_bytes`` of them), else 408. A 10 MB upload over a slow uplink (faster than 64 KiB/s on
    average) is not a slow client; one that sends nothing, or trickles, is cut off after about
    ``timeout_s`` whatever size it declares.

    For routes that read their bodies themselves (the demo's Gradio routes: uploads, queue joins); the
    API's own routes bound their reads in ``request_body._receive`` and are left to it (``skip_prefixes``).
    A client trickling a body a byte a second would otherwise hold a connection and a coroutine for as
    long as it likes.

    At the deadline the 408 is sent from here and the app's ``receive`` reports a disconnect, so the app
    stops as it does for a client that left; whatever it then tries to send is dropped. why not an
    exception: a mounted app (Gradio) answers any exception with its own 500 before it gets here.
    """

    def __init__(
        self, app, timeout_s: float, max_body_bytes: int, skip_prefixes: tuple[str, ...] = (), on_timeout=None
    ) -> None:
        self.app = app
        self.timeout_s = float(timeout_s)
        self.max_body_bytes = int(max_body_bytes)
        self.skip_prefixes = skip_prefixes
        self.on_timeout = on_timeout or (lambda: None)  # called once per request answered 408 (metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith(self.skip_prefixes):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start, received = loop.time(), 0
        body_done = started = timed_out = False

        async def timed_receive():
            nonlocal body_done, timed_out, received
            if body_done:  # after the body: only the disconnect is left to wait for, as long as it takes
                return await receive()
            # why per part, from the bytes received: time granted up front for a declared size let a client
            # that declared 10 MB and sent nothing hold the connection for timeout_s + 160 s
            deadline = start + self.timeout_s + min(received, self.max_body_bytes) / MIN_BODY_RATE
            try:  # (a small floor: a body already here is taken even when the app asks after the deadline)
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.05))
            except TimeoutError:
                body_done = timed_out = True
                if not started:
                    self.on_timeout()
                    message = f"the request body did not arrive within request_timeout_s={self.timeout_s:g}"
                    await send_closing_error(send, 408, message, "request_timeout_s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message):
            nonlocal started
            if timed_out:  # answered already: what the app says about the "disconnect" goes nowhere
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, timed_receive, tracked_send)
