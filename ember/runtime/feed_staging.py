"""One host-to-device copy per paged call (issue 19: the paged step's host work).

A paged call feeds four small integer arrays (``input_ids``, ``cumulative_sequence_length``,
``past_seqlens``, ``block_table``). Copying each from pageable numpy memory costs a driver
staging copy and an allocation apiece; ``FeedStaging`` packs them at aligned offsets into one
pinned host buffer and moves them with a single asynchronous copy into one device buffer, whose
typed views are what the session binds.

Two uses (``runtime/paged_graphs.PagedSession``): ``put`` lays the arrays out back to back
(a plain launch: any shapes, the buffer grown when a call needs more), ``put_fixed`` writes them
at offsets fixed once (the CUDA-graph buckets, decode and prefill: a captured graph reads the same
addresses at every replay). The host buffer is rewritten only once the previous copy out of it
has finished (an event), so a caller that launches ahead of the device never corrupts a copy in
flight.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ALIGN = 16  # bytes: every array starts on a multiple (int64 views need 8)

_TORCH_DTYPES = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32"}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(specs: dict[str, int]) -> tuple[dict[str, int], int]:
    """Byte offsets of arrays of ``specs`` (name -> bytes) laid out back to back, and the total."""
    offsets, at = {}, 0
    for name, nbytes in specs.items():
        offsets[name] = at
        at += _aligned(nbytes)
    return offsets, at


class FeedStaging:
    """A pinned host buffer and a device buffer of the same bytes, moved by one copy per call."""

    def __init__(self, torch, device, nbytes: int = 0):
        self.torch, self.device = torch, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host = self.dev = None
        self._event = None
        self._grow(max(nbytes, 4096))

    @property
    def nbytes(self) -> int:
        return int(self.dev.numel())

    def _grow(self, nbytes: int) -> None:
        torch = self.torch
        self._wait()
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _wait(self) -> None:
        """The previous copy out of the host buffer has landed."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def _write(self, arrays: dict[str, np.ndarray], offsets: dict[str, int]) -> int:
        self._wait()
        host = self.host.numpy()
        end = 0
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            at = offsets[name]
            host[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
            end = max(end, at + a.nbytes)
        return end

    def _copy(self, nbytes: int) -> None:
        self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=self.cuda)
        if self.cuda:
            self._event = self.torch.cuda.Event()
            self._event.record(self.torch.cuda.current_stream(self.device))

    def view(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        """The device buffer's bytes at ``offset`` as a tensor of ``dtype`` and ``shape``."""
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        t = self.dev[offset:offset + n].view(getattr(self.torch, _TORCH_DTYPES[np.dtype(dtype)]))
        return t.view(*shape)

    def put(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Device views of ``arrays`` (int32 / int64), moved by one copy on the current stream;
        valid until the next ``put``."""
        offsets, total = layout({n: a.nbytes for n, a in arrays.items()})
        if total > self.nbytes:
            self._grow(max(total, 2 * self.nbytes))
        self._copy(self._write(arrays, offsets))
        return {n: self.view(offsets[n], a.dtype, a.shape) for n, a in arrays.items()}

    def put_fixed(self, arrays: dict[str, np.ndarray], offsets: dict[str, int]) -> None:
        """Write ``arrays`` at ``offsets`` (a ``layout`` this buffer was sized for) and copy them in
        with one copy; the views the caller made of those offsets then hold them."""
        self._copy(self._write(arrays, offsets))
