"""The fusion scheduler over paged KV (``kv_layout="paged"``, docs/kv.md): the same engine
contract as ``FusionScheduler`` (``schedule`` / ``launched`` / ``record_token`` / ``cancel`` /
``retire``), with a ``BlockManager`` instead of slots. No slot, no compaction: a plan's rows
are its sequences, each read and written through its block table.

Algorithm, once per iteration:
1. Decode room: every decoding sequence, oldest first, gets the block its next token needs.
   When the pool has none, the youngest running sequence is preempted by *recompute*: its
   blocks are freed (its full blocks stay cached, so its recompute usually hits them), its
   ``num_cached`` reset, and it goes back to the front of the queue with its prompt and
   generated tokens, to be prefilled over both (``Sequence.token_ids``) like a LongRoPE
   recompute; the last chunk yields its next token. ``preemptions_total`` counts them.
2. Admission, FIFO, only in an iteration that preempted nothing: while fewer than
   ``max_batch`` sequences run and the block manager can allocate the head's tokens (its
   cached prefix shared, counted as computed: ``num_cached`` starts at the cached length).
   A head whose next uncached full block is being computed by a running sequence waits
   (``BlockManager.prefix_in_flight``; ``prefix_waits_total`` counts the iterations): a
   block is shared only once computed, so a burst of requests behind one new system prompt
   would otherwise compute it once each.
3. Prefill chunks under ``prefill_chunk`` tokens, FIFO, and one decode token per decoding
   sequence (``PagedStepRunner`` launches them as one call or two: ``mixed_steps``).
``launched`` hashes the blocks a step filled, so later requests share them.
"""
from __future__ import annotations

from ember.errors import InputError
from ember.runtime.kv_blocks import BlockManager
from ember.runtime.scheduler import (ADMIT_WAIT, PREFILL_CHUNK, FusionScheduler, Phase, PrefillGroup, Sequence,
                                     StepPlan)


class PagedScheduler(FusionScheduler):
    """``blocks``: the block manager it owns (sized for the executor's block pool)."""

    def __init__(self, blocks: BlockManager, max_batch: int, max_seq_len: int,
                 prefill_chunk: int = PREFILL_CHUNK["cpu"], max_queue: int = 1024, rope_switch: int | None = None):
        if rope_switch is not None:
            raise InputError("kv_layout='paged' does not support LongRoPE models yet (their recompute at the switch "
                             "is slot-based); load with kv_layout='slots' (CLI: --kv-layout slots)")
        self.blocks = blocks
        self.active: list[Sequence] = []  # running sequences, in admission order
        self.total_preemptions = 0
        self.prefill_tokens_total = 0  # prompt (and recomputed) tokens computed, cached prefixes excluded
        self.prefix_waits_total = 0  # iterations admission waited for a prefix block being computed
        super().__init__(max_batch=max_batch, kv_capacity_tokens=blocks.num_blocks * blocks.block_size,
                         max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, max_queue=max_queue,
                         compaction="holes", admit_batch=1, admit_wait=ADMIT_WAIT)

    def _sequence_limit(self, max_seq_len: int, kv_capacity_tokens: int) -> int:
        """One sequence may hold the whole block pool (the others are preempted for it)."""
        limit = min(max_seq_len, kv_capacity_tokens)
        if limit < 2:
            raise InputError(f"a block pool of {kv_capacity_tokens} tokens cannot hold a sequence; raise --kv-memory")
        return limit

    # -- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> list[Sequence]:
        return list(self.active)

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.active)

    def retire(self, seq: Sequence) -> None:
        """Free a finished or cancelled sequence's blocks (or drop it from the queue)."""
        seq.phase = Phase.DONE
        self.blocks.free(seq)
        if seq in self.active:
            self.active.remove(seq)
        else:
            self._drop_waiting(seq)

    def launched(self, plan: StepPlan) -> None:
        super().launched(plan)
        for g in plan.prefill:
            self.prefill_tokens_total += sum(g.lengths)
        bs = self.blocks.block_size
        for s in [s for g in plan.prefill for s in g.seqs] + plan.decode_seqs:
            if s.num_cached // bs > self.blocks.hashed_blocks(s):  # a block filled: share it
                tokens = s.token_ids()  # a chained step's token in flight is not among them yet:
                self.blocks.mark_computed(s, tokens, min(s.num_cached, len(tokens)))  # its block waits

    def continuation(self, last: StepPlan, *, chaining: bool, cancelling: bool, length_limit: int) -> StepPlan | None:
        """``FusionScheduler.continuation``'s step (the same decode rows, fed ``last``'s argmax on
        the device), when every row's block for its chained token can be taken from the free
        pool now: a chained step never preempts (``schedule`` does, with the tokens known)."""
        plan = super().continuation(last, chaining=chaining, cancelling=cancelling, length_limit=length_limit)
        if plan is None or not all(self.blocks.append_slots(s, s.num_cached + 1) for s in plan.decode_seqs):
            return None
        return plan

    def kv_stats(self) -> dict:
        return {"kv_used_tokens": sum(s.num_cached for s in self.active), "kv_layout": "paged",
                "preemptions_total": self.total_preemptions, "prefill_tokens_total": self.prefill_tokens_total,
                "prefix_waits_total": self.prefix_waits_total,
                **self.blocks.summary()}

    # -- the plan ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        if not self._reserve_decode_blocks():
            self._admit()
        prefill = self._prefill_group()
        dec = [s for s in self.active if s.phase is Phase.DECODE]
        return StepPlan(moves=[], prefill=prefill, decode_start=0, decode_stop=len(dec), decode_seqs=dec)

    def _reserve_decode_blocks(self) -> bool:
        """Algorithm step 1; returns whether anything was preempted."""
        preempted = False
        for s in sorted((s for s in self.active if s.phase is Phase.DECODE), key=lambda s: s.order):
            while s in self.active and not self.blocks.append_slots(s, s.num_cached + 1):
                self._preempt(max(self.active, key=lambda x: x.order))
                preempted = True
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.active.remove(seq)
        seq.num_cached, seq.phase = 0, Phase.WAITING
        self.waiting.appendleft(seq)  # the youngest goes first: older ones end up in front of it
        self.total_preemptions += 1

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            tokens = seq.token_ids()
            if self.blocks.prefix_in_flight(tokens):  # wait for it: it becomes a hit
                self.prefix_waits_total += 1
                return
            cached = self.blocks.allocate(seq, tokens)
            if cached is None:
                return
            self.waiting.popleft()
            seq.num_cached, seq.phase = cached, Phase.PREFILL
            self.active.append(seq)

    def _prefill_group(self) -> list[PrefillGroup]:
        """One group (one call) of prefill rows; ``start`` is unused in a paged plan."""
        budget, seqs, lengths = self.prefill_chunk, [], []
        for s in sorted((s for s in self.active if s.phase is Phase.PREFILL), key=lambda s: s.order):
            if budget <= 0:
                break
            n = min(budget, s.total_tokens - s.num_cached)
            seqs.append(s)
            lengths.append(n)
            budget -= n
        return [PrefillGroup(start=0, seqs=seqs, lengths=lengths)] if seqs else []
