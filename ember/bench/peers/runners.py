"""One greedy ``generate`` per engine, in lockstep, timed per token step (``timing.GenTiming``).

``make_runner(engine, path, max_batch, threads)`` loads an engine; ``runner.generate(prompts, n)``
takes equal-length token-id prompts (one per row) and returns the timing and row 0's tokens.
"""
from __future__ import annotations

import time

import numpy as np

from ember.bench.peers.timing import GenTiming


class EmberRunner:
    """``ember.load`` + ``submit``: the engine's own scheduler (continuous batching)."""

    def __init__(self, path: str, max_batch: int, threads: int | None):
        import ember

        self.engine = ember.load(path, max_batch=max_batch, threads=threads)

    @classmethod
    def over(cls, engine) -> "EmberRunner":
        """The runner over an engine loaded by the caller (any device, any load options; the caller closes it)."""
        runner = cls.__new__(cls)
        runner.engine = engine
        return runner

    def generate(self, prompts: list[list[int]], n: int) -> tuple[GenTiming, list[int]]:
        from ember.runtime.requests import SamplingParams

        params = SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        handles = [self.engine.submit(p, params) for p in prompts]
        done = [h.result(timeout=3600) for h in handles]
        steps = [max(c.token_times[k] for c in done) for k in range(n)]
        return GenTiming(start, steps, len(prompts), len(prompts[0])), list(done[0].token_ids)


class OrtGenAIRunner:
    """ONNX Runtime GenAI's ``Generator``: ``append_tokens`` (prefill), then one token per call."""

    def __init__(self, path: str, max_batch: int, threads: int | None):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(path)

    def generate(self, prompts: list[list[int]], n: int) -> tuple[GenTiming, list[int]]:
        total = len(prompts[0]) + n
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(prompts))
        gen = self.og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        steps, row0 = [], []
        for _ in range(n):
            gen.generate_next_token()
            row0.append(int(gen.get_next_tokens()[0]))
            steps.append(time.perf_counter())
        del gen
        return GenTiming(start, steps, len(prompts), len(prompts[0])), row0


class LlamaCppRunner:
    """llama.cpp through ``llama_cpp``'s C API: one sequence id per row, greedy argmax on the logits."""

    def __init__(self, path: str, max_batch: int, threads: int | None, ctx_per_row: int):
        import os

        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_seq_max = max_batch
        cp.n_ctx = ctx_per_row * max_batch
        cp.n_batch = cp.n_ubatch = max(512, ctx_per_row)
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, max_batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for k, (tok, pos, seq, want) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, want
            b.seq_id[k][0] = seq
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], n: int) -> tuple[GenTiming, list[int]]:
        L, plen = self.L, len(prompts[0])
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        entries = [(t, j, i, j == plen - 1) for i, p in enumerate(prompts) for j, t in enumerate(p)]
        last_rows = [k for k, e in enumerate(entries) if e[3]]
        self._decode(entries)
        toks = [self._argmax(k) for k in last_rows]
        steps, row0 = [time.perf_counter()], [toks[0]]
        for s in range(1, n):
            self._decode([(t, plen + s - 1, i, True) for i, t in enumerate(toks)])
            toks = [self._argmax(i) for i in range(len(toks))]
            steps.append(time.perf_counter())
            row0.append(toks[0])
        return GenTiming(start, steps, len(prompts), plen), row0


class TransformersRunner:
    """``transformers`` ``generate`` (torch FP32, greedy), timed by ``ember.bench.hf_arm``'s runner."""

    def __init__(self, path: str, max_batch: int, threads: int | None):
        import transformers

        from ember.bench.hf_arm import HFBatchRunner

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
        self.run = HFBatchRunner(model, model.config.eos_token_id, ignore_eos=True, threads=threads)

    def generate(self, prompts: list[list[int]], n: int) -> tuple[GenTiming, list[int]]:
        from ember.bench.metrics import RequestRecord
        from ember.bench.workload import BenchRequest

        reqs = [BenchRequest(i, 0.0, p, n) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        recs = [RequestRecord(i, start, len(p), n) for i, p in enumerate(prompts)]
        self.run(reqs, recs, float("inf"))
        steps = [max(r.token_times[k] for r in recs) for k in range(n)]
        return GenTiming(start, steps, len(prompts), len(prompts[0])), list(recs[0].token_ids)


def make_runner(engine: str, path: str, max_batch: int, threads: int | None, ctx_per_row: int):
    if engine == "llama.cpp":
        return LlamaCppRunner(path, max_batch, threads, ctx_per_row)
    cls = {"ember": EmberRunner, "onnxruntime-genai": OrtGenAIRunner, "transformers": TransformersRunner}[engine]
    return cls(path, max_batch, threads)
