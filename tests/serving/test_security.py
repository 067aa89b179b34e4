"""The raw-ASGI guards of visreg_hub.serving.security, driven directly (no server): their timing."""

from __future__ import annotations


def test_only_the_bytes_that_arrive_earn_time_beyond_the_timeout():
    """The page routes' deadline: request_timeout_s, plus what the bytes received so far earn at 64 KiB/s.
    It was granted up front from the declared Content-Length: a client declaring a large body and sending
    nothing held the connection for timeout + size / 64 KiB/s (a petabyte: years, until capped)."""
    import asyncio
    import time

    from visreg_hub.serving.security import MIN_BODY_RATE, BodyDeadlineMiddleware

    async def app(scope, receive, send):  # reads its body as Gradio's routes do
        while (await receive()).get("more_body", False):
            pass

    async def run(declared: int, parts: list[tuple[float, int]]) -> tuple[int | None, float]:
        """A client sending ``parts`` (seconds to wait, bytes), then stalling; the 408's status or None."""
        sent, queue = [], list(parts)

        async def receive():
            if not queue:
                await asyncio.sleep(3600)  # stalls
            wait, size = queue.pop(0)
            await asyncio.sleep(wait)
            return {"type": "http.request", "body": b"x" * size, "more_body": bool(queue)}

        async def send(message):
            sent.append(message)

        middleware = BodyDeadlineMiddleware(app, timeout_s=0.3, max_body_bytes=10 * MIN_BODY_RATE)
        headers = [(b"content-length", str(declared).encode())]
        start = time.monotonic()
        await asyncio.wait_for(
            middleware({"type": "http", "path": "/gradio_api/upload", "headers": headers}, receive, send), 10
        )
        return (sent[0]["status"] if sent else None), time.monotonic() - start

    status, seconds = asyncio.run(run(10**15, []))  # declares a petabyte, sends nothing
    assert status == 408 and seconds < 0.8
    # a slow but steady upload (4 parts of 32 KiB, one every 0.25 s: 128 KiB/s) is never cut off, although
    # it takes longer than timeout_s
    size = MIN_BODY_RATE // 2
    status, seconds = asyncio.run(run(4 * size, [(0.25, size)] * 4))
    assert status is None and seconds > 0.9
    # a trickle (1 KiB every 0.2 s: 5 KiB/s) earns almost nothing and is cut off soon after timeout_s
    status, seconds = asyncio.run(run(10**6, [(0.2, 1024)] * 20 + [(0.2, 10**6 - 20 * 1024)]))
    assert status == 408 and seconds < 1.0
