"""Progress for long compile/benchmark work: numbered stages with elapsed time, on stderr."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class StageLog:
    """Prints ``[i/n] what ...`` then ``done (x.x s)``; silent when ``quiet``."""

    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.total, self.quiet, self.i = total, quiet, 0
        self.stream = stream or sys.stderr
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        self.i += 1
        t0 = time.perf_counter()
        if not self.quiet:
            print(f"[{self.i}/{self.total}] {what} ...", file=self.stream, flush=True)
        yield
        dt = time.perf_counter() - t0
        self.times[what] = round(dt, 3)
        if not self.quiet:
            print(f"      done ({dt:.1f} s)", file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(f"      {msg}", file=self.stream, flush=True)
