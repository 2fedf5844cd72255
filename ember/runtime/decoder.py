"""The decoder engine: requests in, tokens streamed out, every live sequence fused into one
step per iteration (docs/design.md §4.1). The loop is ``schedule -> execute -> update`` on a
background thread that runs while there is work; ``submit`` is thread-safe.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence as Seq

import numpy as np

from ember.errors import EmberError, InputError
from ember.runtime.detokenize import Detokenizer
from ember.runtime.executor_protocol import Executor
from ember.runtime.requests import Completion, FinishReason, RequestHandle, SamplingParams, TokenEvent
from ember.runtime.sampling import sample_token
from ember.runtime.scheduler import FusionScheduler, Phase, Sequence, StepPlan
from ember.runtime.text_input import check_text, check_token_ids


@dataclass
class _RequestState:
    handle: RequestHandle
    rng: np.random.Generator | None
    detok: Detokenizer
    first_token_at: float | None = None
    token_times: list[float] | None = None
    streamed: int = 0  # generated tokens already pushed to the handle


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class DecoderEngine:
    """Owns an executor (session + KV pool), a scheduler and the loop thread."""

    def __init__(self, executor: Executor, scheduler: FusionScheduler, *, tokenizer=None, eos_token_id: int | None = None,
                 max_positions: int, config: dict | None = None, manifest=None):
        self.executor, self.scheduler = executor, scheduler
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self.max_positions = max_positions
        self._length_limit = min(max_positions, scheduler.max_seq_len)  # a sequence's last position
        self.config, self.manifest = config or {}, manifest
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        self._cancel: list[Sequence] = []
        self.counters = {"tokens_generated_total": 0, "requests_finished_total": 0, "iterations_total": 0,
                         "prompt_tokens_total": 0, "requests_failed_total": 0}

    # -- submission ------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int], field: str = "prompt") -> np.ndarray:
        """A prompt (text, or a sequence of token ids) -> int64 token ids; InputError naming
        ``field`` when it is neither, or its ids are out of range, or it is empty or too long."""
        if isinstance(prompt, str):
            check_text(prompt, field)
            if self.tokenizer is None:
                raise InputError(f"{field} is text but this engine has no tokenizer: pass a list of token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = check_token_ids(prompt, field, int(self.config.get("vocab_size", 1 << 62)))
        if not ids:
            raise InputError(f"{field} is empty: give at least one token")
        if len(ids) >= self.max_positions:
            raise InputError(
                f"{field} has {len(ids)} tokens; the model's maximum sequence length is {self.max_positions} "
                f"(prompt + generated tokens): shorten the prompt"
            )
        return np.asarray(ids, dtype=np.int64)

    def submit(self, prompt: str | Seq[int], params: SamplingParams | None = None, **overrides: Any) -> RequestHandle:
        """Queue one request; returns its streaming handle. Raises OverloadedError when full."""
        if params is None:
            params = SamplingParams(**overrides)
        elif overrides:
            params = SamplingParams(**{**params.__dict__, **overrides})
        elif not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}: "
                             "pass SamplingParams(...) or keyword arguments")
        return self._submit_ids(self.encode(prompt), params)

    def _submit_ids(self, ids: np.ndarray, params: SamplingParams) -> RequestHandle:
        reserved = min(len(ids) + params.max_new_tokens, self.max_positions)
        rid = f"req-{next(self._ids)}"
        seq = Sequence(request_id=rid, prompt_ids=ids, params=params, reserved=reserved)
        handle = RequestHandle(rid, len(ids), lambda h, s=seq: self._request_cancel(s))
        rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
        seq.payload = _RequestState(handle, rng, Detokenizer(self.tokenizer, params.stop), token_times=[])
        with self._cv:
            if self._closed:
                raise EmberError("engine is closed")
            self.scheduler.add(seq)
            self.counters["prompt_tokens_total"] += len(ids)
            self._ensure_loop()
            self._cv.notify()
        return handle

    def generate(self, prompts: Seq[str | Seq[int]], max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: Seq[str] = (),
                 ignore_eos: bool = False, stream: Callable[[int, TokenEvent], None] | None = None) -> list[Completion]:
        """Run a list of prompts to completion (fused with anything else in flight).

        ``seed`` seeds request i with ``seed + i`` so each prompt has its own stream.
        ``stream(i, event)`` is called for each token of prompt i, from this thread.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
            raise InputError(f"prompts must be a list of prompts (each a str or a list of int token ids), "
                             f"got {type(prompts).__name__}: wrap a single prompt in a list")
        prompts = list(prompts)
        # every prompt and parameter is checked before any request is queued
        base = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=stop, ignore_eos=ignore_eos)
        ids = [self.encode(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        handles = [self._submit_ids(x, base if seed is None else dataclasses.replace(base, seed=base.seed + i))
                   for i, x in enumerate(ids)]
        if stream is not None:
            for i, h in enumerate(handles):
                for ev in h:
                    stream(i, ev)
        return [h.result() for h in handles]

    def _request_cancel(self, seq: Sequence) -> None:
        with self._cv:
            seq.cancelled = True
            self._cancel.append(seq)
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            running = self.scheduler.running
            return {
                "queue_depth": len(self.scheduler.waiting),
                "running": len(running),
                "kv_used_tokens": int(self.executor.used_tokens),
                "kv_capacity_tokens": int(self.scheduler.kv_capacity_tokens),
                "max_batch": self.scheduler.max_batch,
                "slot_moves_total": self.scheduler.total_moves,
                **self.counters,
            }

    # -- loop ------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        # Tokens already recorded whose streaming (detokenization, stop strings, events) waits
        # until the next step is launched: on a GPU it then overlaps the device's work.
        unstreamed: list[Sequence] = []
        # The last launched step, its tokens not yet recorded. An executor that ``supports_chaining`` can
        # run a pure-decode step behind it with the ids taken from its argmax on the device, so
        # the host never holds the device up (``_continuation``).
        inflight: tuple[StepPlan, list] | None = None
        while True:
            with self._cv:
                if self._closed:
                    return
                plan = self._continuation(inflight[0]) if inflight is not None else None
            if inflight is not None and plan is None:  # the next step needs this one's tokens first
                try:
                    unstreamed += self._update(inflight[1])
                except Exception as e:
                    self._fail_plan(inflight[0], e)
                inflight = None
                continue
            if plan is None:
                with self._cv:
                    if not self.scheduler.has_work():
                        unstreamed = self._stream_all(unstreamed)
                    while not self._closed and not self._cancel and not self.scheduler.has_work():
                        self._cv.wait()
                    if self._closed:
                        return
                    for seq in self._cancel:
                        if seq.phase is not Phase.DONE:
                            self._finish(seq, FinishReason.CANCELLED)
                    self._cancel.clear()
                    plan = self.scheduler.schedule()
                if plan.empty and not plan.moves:
                    unstreamed = self._stream_all(unstreamed)
                    continue
            self.counters["iterations_total"] += 1
            launched = None
            try:
                launched = self._launch(plan, chain=inflight[1][-1][2] if inflight is not None else None)
            except Exception as e:  # a failed step fails the requests in it, not the engine
                self._fail_plan(plan, e)
            unstreamed = self._stream_all(unstreamed)
            if inflight is not None:  # the step this one was chained behind
                try:
                    unstreamed = self._update(inflight[1])
                except Exception as e:
                    self._fail_plan(inflight[0], e)
            inflight = (plan, launched) if launched is not None else None

    def _continuation(self, last: StepPlan) -> StepPlan | None:
        """The next step, when it can be launched before ``last``'s tokens are recorded: the
        same decode rows again, fed the tokens ``last`` is computing (on the device). Only for
        an executor that ``supports_chaining``, a pure-decode ``last`` whose rows all take the argmax and
        none ends with the token in flight (length), and while no request waits or is being
        cancelled. An EOS or stop string found in ``last``'s token ends its request, and the
        token computed behind it is dropped. Called under the lock."""
        if not self.executor.supports_chaining or last.prefill or last.decode_stop <= last.decode_start:
            return None
        if self._cancel or self.scheduler.waiting:
            return None
        for s in last.decode_seqs:
            if s.phase is not Phase.DECODE or s.cancelled or s.payload.rng is not None:
                return None
            if len(s.generated) + 1 >= s.params.max_new_tokens or s.total_tokens + 1 >= self._length_limit:
                return None
        return StepPlan([], [], last.decode_start, last.decode_stop, list(last.decode_seqs))

    def _launch(self, plan: StepPlan, chain=None) -> list:
        """Queue the plan's calls on the executor: slot moves, one call per prefill group, one
        fused decode call (fed the device tokens of the pending step ``chain`` when given, for a
        ``_continuation``). Returns, per call, (the sequences and rows whose token it yields,
        the rows that sample, the pending result)."""
        ex = self.executor
        if plan.moves:
            ex.move(plan.moves)
        launched = []
        for g in plan.prefill:
            b, t = len(g.seqs), max(g.lengths)
            ids = np.zeros((b, t), dtype=np.int64)
            pos = np.zeros((b, t), dtype=np.int64)
            for r, (s, n) in enumerate(zip(g.seqs, g.lengths)):
                ids[r, :n] = s.prompt_ids[s.num_cached:s.num_cached + n]
                pos[r, :n] = np.arange(s.num_cached, s.num_cached + n)
            ending = [(g.seqs[r], r) for r, (s, n) in enumerate(zip(g.seqs, g.lengths))
                      if s.num_cached + n == len(s.prompt_ids)]
            sampled = [r for s, r in ending if s.payload.rng is not None]
            pending = ex.launch_greedy(g.start, ids, pos, np.asarray(g.lengths, dtype=np.int64), sampled)
            for s, n in zip(g.seqs, g.lengths):
                s.num_cached += n
            launched.append((ending, sampled, pending))
        if plan.decode_stop > plan.decode_start:
            start, b = plan.decode_start, plan.decode_stop - plan.decode_start
            ids = np.zeros((b, 1), dtype=np.int64)
            pos = np.zeros((b, 1), dtype=np.int64)
            new = np.zeros(b, dtype=np.int64)
            for s in plan.decode_seqs:
                r = s.slot - start
                ids[r, 0], pos[r, 0], new[r] = (0 if chain is not None else s.next_input()), s.num_cached, 1
            # every row's argmax in one pass (on the device for a GPU executor); full logits
            # only for the rows that sample
            sampled = [s.slot - start for s in plan.decode_seqs if s.payload.rng is not None]
            pending = ex.launch_greedy(start, ids, pos, new, sampled, chain=chain)
            for s in plan.decode_seqs:
                s.num_cached += 1
            launched.append(([(s, s.slot - start) for s in plan.decode_seqs], sampled, pending))
        return launched

    def _update(self, launched: list) -> list[Sequence]:
        """Wait for the launched calls' tokens and record them (sampling the rows that sample):
        EOS and length finish a request here, before the next schedule; returns the sequences
        whose new token is still to be streamed."""
        results = []
        for rows_of_call, sampled, pending in launched:
            greedy, logits = pending.result()
            results.append((rows_of_call, dict(zip(sampled, logits)), greedy))
        now = time.perf_counter()
        unstreamed = []
        with self._cv:
            for rows_of_call, logits_of, greedy in results:
                for s, r in rows_of_call:
                    if s.phase is Phase.PREFILL:  # its prompt's last chunk: the first token
                        s.phase = Phase.DECODE
                    try:
                        if self._record(s, logits_of.get(r), int(greedy[r]), now):
                            unstreamed.append(s)
                    except Exception as e:  # e.g. sampling: fails this request, not its batch mates
                        self._fail_request(s, e)
        return unstreamed

    def _record(self, s: Sequence, logits_row: np.ndarray | None, greedy_token: int, now: float) -> bool:
        """Sample the next token of ``s`` (``logits_row``: the row's logits when it samples,
        else None), record it, and finish the request on EOS or length (streaming it first).
        Returns True when the token waits to be streamed."""
        if s.phase is Phase.DONE:  # stopped or cancelled while this step ran: the token is dropped
            return False
        st: _RequestState = s.payload
        if s.cancelled:
            self._finish(s, FinishReason.CANCELLED)
            return False
        tok = greedy_token if st.rng is None else sample_token(logits_row, s.params, st.rng)
        s.generated.append(tok)
        self.counters["tokens_generated_total"] += 1
        if st.first_token_at is None:
            st.first_token_at = now
        st.token_times.append(now)
        if tok == self.eos_token_id and not s.params.ignore_eos:
            self._finish(s, FinishReason.EOS)
        elif len(s.generated) >= s.params.max_new_tokens or s.total_tokens >= self._length_limit:
            self._finish(s, FinishReason.LENGTH)
        else:
            return True
        return False

    def _stream_all(self, seqs: list[Sequence]) -> list[Sequence]:
        """Stream the recorded tokens of ``seqs`` (finishing those that hit a stop string);
        returns the empty list of what is left to stream."""
        with self._cv:
            for s in seqs:
                if s.phase is Phase.DONE:
                    continue
                try:
                    self._stream(s)
                except Exception as e:  # a failing detokenization fails its request, not the engine
                    self._fail_request(s, e)
                    continue
                if s.payload.detok.stopped:
                    self._finish(s, FinishReason.STOP)
        return []

    def _stream(self, s: Sequence) -> None:
        """Push the token events ``s`` has recorded but not streamed (detokenized, with the
        stop strings checked)."""
        st: _RequestState = s.payload
        while st.streamed < len(s.generated):
            i = st.streamed
            st.streamed += 1
            tok = s.generated[i]
            is_eos = tok == self.eos_token_id and not s.params.ignore_eos
            delta = "" if is_eos else st.detok.add(s.generated if i + 1 == len(s.generated) else s.generated[:i + 1])
            st.handle._push(TokenEvent(tok, delta, i))

    def _finish(self, s: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End ``s``: stream what it recorded and the text held back, free its slot, complete its
        handle. A failing per-request step here (detokenization, the stop-string flush, the
        handle's events) makes it an ERROR finish of this request alone; nothing is raised."""
        st: _RequestState = s.payload
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
                reason, error = FinishReason.ERROR, _describe(e)
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

    def _fail_request(self, s: Sequence, e: Exception, log: bool = True) -> None:
        """The one home of "a step failed for this request": finish ``s`` alone with ERROR and
        the message (its slot is freed); its batch mates carry on. Call from the except block."""
        if log:
            traceback.print_exc()
        if s.phase is not Phase.DONE:
            self._finish(s, FinishReason.ERROR, error=_describe(e))

    def _fail_plan(self, plan: StepPlan, e: Exception) -> None:
        """A whole step failed (the model call): every request in it fails."""
        traceback.print_exc()
        with self._cv:
            for s in [s for g in plan.prefill for s in g.seqs] + list(plan.decode_seqs):
                self._fail_request(s, e, log=False)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loop and cancel what is left. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cv:
            for s in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._finish(s, FinishReason.CANCELLED)
        self.executor.close()

    def __enter__(self) -> "DecoderEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
