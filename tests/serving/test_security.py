"""The raw-ASGI guards of visreg_hub.serving.security, driven directly (no server): their timing."""

from __future__ import annotations


def test_a_declared_body_size_earns_a_bounded_deadline():
    """The page routes' deadline allows a declared body 64 KiB/s on top of request_timeout_s; a client
    declaring a petabyte got a deadline of years (probe 14). The allowance stops at max_body_bytes."""
    import asyncio
    import time

    from visreg_hub.serving.security import MIN_BODY_RATE, BodyDeadlineMiddleware

    async def app(scope, receive, send):  # reads its body as Gradio's routes do
        while (await receive()).get("more_body", False):
            pass

    async def run(declared: int) -> tuple[int, float]:
        sent = []

        async def receive():  # a client that never sends another byte
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        middleware = BodyDeadlineMiddleware(app, timeout_s=0.2, max_body_bytes=MIN_BODY_RATE // 2)
        headers = [(b"content-length", str(declared).encode())]
        start = time.monotonic()
        await middleware({"type": "http", "path": "/gradio_api/upload", "headers": headers}, receive, send)
        return sent[0]["status"], time.monotonic() - start

    status, seconds = asyncio.run(run(10**15))
    assert status == 408 and 0.6 < seconds < 1.5  # 0.2 s + at most 0.5 s of allowance, not 10^10 s
    status, seconds = asyncio.run(run(100))
    assert status == 408 and seconds < 0.6
