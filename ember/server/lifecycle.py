"""The served engine's lifecycle: loading -> ready -> draining -> stopped (or failed).

The engine loads on a background thread so the HTTP port answers at once: ``/health`` says
503 "loading" until the engine is up, which is what load balancers and Kubernetes
readiness probes expect. ``EngineHolder`` owns the engine and closes it at shutdown.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ember.server.openai_schema import ApiError

log = logging.getLogger("ember.server")

LOADING, READY, FAILED, DRAINING, STOPPED = "loading", "ready", "failed", "draining", "stopped"


class EngineHolder:
    """Loads the engine with ``factory()`` on a thread; ``require()`` hands it to request handlers.

    ``on_failure(message)`` is called (from the loading thread) if loading raises, so the
    process can exit instead of serving 503 forever.
    """

    def __init__(self, factory: Callable[[], Any], on_failure: Callable[[str], None] | None = None):
        self._factory = factory
        self._on_failure = on_failure
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.engine: Any = None
        self.state = LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.loaded_at: float | None = None  # time.time()

    @property
    def kind(self) -> str:
        """"decoder" (has ``submit``) or "diffusion"; "" until loaded."""
        if self.engine is None:
            return ""
        return "decoder" if hasattr(self.engine, "submit") else "diffusion"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._load, name="ember-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            engine = self._factory()
        except Exception as e:  # noqa: BLE001 - any load failure must reach /health and the log
            msg = f"{type(e).__name__}: {e}"
            log.error("engine failed to load: %s", msg)
            with self._lock:
                self.state, self.error = FAILED, msg
            if self._on_failure:
                self._on_failure(msg)
            return
        with self._lock:
            self.engine = engine
            self.load_seconds = time.perf_counter() - t0
            self.loaded_at = time.time()
            if self.state == LOADING:
                self.state = READY
        log.info("engine ready in %.1f s", self.load_seconds)

    def begin_drain(self) -> None:
        """Stop taking new requests; in-flight ones continue (the server enforces the deadline)."""
        with self._lock:
            if self.state in (LOADING, READY):
                self.state = DRAINING

    def require(self) -> Any:
        """The engine, or a 503 ApiError explaining why there is none to use now."""
        state = self.state
        if state == READY:
            return self.engine
        if state == LOADING:
            raise ApiError(503, "the engine is still loading; retry shortly", type="service_unavailable",
                           headers={"Retry-After": "1"})
        if state == FAILED:
            raise ApiError(503, f"the engine failed to load: {self.error}", type="service_unavailable")
        raise ApiError(503, "the server is shutting down and takes no new requests", type="service_unavailable")

    def close(self, join_timeout_s: float = 60.0) -> None:
        """Close the engine (waiting for a load in progress first); idempotent."""
        if self._thread is not None:
            self._thread.join(join_timeout_s)
        with self._lock:
            engine, self.engine = self.engine, None
            if self.state != FAILED:
                self.state = STOPPED
        if engine is not None and hasattr(engine, "close"):
            engine.close()
