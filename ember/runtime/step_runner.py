"""The engine loop's runner: a ``StepPlan`` in, the batch tensors built and launched on the
executor, a typed ``InflightStep`` out. It changes no request state (the scheduler does:
``FusionScheduler.launched``) and decides no policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.runtime.executor_protocol import Executor, PagedExecutor, PendingStep
from ember.runtime.kv_blocks import BlockManager
from ember.runtime.scheduler import Sequence, StepPlan


@dataclass(frozen=True)
class LaunchedCall:
    """One executor call of a step: ``rows``, the sequences that get a token from it and their
    row in the call; ``sampled``, the rows whose logits come back (they sample rather than
    take the argmax); ``pending``, the call's result."""

    rows: list[tuple[Sequence, int]]
    sampled: list[int]
    pending: PendingStep


@dataclass(frozen=True)
class CallOutput:
    """A finished call: every row's greedy token (int64 [B]) and the sampled rows' logits."""

    rows: list[tuple[Sequence, int]]
    greedy: np.ndarray
    logits_of: dict[int, np.ndarray]  # row -> its logits [V], for the rows in ``sampled``


@dataclass(frozen=True)
class InflightStep:
    """A launched step: its plan and its calls (one per prefill group, then the fused decode)."""

    plan: StepPlan
    calls: list[LaunchedCall]

    @property
    def chain_source(self) -> PendingStep | None:
        """The pending call a chained step takes its ids from: this step's decode call (a
        continuation is the same decode rows again)."""
        return self.calls[-1].pending if self.calls else None

    def wait(self) -> list[CallOutput]:
        """Wait for every call's tokens (and sampled rows' logits)."""
        outputs = []
        for call in self.calls:
            greedy, logits = call.pending.result()
            outputs.append(CallOutput(call.rows, greedy, dict(zip(call.sampled, logits))))
        return outputs


def samples(s: Sequence) -> bool:
    """Whether ``s`` samples its tokens (temperature > 0) rather than taking the argmax."""
    return s.params.temperature > 0


def chunk_inputs(seqs: list[Sequence], lengths: list[int], chained: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[Sequence, int]], list[int]]:
    """A call's ids and positions for a chunk of new tokens per row (int64 [B, T], rows padded
    to the longest chunk; a decode row is a one-token chunk), the rows whose prompt (or
    recomputed sequence) ends in this chunk -- they yield their next token -- and which of
    those sample. Reads ``num_cached`` as planned. ``chained``: decode rows fed the token in
    flight (its id comes from the device: 0 here), every row yielding its next token."""
    b, t = len(seqs), max(lengths)
    ids = np.zeros((b, t), dtype=np.int64)
    pos = np.zeros((b, t), dtype=np.int64)
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        if not chained:
            ids[r, :n] = s.token_ids()[s.num_cached:s.num_cached + n]  # a recompute re-feeds generated tokens
        pos[r, :n] = np.arange(s.num_cached, s.num_cached + n)
    ending = [(s, r) for r, (s, n) in enumerate(zip(seqs, lengths)) if chained or s.num_cached + n == s.total_tokens]
    return ids, pos, ending, [r for s, r in ending if samples(s)]


class StepRunner:
    """Builds a plan's batch tensors and launches them on ``executor``."""

    def __init__(self, executor: Executor, longrope: bool = False):
        self.executor = executor
        self.longrope = longrope  # the step graph takes LongRoPE's per-row ``rope_long``

    def launch(self, plan: StepPlan, chain: PendingStep | None = None) -> InflightStep:
        """Queue the plan's calls: slot moves, the K/V drops of recomputed sequences (LongRoPE),
        one call per prefill group, one fused decode call (its ids taken on the device from
        ``chain``, a pending decode of the same rows, when given: ``FusionScheduler.continuation``).
        Reads ``num_cached`` as it was planned; the caller then tells the scheduler the plan was
        launched."""
        ex = self.executor
        if plan.moves:
            ex.move(plan.moves)
        for slot in plan.drop_kv:
            ex.release(slot)
        calls = [self._launch_prefill(g.start, g.seqs, g.lengths) for g in plan.prefill]
        if plan.decode_stop > plan.decode_start:
            calls.append(self._launch_decode(plan, chain))
        return InflightStep(plan, calls)

    def _launch_prefill(self, start: int, seqs: list[Sequence], lengths: list[int]) -> LaunchedCall:
        ids, pos, ending, sampled = chunk_inputs(seqs, lengths)
        pending = self.executor.launch_greedy(start, ids, pos, np.asarray(lengths, dtype=np.int64), sampled,
                                              **self._rope_long(seqs, start, len(seqs)))
        return LaunchedCall(ending, sampled, pending)

    def _launch_decode(self, plan: StepPlan, chain: PendingStep | None) -> LaunchedCall:
        start, b = plan.decode_start, plan.decode_stop - plan.decode_start
        ids = np.zeros((b, 1), dtype=np.int64)
        pos = np.zeros((b, 1), dtype=np.int64)
        new = np.zeros(b, dtype=np.int64)
        for s in plan.decode_seqs:
            r = s.slot - start
            ids[r, 0], pos[r, 0], new[r] = (0 if chain is not None else s.next_input()), s.num_cached, 1
        # every row's argmax in one pass (on the device for a GPU executor); full logits only
        # for the rows that sample
        sampled = [s.slot - start for s in plan.decode_seqs if samples(s)]
        pending = self.executor.launch_greedy(start, ids, pos, new, sampled, chain=chain,
                                              **self._rope_long(plan.decode_seqs, start, b))
        return LaunchedCall([(s, s.slot - start) for s in plan.decode_seqs], sampled, pending)

    def _rope_long(self, seqs: list[Sequence], start: int, rows: int) -> dict:
        """``{"rope_long": int64 [rows]}`` (1 = the slot's sequence takes LongRoPE's long factors;
        rows not in ``seqs`` are ignored by the step: 0) for a LongRoPE model, else nothing."""
        if not self.longrope:
            return {}
        long = np.zeros(rows, dtype=np.int64)
        for s in seqs:
            long[s.slot - start] = s.rope_long
        return {"rope_long": long}


class PagedStepRunner:
    """``StepRunner`` for a paged plan (``PagedScheduler``) on a ``PagedExecutor``: rows are the
    plan's sequences, their KV read and written through the block tables of ``blocks``."""

    def __init__(self, executor: PagedExecutor, blocks: BlockManager):
        self.executor, self.blocks = executor, blocks

    def launch(self, plan: StepPlan, chain: PendingStep | None = None) -> InflightStep:
        """Queue the plan's rows: one call for the prefill rows and one for the decode rows, or
        a single call for both when the executor declares ``mixed_steps``. A decode row is a
        one-token chunk of its sequence. ``chain`` (``PagedScheduler.continuation``: a pure-decode
        plan of the rows ``chain`` computes, in its order): the ids come from its argmax on the device."""
        if chain is not None and plan.prefill:
            raise ValueError("only a pure-decode paged step can be chained")
        groups = [(list(g.seqs), list(g.lengths)) for g in plan.prefill]
        if plan.decode_seqs:
            groups.append((list(plan.decode_seqs), [1] * len(plan.decode_seqs)))
        if self.executor.mixed_steps and len(groups) > 1:
            groups = [([s for seqs, _ in groups for s in seqs], [n for _, ns in groups for n in ns])]
        calls = []
        for seqs, lengths in groups:
            ids, pos, ending, sampled = chunk_inputs(seqs, lengths, chained=chain is not None)
            calls.append(LaunchedCall(ending, sampled, self._launch(seqs, ids, pos, lengths, sampled, chain)))
        return InflightStep(plan, calls)

    def _launch(self, seqs: list[Sequence], ids: np.ndarray, pos: np.ndarray, lengths: list[int],
                sampled: list[int], chain: PendingStep | None = None) -> PendingStep:
        tables = [self.blocks.table(s) for s in seqs]
        padded = np.full((len(seqs), max(map(len, tables))), -1, dtype=np.int32)  # -1: unmapped
        for r, t in enumerate(tables):
            padded[r, :len(t)] = t
        past = np.asarray([s.num_cached for s in seqs], dtype=np.int64)
        chained = {"chain": chain} if chain is not None else {}
        return self.executor.launch_paged(ids, pos, past, np.asarray(lengths, dtype=np.int64), padded, sampled,
                                          **chained)
