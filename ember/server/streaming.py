"""Waiting on a request while watching the client: disconnect cancels the request.

Both paths (a JSON answer, or server-sent events) race the engine against the ASGI
``http.disconnect`` message, so a client that goes away while its request is still queued
or generating cancels it at once (``handle.cancel()``; the engine frees its KV at the next
iteration) rather than when the next token fails to send.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ember.runtime.requests import Completion, RequestHandle
from ember.server.openai_schema import error_body

log = logging.getLogger("ember.server")


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def drain(handle: RequestHandle) -> Completion:
    """Consume the handle's events until it finishes; its ``Completion``."""
    async for _ in handle:
        pass
    return handle.result()


async def collect(handle: RequestHandle, receive: Receive) -> Completion | None:
    """The finished ``Completion``, or None if the client disconnected first (the request
    is then cancelled). Task cancellation (shutdown deadline) also cancels the request."""
    work = asyncio.ensure_future(drain(handle))
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        handle.cancel()
        return None
    finally:
        for t in (work, gone):
            t.cancel()
        if not handle.done:
            handle.cancel()


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (a JSON-able object or the literal "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """A ``text/event-stream`` response fed by ``events`` (bytes). If the client disconnects
    first, ``on_disconnect()`` runs; ``on_close()`` always runs at the end (also when the
    stream never started or its task was cancelled), then ``events`` is closed. If ``events``
    raises, the error is logged and the stream ends with an error event and ``[DONE]``, so
    the response stays well-formed and the connection can be reused."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None],
                 on_close: Callable[[], None] = lambda: None):
        # No super().__init__: a body-less Response would declare Content-Length: 0.
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_disconnect, self.on_close = on_disconnect, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception as e:  # noqa: BLE001 - a failing stream ends with an error event, not a reset
                log.exception("streaming response failed")
                error = error_body(f"internal server error: {type(e).__name__}: {e}", "server_error")
                await send({"type": "http.response.body", "body": sse(error) + sse("[DONE]"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        work = asyncio.ensure_future(pump())
        gone = asyncio.ensure_future(wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()  # re-raise a failure of the stream itself
            else:
                self.on_disconnect()
        finally:
            for t in (work, gone):
                t.cancel()
            self.on_close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
