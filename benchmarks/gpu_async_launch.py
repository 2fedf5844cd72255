"""Does a GPU launch return before the device finishes? Host time of
``DeviceExecutor.launch_greedy`` (the step, the argmax and the tokens' copy queued) against the
time until ``result()`` (the tokens on the host), for a batch-32 decode of an engine folder,
with and without CUDA graphs and asynchronous launches (``EMBER_ASYNC_LAUNCH``). The gap is
what the engine can spend streaming the previous step's tokens (docs/scheduler.md).

    python benchmarks/gpu_async_launch.py artifacts/llama-1b-fp16 [--out benchmarks/results] [--suffix _h200]
Writes gpu_async_launch{suffix}.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def measure(folder: str, batch: int = 32, steps: int = 50, warmup: int = 10) -> dict:
    import torch

    from ember.engine_format.manifest import read_manifest
    from ember.runtime.cuda_session import make_cuda_executor

    m = read_manifest(folder)
    out = {"device": torch.cuda.get_device_name(0), "batch": batch, "steps": steps, "arms": {}}
    before = os.environ.get("EMBER_ASYNC_LAUNCH")
    for graphs in (True, False):
        for async_launch in ("1", "0"):
            os.environ["EMBER_ASYNC_LAUNCH"] = async_launch
            ex = make_cuda_executor(folder, m, m.part("step"), "cuda:0", batch, 1024, cuda_graph=graphs,
                                    decode_part=m.find_part("decode"))
            ids, pos = np.ones((batch, 8), np.int64), np.tile(np.arange(8), (batch, 1))
            ex.launch_greedy(0, ids, pos, np.full(batch, 8, np.int64)).result()  # prefill 8 tokens per row
            launch, total = [], []
            for i in range(warmup + steps):
                pos = ex.pool.lengths[:batch].reshape(batch, 1).copy()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pending = ex.launch_greedy(0, np.ones((batch, 1), np.int64), pos, np.ones(batch, np.int64))
                t1 = time.perf_counter()
                pending.result()
                t2 = time.perf_counter()
                if i >= warmup:
                    launch.append(t1 - t0)
                    total.append(t2 - t0)
            out["arms"][f"cuda_graphs={'on' if graphs else 'off'}, async_launch={async_launch}"] = {
                "launch_ms": float(np.median(launch) * 1e3), "to_result_ms": float(np.median(total) * 1e3)}
            del ex
    if before is None:
        os.environ.pop("EMBER_ASYNC_LAUNCH", None)
    else:
        os.environ["EMBER_ASYNC_LAUNCH"] = before
    return out


def markdown(doc: dict) -> str:
    rows = "\n".join(f"| {k} | {v['launch_ms']:.3f} | {v['to_result_ms']:.3f} | {v['to_result_ms'] - v['launch_ms']:.3f} |"
                     for k, v in doc["arms"].items())
    return (f"# Asynchronous launches: {doc['device']}\n\nBatch-{doc['batch']} decode steps of the engine's GPU executor "
            f"(fused decode part), median of {doc['steps']}.\n\n| arm | launch returns ms | tokens on host ms | "
            f"host time free ms |\n|---|---:|---:|---:|\n{rows}\n\nReproduce: `python benchmarks/gpu_async_launch.py FOLDER`\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--suffix", default="")
    a = ap.parse_args()
    doc = measure(a.folder)
    out = Path(a.out)
    (out / f"gpu_async_launch{a.suffix}.json").write_text(json.dumps(doc, indent=1))
    (out / f"gpu_async_launch{a.suffix}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
