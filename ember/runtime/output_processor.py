"""The engine loop's output processor: a step's tokens in, requests' events and completions
out. It samples the rows that sample, records each token (through the scheduler), finishes
requests on EOS and length, detokenizes and checks stop strings when the engine streams, and
finishes requests (freeing their slots). Every method is called under the engine's lock.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import numpy as np

from ember.runtime.detokenize import Detokenizer
from ember.runtime.executor_protocol import Executor
from ember.runtime.requests import Completion, FinishReason, RequestHandle, TokenEvent
from ember.runtime.sampling import sample_token
from ember.runtime.scheduler import FusionScheduler, Phase, Sequence, StepPlan
from ember.runtime.step_runner import CallOutput


@dataclass
class RequestState:
    """A request's output side (``Sequence.payload``): its handle, sampling stream and detokenizer."""

    handle: RequestHandle
    rng: np.random.Generator | None
    detok: Detokenizer
    first_token_at: float | None = None
    token_times: list[float] | None = None
    streamed: int = 0  # generated tokens already pushed to the handle


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class OutputProcessor:
    """``counters``: the engine's counters dict, updated here (tokens, finished, failed)."""

    def __init__(self, scheduler: FusionScheduler, executor: Executor, eos_token_id: int | None, length_limit: int,
                 counters: dict[str, int]):
        self.scheduler, self.executor = scheduler, executor
        self.eos_token_id, self.length_limit, self.counters = eos_token_id, length_limit, counters

    def record(self, outputs: list[CallOutput], now: float) -> list[Sequence]:
        """Record a finished step's tokens (EOS and length finish a request here, before the
        next schedule); returns the sequences whose new token is still to be streamed."""
        unstreamed = []
        for out in outputs:
            for s, r in out.rows:
                try:
                    if self._record(s, out.logits_of.get(r), int(out.greedy[r]), now):
                        unstreamed.append(s)
                except Exception as e:  # e.g. sampling: fails this request, not its batch mates
                    self.fail_request(s, e)
        return unstreamed

    def _record(self, s: Sequence, logits_row: np.ndarray | None, greedy_token: int, now: float) -> bool:
        """Sample the next token of ``s`` (``logits_row``: the row's logits when it samples,
        else None), record it, and finish the request on EOS or length (streaming it first).
        Returns True when the token waits to be streamed."""
        if s.phase is Phase.DONE:  # stopped or cancelled while this step ran: the token is dropped
            return False
        st: RequestState = s.payload
        if s.cancelled:
            self.finish(s, FinishReason.CANCELLED)
            return False
        tok = greedy_token if st.rng is None else sample_token(logits_row, s.params, st.rng)
        self.scheduler.record_token(s, tok)
        self.counters["tokens_generated_total"] += 1
        if st.first_token_at is None:
            st.first_token_at = now
        st.token_times.append(now)
        if tok == self.eos_token_id and not s.params.ignore_eos:
            self.finish(s, FinishReason.EOS)
        elif len(s.generated) >= s.params.max_new_tokens or s.total_tokens >= self.length_limit:
            self.finish(s, FinishReason.LENGTH)
        else:
            return True
        return False

    def stream_all(self, seqs: list[Sequence]) -> None:
        """Stream the recorded tokens of ``seqs`` (finishing those that hit a stop string)."""
        for s in seqs:
            if s.phase is Phase.DONE:
                continue
            try:
                self._stream(s)
            except Exception as e:  # a failing detokenization fails its request, not the engine
                self.fail_request(s, e)
                continue
            if s.payload.detok.stopped:
                self.finish(s, FinishReason.STOP)

    def _stream(self, s: Sequence) -> None:
        """Push the token events ``s`` has recorded but not streamed (detokenized, with the
        stop strings checked)."""
        st: RequestState = s.payload
        while st.streamed < len(s.generated):
            i = st.streamed
            st.streamed += 1
            tok = s.generated[i]
            is_eos = tok == self.eos_token_id and not s.params.ignore_eos
            delta = "" if is_eos else st.detok.add(s.generated if i + 1 == len(s.generated) else s.generated[:i + 1])
            st.handle._push(TokenEvent(tok, delta, i))

    def finish(self, s: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End ``s``: stream what it recorded and the text held back, free its slot, complete its
        handle. A failing per-request step here (detokenization, the stop-string flush, the
        handle's events) makes it an ERROR finish of this request alone; nothing is raised."""
        st: RequestState = s.payload
        try:
            self._stream(s)  # a recorded token is always streamed before the request ends
            if reason is FinishReason.LENGTH and st.detok.stopped:  # the last token completed a stop string
                reason = FinishReason.STOP
            tail = st.detok.flush() if reason not in (FinishReason.CANCELLED, FinishReason.ERROR) else ""
            if tail:
                st.handle._push(TokenEvent(-1, tail, len(s.generated)))
        except Exception as e:
            if reason is not FinishReason.ERROR:
                traceback.print_exc()
                reason, error = FinishReason.ERROR, describe(e)
        slot = s.slot
        self.scheduler.retire(s)
        try:
            if slot is not None:
                self.executor.release(slot)
        except Exception:  # the executor's own failure: its next step reports it to every request
            traceback.print_exc()
        self.counters["requests_finished_total"] += 1
        if reason is FinishReason.ERROR:
            self.counters["requests_failed_total"] += 1
        st.handle._finish(Completion(
            request_id=s.request_id, prompt_tokens=len(s.prompt_ids), token_ids=list(s.generated),
            text=st.detok.text, finish_reason=reason, error=error, submitted_at=st.handle.submitted_at,
            first_token_at=st.first_token_at, finished_at=time.perf_counter(), token_times=st.token_times,
        ))
        if not self.scheduler.running:
            self.executor.maybe_shrink()

    def fail_request(self, s: Sequence, e: Exception, log: bool = True) -> None:
        """The one home of "a step failed for this request": finish ``s`` alone with ERROR and
        the message (its slot is freed); its batch mates carry on. Call from the except block."""
        if log:
            traceback.print_exc()
        if s.phase is not Phase.DONE:
            self.finish(s, FinishReason.ERROR, error=describe(e))

    def fail_plan(self, plan: StepPlan, e: Exception) -> None:
        """A whole step failed (the model call): every request in it fails."""
        traceback.print_exc()
        for s in [s for g in plan.prefill for s in g.seqs] + list(plan.decode_seqs):
            self.fail_request(s, e, log=False)
