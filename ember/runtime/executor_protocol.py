"""The interfaces the engine loop drives: ``Executor`` (one step over a slot range of the KV
pool, and the pool's bookkeeping) and ``PendingStep`` (a launched step's result), plus
``DeviceSession``, what ``cuda_session.DeviceExecutor`` needs from the step session it wraps.

Every capability is a declared member with an explicit value, never a probe: an executor
that cannot chain says ``supports_chaining = False``. Implementations: ``LocalExecutor``
(CPU, ``executor.py``), ``DeviceExecutor`` (ONNX Runtime CUDA and TensorRT sessions,
``cuda_session.py``), ``TPExecutor`` (tensor parallel, ``tp/executor.py``). ``PagedExecutor``:
the same step over a block pool instead of slots (``kv_layout="paged"``).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PendingStep(Protocol):
    """A launched step. ``result()`` waits for it and returns every row's greedy token (int64
    [B]) and the logits of the rows that sample (float32 [len(logit_rows), V])."""

    def result(self) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class Executor(Protocol):
    """Runs step-graph calls over slots [start, start+B) of its KV pool, which it owns.

    ``supports_chaining``: ``launch_greedy(chain=pending)`` accepts a pending step of the same
    rows and feeds its greedy tokens as this step's ids without the host reading them (the
    engine then launches a pure-decode step before recording the previous one's tokens).
    ``rope_long`` (int64 [B], 1 = LongRoPE's long factors) is passed to ``run`` and
    ``launch_greedy`` only for a LongRoPE model, whose executors (CPU, CUDA, TensorRT) take it;
    the others are never given it (tensor parallelism refuses LongRoPE at compile time)."""

    supports_chaining: bool

    def run(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """Run the rows with new tokens ``input_ids`` [B,T]; rows with ``new_lengths`` 0 are
        computed but keep no K/V. Returns the logits [B,V] float32 on the host."""
        ...

    def launch_greedy(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
                      logit_rows: Any = (), chain: PendingStep | None = None) -> PendingStep:
        """Start one step; its ``result()`` gives every row's argmax and the ``logit_rows``' logits.
        ``chain`` only where ``supports_chaining``."""
        ...

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Apply (src, dst) slot moves in order (compaction)."""
        ...

    def release(self, slot: int) -> None:
        """Free a finished sequence's slot."""
        ...

    def maybe_shrink(self) -> None:
        """Give pool memory back when the running sequences need less (called when idle)."""
        ...

    @property
    def used_tokens(self) -> int:
        """Tokens with K/V in the pool."""
        ...

    def stats(self) -> dict[str, Any]:
        """The executor's own gauges for ``engine.stats()`` (CUDA graphs, memory plan); may be empty."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class PagedExecutor(Protocol):
    """Runs step calls over paged KV (``kv_layout="paged"``, docs/kv.md): a pool of
    ``num_blocks`` blocks of ``block_size`` token positions per layer, which it owns; the
    ``PagedScheduler``'s block manager decides which blocks each sequence uses, so the
    executor keeps no per-sequence state. Implementations: ``HostPagedExecutor`` (CPU,
    ``paged_executor.py``); a CUDA one over ``com.microsoft.PagedAttention`` plugs in here.

    ``launch_paged``: rows are sequences. Row r has ``past_lengths[r]`` tokens with K/V in its
    blocks and ``new_lengths[r]`` new tokens ``input_ids[r, :n]`` at ``positions[r, :n]``
    (= past + 0..n-1); token i of the row lives in block ``block_tables[r, i // block_size]``
    at offset ``i % block_size``. Every table covers its row's past + new tokens and is
    padded with -1 (unmapped) past that, PagedAttention's ``block_table`` convention. The step writes the new tokens' K/V into their blocks and its
    ``result()`` gives every row's argmax and the ``logit_rows``' logits, as
    ``Executor.launch_greedy``. Blocks not named by a row's table are never written.

    ``mixed_steps``: True = prefill chunks and decode tokens come in one call (rows padded to
    the longest chunk on the host; an executor that packs rows by ``new_lengths``, as
    PagedAttention's variable-length input does, computes no padding); False = one call for
    the prefill rows and one for the decode rows (the host executor, whose step graph would
    compute every decode row padded to the chunk length)."""

    supports_chaining: bool
    mixed_steps: bool
    num_blocks: int
    block_size: int

    def launch_paged(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                     new_lengths: np.ndarray, block_tables: np.ndarray, logit_rows: Any = (),
                     chain: PendingStep | None = None) -> PendingStep:
        """input_ids/positions int64 [B,T]; past_lengths/new_lengths int64 [B] (new >= 1);
        block_tables int32 [B, M]. ``chain`` (only where ``supports_chaining``): a pending
        one-token-per-row call of the same B rows, whose argmax (on the device) are this call's
        ids, one per row; ``input_ids`` is then ignored."""
        ...

    def maybe_shrink(self) -> None:
        """Called when no sequence runs; may give memory back (a no-op is fine)."""
        ...

    def stats(self) -> dict[str, Any]:
        """As ``Executor.stats``."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class DeviceSession(Protocol):
    """A step session on a GPU (``CudaStepSession``, ``CudaDecodeSession``,
    ``TensorRTStepSession``) as ``DeviceExecutor`` drives it.

    ``supports_chaining``: ``run`` takes the ids as a device tensor and returns without waiting
    for the device; ``lock``: held around everything done on the device (shared by the sessions
    of one executor); ``cuda_graph_status``: ``"on"`` when one-token runs replay CUDA graphs
    (``forget_graphs`` drops them after the KV pool reallocates)."""

    supports_chaining: bool
    lock: Any
    cuda_graph_status: str

    def forget_graphs(self) -> None: ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` (an instance or a class) lacks; [] when it
    implements it. (``isinstance`` with a runtime-checkable protocol says only yes or no.)"""
    names = set(vars(protocol).get("__annotations__", {}))
    names |= {n for n, v in vars(protocol).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return sorted(n for n in names if not hasattr(obj, n))
