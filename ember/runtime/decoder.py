"""The decoder engine: requests in, tokens streamed out, every live sequence fused into one
step per iteration (docs/design.md §4.1). The loop is ``schedule -> execute -> update`` on a
background thread that runs while there is work; ``submit`` is thread-safe.

Three parts, each with one job: the scheduler (``scheduler.py``) plans each step and owns every
change of a request's state, the chaining policy included; the runner (``step_runner.py``)
builds a plan's tensors and launches them on the executor; the output processor
(``output_processor.py``) records the tokens, streams them and finishes requests.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Iterable, Sequence as Seq

import numpy as np

from ember.errors import EmberError, InputError
from ember.runtime.detokenize import Detokenizer
from ember.runtime.executor_protocol import Executor, PagedExecutor, missing_members
from ember.runtime.output_processor import OutputProcessor, RequestState
from ember.runtime.paged_scheduler import PagedScheduler
from ember.runtime.requests import Completion, FinishReason, RequestHandle, SamplingParams, TokenEvent
from ember.runtime.scheduler import FusionScheduler, Phase, Sequence, StepPlan
from ember.runtime.step_runner import InflightStep, PagedStepRunner, StepRunner
from ember.runtime.text_input import check_text, check_token_ids


class DecoderEngine:
    """Owns an executor (session + KV pool), a scheduler, the runner and output processor
    between them, and the loop thread."""

    def __init__(self, executor: Executor, scheduler: FusionScheduler, *, tokenizer=None, eos_token_id: int | None = None,
                 max_positions: int, config: dict | None = None, manifest=None):
        self.executor, self.scheduler = executor, scheduler
        self.tokenizer = tokenizer
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
        if isinstance(scheduler, PagedScheduler):
            missing = missing_members(executor, PagedExecutor)
            if missing:
                raise InputError(f"a paged scheduler needs a PagedExecutor; {type(executor).__name__} lacks "
                                 f"{', '.join(missing)}: load with kv_layout='slots'")
            self.runner = PagedStepRunner(executor, scheduler.blocks)
        else:
            self.runner = StepRunner(executor, longrope=scheduler.rope_switch is not None)
        self.output = OutputProcessor(scheduler, executor, eos_token_id, self._length_limit, self.counters)

    @property
    def eos_token_id(self) -> int | None:
        return self.output.eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value: int | None) -> None:
        self.output.eos_token_id = value

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
        seq.payload = RequestState(handle, rng, Detokenizer(self.tokenizer, params.stop), token_times=[])
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
            self.scheduler.cancel(seq)
            self._cancel.append(seq)
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            running = self.scheduler.running
            kv = self.scheduler.kv_stats()  # the paged layout counts its blocks (and used tokens) itself
            if "kv_used_tokens" not in kv:
                kv["kv_used_tokens"] = int(self.executor.used_tokens)
            return {
                "queue_depth": len(self.scheduler.waiting),
                "running": len(running),
                "running_peak": self.scheduler.running_peak,
                **kv,
                "kv_capacity_tokens": int(self.scheduler.kv_capacity_tokens),
                "max_batch": self.scheduler.max_batch,
                "slot_moves_total": self.scheduler.total_moves,
                "longrope_recomputes_total": self.scheduler.total_recomputes,
                **self.counters,
                **self.executor.stats(),  # e.g. CUDA graphs, memory plan
            }

    # -- loop ------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """schedule -> launch -> (stream the last step's tokens) -> collect, until closed.

        ``unstreamed``: tokens recorded whose streaming (detokenization, stop strings, events)
        waits until the next step is launched: on a GPU it then overlaps the device's work.
        ``inflight``: the last launched step, its tokens not yet recorded. An executor that
        ``supports_chaining`` runs a pure-decode step behind it, fed its argmax on the device
        (``FusionScheduler.continuation``), so the host never holds the device up."""
        unstreamed: list[Sequence] = []
        inflight: InflightStep | None = None
        while True:
            with self._cv:
                if self._closed:
                    return
                plan = self._continuation(inflight)
            if inflight is not None and plan is None:  # the next step needs this one's tokens first
                unstreamed += self._collect(inflight)
                inflight = None
                continue
            if plan is None:
                plan = self._wait_and_schedule(unstreamed)
                if plan is None:  # closed
                    return
                if plan.empty and not plan.moves:
                    self._stream(unstreamed)
                    continue
            launched = self._launch(plan, behind=inflight)
            self._stream(unstreamed)
            if inflight is not None:  # the step this one was chained behind
                unstreamed += self._collect(inflight)
            inflight = launched

    def _continuation(self, inflight: InflightStep | None) -> StepPlan | None:
        """The step to chain behind ``inflight`` (the scheduler's policy), or None. Under the lock."""
        if inflight is None:
            return None
        return self.scheduler.continuation(inflight.plan, chaining=self.executor.supports_chaining,
                                           cancelling=bool(self._cancel), length_limit=self._length_limit)

    def _wait_and_schedule(self, unstreamed: list[Sequence]) -> StepPlan | None:
        """Wait for work (streaming what is left first when there is none), finish the
        cancelled requests, and plan the next step; None once the engine is closed."""
        with self._cv:
            if not self.scheduler.has_work():
                self._stream(unstreamed)
            while not self._closed and not self._cancel and not self.scheduler.has_work():
                self._cv.wait()
            if self._closed:
                return None
            for seq in self._cancel:
                if seq.phase is not Phase.DONE:
                    self.output.finish(seq, FinishReason.CANCELLED)
            self._cancel.clear()
            return self.scheduler.schedule()

    def _launch(self, plan: StepPlan, behind: InflightStep | None) -> InflightStep | None:
        """Launch ``plan`` (chained behind ``behind`` when given); None when the launch failed,
        which fails the requests in it, not the engine. Only the loop thread changes
        ``num_cached``, so ``launched`` needs no lock."""
        self.counters["iterations_total"] += 1
        try:
            step = self.runner.launch(plan, chain=behind.chain_source if behind is not None else None)
        except Exception as e:
            with self._cv:
                self.output.fail_plan(plan, e)
            return None
        self.scheduler.launched(plan)
        return step

    def _collect(self, step: InflightStep) -> list[Sequence]:
        """Wait for ``step``'s tokens and record them; returns the sequences whose new token is
        still to be streamed."""
        try:
            outputs = step.wait()
        except Exception as e:
            with self._cv:
                self.output.fail_plan(step.plan, e)
            return []
        now = time.perf_counter()
        with self._cv:
            return self.output.record(outputs, now)

    def _stream(self, unstreamed: list[Sequence]) -> None:
        """Stream the recorded tokens of ``unstreamed`` and empty it."""
        with self._cv:
            self.output.stream_all(unstreamed)
        unstreamed.clear()

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
                self.output.finish(s, FinishReason.CANCELLED)
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
