"""Waiting for a server process to come up (benchmarks and tests that start ``python -m ember.server``)."""
from __future__ import annotations

import time
from typing import Callable


class ServerNotReady(RuntimeError):
    """The server process exited, or /health did not answer 200 in time; the message says which."""


def wait_until_healthy(proc, url: str, timeout_s: float, poll_s: float = 0.05,
                       on_response: Callable | None = None) -> None:
    """Poll ``url + "/health"`` until it answers 200; ``on_response`` sees every other answer
    (e.g. 503 "loading"). Raises ``ServerNotReady`` when ``proc`` (a ``subprocess.Popen``) exits
    first or ``timeout_s`` passes; the caller decides what to do with the process."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServerNotReady(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return
            if on_response is not None:
                on_response(r)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServerNotReady(f"server not ready in {timeout_s:g} s")
        time.sleep(poll_s)
