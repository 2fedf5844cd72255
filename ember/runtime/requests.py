"""Request records: sampling parameters, token events, completions, and the streaming handle.

A ``RequestHandle`` is filled by the engine's loop thread and read by the caller, from any
thread (iterator) or an asyncio loop (async iterator). The handle owns its event queue.
"""
from __future__ import annotations

import asyncio
import enum
import math
import numbers
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ember.errors import InputError
from ember.runtime.text_input import check_text


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling parameters. Every value the checks accept samples safely:
    ``temperature`` finite >= 0 (0, or one so small the softmax collapses, is greedy),
    ``top_p`` in (0, 1], ``top_k`` >= 0 (0 = off), ``max_new_tokens`` >= 1, ``seed`` an
    integer >= 0 or None, ``stop`` non-empty strings of valid Unicode."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (_is_real(self.temperature) and _is_finite(self.temperature) and self.temperature >= 0,
             "temperature", "a finite number >= 0 (0 = greedy)"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (self.seed is None or (_is_int(self.seed) and self.seed >= 0), "seed", "a non-negative integer or None"),
            (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "a string or a list of non-empty strings"),
            (isinstance(self.ignore_eos, (bool, np.bool_)), "ignore_eos", "true or false"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise InputError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: it must be {want}")
        for i, s in enumerate(self.stop):
            check_text(s, f"sampling parameter stop[{i}]")
        for name, kind in (("max_new_tokens", int), ("top_k", int), ("temperature", float), ("top_p", float),
                           ("ignore_eos", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # decoded text delta ("" while a UTF-8 character is incomplete)
    index: int  # 0-based index among the generated tokens


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    error: str | None
    submitted_at: float
    first_token_at: float | None
    finished_at: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def e2e(self) -> float:
        return self.finished_at - self.submitted_at


_DONE = object()


class RequestHandle:
    """Streams a request's tokens; ends with a finish reason. Thread-safe; one reader."""

    def __init__(self, request_id: str, prompt_tokens: int, cancel_fn: Callable[["RequestHandle"], None]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.perf_counter()
        self._cancel_fn = cancel_fn
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._completion: Completion | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    # -- engine side ---------------------------------------------------------------------
    def _push(self, ev: TokenEvent) -> None:
        self._events.put(ev)
        self._wake_async()

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._events.put(_DONE)
        self._finished.set()
        self._wake_async()

    def _wake_async(self) -> None:
        # Fast path, no lock: an async reader registers before it looks at the queue, so one
        # that registers after this check finds the event already queued.
        if not self._async_waiters:
            return
        with self._lock:
            waiters = list(self._async_waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass

    # -- caller side ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._completion.finish_reason if self._completion else None

    def cancel(self) -> None:
        """Ask the engine to stop this request; its memory is reclaimed at the next iteration."""
        if not self.done:
            self._cancel_fn(self)

    def result(self, timeout: float | None = None) -> Completion:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._completion is not None
        return self._completion

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._events.get()
            if ev is _DONE:
                return
            yield ev

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._lock:
            self._async_waiters.append((loop, wake))
        try:
            while True:
                try:
                    ev = self._events.get_nowait()
                except queue.Empty:
                    wake.clear()
                    if self._events.empty():
                        await wake.wait()
                    continue
                if ev is _DONE:
                    return
                yield ev
        finally:
            with self._lock:
                self._async_waiters.remove((loop, wake))
