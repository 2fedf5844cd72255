"""The HTTP/1.1 connection protocol: uvicorn's h11 protocol with two guards against idle clients.

uvicorn closes a keep-alive connection that idles between requests (``timeout_keep_alive``)
but has no timeout while a request's headers arrive, and its ``limit_concurrency`` answers
503 only once a request is read, so idle connections still hold a file descriptor each.
``GuardedH11Protocol`` adds:

- a **header timeout**: a connection must complete its request line and headers within
  ``header_timeout_s`` of opening (or of its first byte after a finished response), else it
  is closed. The body has its own deadline (``read_json``, ``--body-timeout``);
- a **connection limit**: a connection past ``max_connections`` open ones is answered 503
  (``Connection: close``) and closed at once, before it is read.

The server always uses h11 (not httptools, where installed), so these guards always apply.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ember.server")


def _too_many_connections(limit: int) -> bytes:
    body = json.dumps({"error": {"message": f"this server holds its limit of {limit} open connections "
                                            "(--max-connections); retry shortly or reuse a connection",
                                 "type": "service_unavailable", "param": None, "code": "too_many_connections"}})
    return (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n{body}").encode()


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with a header timeout and a connection limit (see the module docstring).
    Pass ``functools.partial(GuardedH11Protocol, header_timeout_s=..., max_connections=...)``
    as uvicorn's ``http`` option."""

    def __init__(self, *args: Any, header_timeout_s: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.max_connections = header_timeout_s, max_connections
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open, the limit is %d (--max-connections)",
                        len(self.connections) - 1, self.max_connections)
            transport.write(_too_many_connections(self.max_connections))
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers():
            if self._header_timer is None:  # the first bytes of a request on an idle keep-alive connection
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        """No request is being answered: the next bytes are (part of) a request line and headers."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.info("closed a connection whose request headers did not arrive within %g s (--header-timeout)",
                     self.header_timeout_s)
            self.transport.close()
