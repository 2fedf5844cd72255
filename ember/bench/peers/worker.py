"""A peer arm's build or run, in its own process: ``python -m ember.bench.peers.worker build|run JOB.json``.

The parent (``arms.run_child``) times the process and reads its peak RSS from ``wait4``; ``run``
writes its timings to the job's ``result`` path as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ember.bench.peers import timing as tm
from ember.bench.peers.arms import vm_hwm_mib

LLAMA_CPP_FTYPES = {"F32": None, "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def build(job: dict) -> None:
    out = Path(job["out"])
    if job["engine"] == "ember":
        from ember.compiler.compile import CompileOptions, compile_decoder

        compile_decoder(job["hf"], out, CompileOptions(quiet=True, **job["options"]))
    elif job["engine"] == "llama.cpp":
        from ember.bench.peers.gguf_llama import write_llama_gguf

        out.mkdir(parents=True, exist_ok=True)
        ftype = job["peer_precision"]
        f32 = write_llama_gguf(Path(job["hf"]), out / "model-F32.gguf")
        if LLAMA_CPP_FTYPES[ftype] is not None:
            import ctypes

            import llama_cpp as L

            params = L.llama_model_quantize_default_params()
            params.ftype = getattr(L, LLAMA_CPP_FTYPES[ftype])
            rc = L.llama_model_quantize(str(f32).encode(), str(out / f"model-{ftype}.gguf").encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {ftype} returned {rc}")
            f32.unlink()
    else:
        raise ValueError(f"no in-process build for engine {job['engine']!r}")


def engine_path(job: dict) -> str:
    if job["engine"] == "llama.cpp":
        return str(next(Path(job["out"]).glob("*.gguf")))
    return job["out"]


def run(job: dict) -> None:
    from ember.bench.peers.runners import make_runner

    w = job["workload"]
    rng = np.random.default_rng(w["seed"])
    ids = lambda n: rng.integers(1, w["vocab_size"], n).tolist()  # noqa: E731 - 0 is the eos id
    p1, pb, pp = ids(w["prompt_len"]), [ids(w["prompt_len"]) for _ in range(w["batch"])], ids(w["pp_len"])
    r = make_runner(job["engine"], engine_path(job), w["batch"], w["threads"],
                    max(w["prompt_len"], w["pp_len"]) + w["new_tokens"] + 8)
    r.generate([p1], 4), r.generate(pb, 2)  # warm-up: first-call allocations out of the timings
    b1 = [r.generate([p1], w["new_tokens"]) for _ in range(w["reps"])]
    pre = [r.generate([pp], 1)[0] for _ in range(w["reps"])]
    bb = [r.generate(pb, w["new_tokens"])[0] for _ in range(w["reps"])]
    decode, e2e = tm.batch_tok_s(bb)
    result = {"b1_ms_per_token": tm.b1_ms_per_token([t for t, _ in b1]), "batch_decode_tok_s": decode,
              "batch_e2e_tok_s": e2e, "prompt_tok_s": tm.prompt_tok_s(pre), "b1_tokens": b1[-1][1],
              "peak_rss_mib": vm_hwm_mib()}
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    {"build": build, "run": run}[mode](json.loads(Path(path).read_text()))
