"""The temporal fusion scheduler's policy (docs/design.md §4.2): admission, slots, chunked prefill,
compaction, chaining (``continuation``). It never touches an engine: ``schedule()`` returns a
plain ``StepPlan`` that the engine executes, so the policy is testable with a fake step function.
Every change of a request's state goes through it: admission and slots here, ``num_cached``
(``launched``), the phase and the generated tokens (``record_token``), ``cancel``, ``retire``.

Algorithm, once per iteration:
1. Free the slots of finished/cancelled sequences (``retire``, called by the engine).
2. Compact (``compaction="min-move"``, Flover's buffer reordering): the K live slots should
   form one contiguous range so one decode call covers them without computing dead rows.
   Slide a width-K window over the slot array, take the window holding the most live slots,
   and move each live slot outside it into a free position inside it -- the fewest moves.
   ``compaction="holes"`` leaves dead slots in place (they are computed but ignored).
3. Admit waiting sequences FIFO while a slot is free; new ones go next to the live range.
   Admission batching (``admit_batch`` > 1, the GPU default): while at least half the slots
   are decoding, hold admissions until ``admit_batch`` of them can go at once or the hold has
   lasted ``admit_wait`` iterations, so one prefill call serves several requests (a GPU
   prefill call costs ~3 decode steps whatever its size; one per admission made the fused
   scheduler lose to static batching at saturation). Below half, admit at once.
   The KV pool is ``max_batch`` rows of up to ``max_seq_len`` positions, so the memory
   budget is enforced per sequence at ``add``: reserved length (prompt + max_new_tokens)
   <= kv_capacity_tokens // max_batch.
4. LongRoPE (``rope_switch``, the model's original_max_position_embeddings; None for other
   models): a sequence is rotated with the long factors once its length (prompt + generated,
   counting the token its next step feeds) exceeds the switch, with the short ones before; the
   choice is per sequence and sticky (``Sequence.rope_long``). A sequence that crosses the switch
   with K/V already cached (rotated short) is recomputed, as transformers' Phi-3 ``generate``
   does: its K/V are dropped (``StepPlan.drop_kv``) and it goes back to prefill over its whole
   token sequence, prompt and generated tokens, in chunks as usual; the last chunk yields its
   next token. A prompt longer than the switch is long from its first chunk.
5. Give prefill chunks to prefilling sequences, FIFO, under ``prefill_chunk`` tokens.
6. Decode: one fused call over the slot range spanning every sequence in decode phase.
"""
from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.errors import InputError, OverloadedError
from ember.runtime.requests import SamplingParams


class Phase(enum.Enum):
    WAITING = 0
    PREFILL = 1
    DECODE = 2
    DONE = 3


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. ``num_cached`` tokens have K/V in the pool."""

    request_id: str
    prompt_ids: np.ndarray  # int64 [P]
    params: SamplingParams
    reserved: int  # max total tokens it may occupy (prompt + max_new_tokens, capped)
    payload: Any = None  # the engine's per-request state (handle, rng, detokenizer)
    slot: int | None = None
    num_cached: int = 0
    generated: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    cancelled: bool = False
    order: int = 0  # arrival order, set by the scheduler
    rope_long: bool = False  # LongRoPE: its tokens take the long factors (algorithm step 4)

    def __post_init__(self) -> None:
        assert self.prompt_ids.ndim == 1 and len(self.prompt_ids) >= 1, "a sequence needs a non-empty prompt"
        assert self.reserved >= len(self.prompt_ids)

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    def token_ids(self) -> np.ndarray:
        """Prompt then generated tokens, int64: what a prefill caches (the whole sequence when it
        is recomputed after crossing the LongRoPE switch)."""
        if not self.generated:
            return self.prompt_ids
        return np.concatenate([self.prompt_ids, np.asarray(self.generated, dtype=np.int64)])

    def next_input(self) -> int:
        """The token a decode step feeds: the last generated one."""
        return self.generated[-1]


@dataclass(frozen=True)
class PrefillGroup:
    """Rows of one prefill call: sequences in consecutive slots [start, start+len(seqs))."""

    start: int
    seqs: list[Sequence]
    lengths: list[int]  # new tokens of each row this iteration


@dataclass(frozen=True)
class StepPlan:
    moves: list[tuple[int, int]]  # (src, dst) slot moves to apply first, in order
    prefill: list[PrefillGroup]
    decode_start: int
    decode_stop: int  # decode call covers slots [start, stop); empty when start == stop
    decode_seqs: list[Sequence]  # the rows that really decode (others in range are ignored)
    drop_kv: list[int] = field(default_factory=list)  # slots whose K/V to drop after the moves (recomputed)

    @property
    def empty(self) -> bool:
        return not self.prefill and self.decode_stop <= self.decode_start


def min_move_plan(live: list[bool]) -> list[tuple[int, int]]:
    """Flover's reordering: moves that make the live slots contiguous, fewest possible."""
    n, k = len(live), sum(live)
    if k == 0:
        return []
    prefix = np.concatenate([[0], np.cumsum(live)])
    counts = prefix[k:] - prefix[: n - k + 1]  # live slots inside window [w, w+k)
    w = int(np.argmax(counts))  # first best window: ties go to the lowest start
    holes = [i for i in range(w, w + k) if not live[i]]
    outside = [i for i in itertools.chain(range(0, w), range(w + k, n)) if live[i]]
    return list(zip(outside, holes))


# Prompt tokens prefilled per iteration (chunked prefill's budget), by device. A CPU step is
# compute-bound: a chunk stalls the running decodes in proportion to its tokens, so chunks stay
# small. A GPU step of a 1B model is bound by launching its kernels up to ~1k tokens, so a small
# chunk only multiplies the calls (on the H100 serving benchmark the two budgets measured within
# noise of each other; admission batching is what mattered there: docs/gpu.md).
PREFILL_CHUNK = {"cpu": 128, "cuda": 1024}
# Admission batching (algorithm step 3): requests admitted together / the longest hold in
# iterations. The CPU admits at once: its prefill cost is per token, not per call.
ADMIT_BATCH = {"cpu": 1, "cuda": 8}
ADMIT_WAIT = 16


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def default_prefill_chunk(device: str = "cpu") -> int:
    return PREFILL_CHUNK[_kind(device)]


def default_admit_batch(device: str = "cpu") -> int:
    return ADMIT_BATCH[_kind(device)]


class FusionScheduler:
    def __init__(self, max_batch: int, kv_capacity_tokens: int, max_seq_len: int,
                 prefill_chunk: int = PREFILL_CHUNK["cpu"], max_queue: int = 1024, compaction: str = "min-move",
                 admit_batch: int = 1, admit_wait: int = ADMIT_WAIT, rope_switch: int | None = None):
        if compaction not in ("min-move", "holes"):
            raise InputError(f"compaction={compaction!r} must be 'min-move' or 'holes'")
        if max_batch < 1 or prefill_chunk < 1 or admit_batch < 1 or admit_wait < 0:
            raise InputError("max_batch, prefill_chunk and admit_batch must be >= 1, admit_wait >= 0")
        self.admit_batch, self.admit_wait = admit_batch, admit_wait
        self._held = 0  # consecutive iterations admission was held back
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.compaction = prefill_chunk, compaction
        self.max_seq_len = self._sequence_limit(max_seq_len, kv_capacity_tokens)
        self.kv_capacity_tokens = kv_capacity_tokens
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.total_moves = 0
        self.running_peak = 0  # the most sequences running (admitted, holding KV) when a step was launched
        self.rope_switch = rope_switch  # LongRoPE's original_max_position_embeddings (algorithm step 4)
        self.total_recomputes = 0  # sequences recomputed with the long factors
        self._arrivals = itertools.count()

    def _sequence_limit(self, max_seq_len: int, kv_capacity_tokens: int) -> int:
        """The most tokens one sequence may hold. The slot pool is max_batch rows x S_cap
        positions: the budget caps the longest sequence."""
        limit = min(max_seq_len, kv_capacity_tokens // self.max_batch)
        if limit < 2:
            raise InputError(
                f"KV memory of {kv_capacity_tokens} tokens cannot hold {self.max_batch} sequences; "
                f"raise --kv-memory or lower --max-batch"
            )
        return limit

    def kv_stats(self) -> dict:
        """KV counters of this layout for ``DecoderEngine.stats`` (the slot pool's own are the
        executor's ``used_tokens``)."""
        return {}

    # -- queue -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.reserved > self.max_seq_len:
            raise InputError(
                f"request {seq.request_id} needs up to {seq.reserved} tokens (prompt {len(seq.prompt_ids)} + "
                f"max_new_tokens), more than this engine's per-sequence limit of {self.max_seq_len}; "
                f"shorten the prompt/max_new_tokens or raise --kv-memory"
            )
        if len(self.waiting) >= self.max_queue:
            raise OverloadedError(f"request queue is full ({self.max_queue} waiting); retry later")
        seq.order = next(self._arrivals)
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def retire(self, seq: Sequence) -> None:
        """Free a finished or cancelled sequence's slot (or drop it from the queue)."""
        seq.phase = Phase.DONE
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        else:
            self._drop_waiting(seq)

    def _drop_waiting(self, seq: Sequence) -> None:
        """Remove ``seq`` from the queue if it is there (a request retired before admission)."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass

    # -- request state (the engine reports; the scheduler changes) ---------------------------
    def cancel(self, seq: Sequence) -> None:
        """Mark ``seq`` cancelled; the engine finishes it at its next iteration."""
        seq.cancelled = True

    def launched(self, plan: StepPlan) -> None:
        """``plan``'s calls are queued: its rows' new tokens have K/V (or will, once the device
        is done) -- a prefill row its chunk, a decode row its one token."""
        self.running_peak = max(self.running_peak, len(self.running))
        for g in plan.prefill:
            for s, n in zip(g.seqs, g.lengths):
                s.num_cached += n
        for s in plan.decode_seqs:
            s.num_cached += 1

    def record_token(self, seq: Sequence, token: int) -> None:
        """``seq`` generated ``token``; its first token ends its prefill."""
        if seq.phase is Phase.PREFILL:
            seq.phase = Phase.DECODE
        seq.generated.append(token)

    def continuation(self, last: StepPlan, *, chaining: bool, cancelling: bool, length_limit: int) -> StepPlan | None:
        """The next step when it can be launched before ``last``'s tokens are recorded: the same
        decode rows again, fed the tokens ``last`` is computing (on the device). Only with
        ``chaining`` (the executor's ``supports_chaining``), for a pure-decode ``last`` whose
        rows all take the argmax and none ends with the token in flight (``max_new_tokens``,
        or ``length_limit`` total tokens), and while no request waits or is being cancelled
        (``cancelling``), and no row would cross the LongRoPE switch. An EOS or stop string found
        in ``last``'s token ends its request, and the token computed behind it is dropped."""
        if not chaining or last.prefill or last.decode_stop <= last.decode_start:
            return None
        if cancelling or self.waiting:
            return None
        for s in last.decode_seqs:
            if s.phase is not Phase.DECODE or s.cancelled or s.params.temperature > 0:
                return None
            if len(s.generated) + 1 >= s.params.max_new_tokens or s.total_tokens + 1 >= length_limit:
                return None
            if self.crosses_rope_switch(s, s.num_cached + 1):  # LongRoPE: ``schedule`` recomputes it
                return None
        return StepPlan([], [], last.decode_start, last.decode_stop, list(last.decode_seqs))

    # -- the plan --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        moves = self._compact() if self.compaction == "min-move" else []
        self._admit()
        drop = self._switch_to_long_rope()
        prefill = self._prefill_groups()
        dec = [s for s in self.slots if s is not None and s.phase is Phase.DECODE]
        if dec:
            start = min(s.slot for s in dec)
            stop = max(s.slot for s in dec) + 1
        else:
            start = stop = 0
        return StepPlan(moves=moves, prefill=prefill, decode_start=start, decode_stop=stop, decode_seqs=dec,
                        drop_kv=drop)

    def crosses_rope_switch(self, seq: Sequence, length: int) -> bool:
        """Whether ``seq``, short so far, must take the long LongRoPE factors at ``length`` tokens
        (algorithm step 4). An engine that plans a step without ``schedule`` asks this first."""
        return self.rope_switch is not None and not seq.rope_long and length > self.rope_switch

    def _switch_to_long_rope(self) -> list[int]:
        """Algorithm step 4: mark sequences past the switch long; recompute those with K/V cached.
        Returns the slots whose K/V the engine drops."""
        drop = []
        for s in self.slots:
            if s is None or not self.crosses_rope_switch(s, s.total_tokens):
                continue
            s.rope_long = True
            if s.num_cached:
                drop.append(s.slot)
                s.num_cached, s.phase = 0, Phase.PREFILL
                self.total_recomputes += 1
        return drop

    def _compact(self) -> list[tuple[int, int]]:
        live = [s is not None for s in self.slots]
        if True in live and live.count(True) == len(live) - live.index(True) - live[::-1].index(True):
            return []  # already one contiguous range (the usual case): nothing to plan
        moves = min_move_plan(live)
        for src, dst in moves:
            seq = self.slots[src]
            self.slots[dst], self.slots[src] = seq, None
            seq.slot = dst
        self.total_moves += len(moves)
        return moves

    def _free_slot(self) -> int | None:
        """A free slot next to the live range: after its end, else before its start."""
        live = [i for i, s in enumerate(self.slots) if s is not None]
        if not live:
            return 0
        end = live[-1] + 1
        if end < self.max_batch:
            return end
        for i in range(live[0] - 1, -1, -1) if self.compaction == "min-move" else range(self.max_batch):
            if self.slots[i] is None:
                return i
        return None

    def _hold_admission(self) -> bool:
        """Admission batching (module docstring, step 3): whether to keep the waiting
        requests queued this iteration."""
        if self.admit_batch <= 1 or not self.waiting:
            self._held = 0
            return False
        busy = sum(s is not None for s in self.slots)
        decoding = sum(s is not None and s.phase is Phase.DECODE for s in self.slots)
        ready = min(sum(not s.cancelled for s in self.waiting), self.max_batch - busy)
        if ready == 0 or ready >= self.admit_batch or 2 * decoding < self.max_batch or self._held >= self.admit_wait:
            self._held = 0
            return False
        self._held += 1
        return True

    def _admit(self) -> None:
        if self._hold_admission():
            return
        while self.waiting:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            slot = self._free_slot()
            if slot is None:
                return
            self.waiting.popleft()
            seq.slot, seq.phase = slot, Phase.PREFILL
            self.slots[slot] = seq

    def _prefill_groups(self) -> list[PrefillGroup]:
        budget = self.prefill_chunk
        chosen: list[tuple[Sequence, int]] = []
        pre = sorted((s for s in self.slots if s is not None and s.phase is Phase.PREFILL), key=lambda s: s.order)
        for s in pre:
            if budget <= 0:
                break
            n = min(budget, s.total_tokens - s.num_cached)
            chosen.append((s, n))
            budget -= n
        chosen.sort(key=lambda x: x[0].slot)
        groups: list[PrefillGroup] = []
        for s, n in chosen:
            g = groups[-1] if groups else None
            if g is not None and g.start + len(g.seqs) == s.slot:
                g.seqs.append(s)
                g.lengths.append(n)
            else:
                groups.append(PrefillGroup(start=s.slot, seqs=[s], lengths=[n]))
        return groups
