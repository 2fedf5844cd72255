"""What crosses to the host per decode step on a GPU (issue 6): the full logits [B, V] plus a
host argmax (``logits_to_host``), against the argmax on the device with only the B tokens
copied back (``greedy_to_host``, what the engine does for greedy rows), and with one sampled
row's logits as well. llama-1b's vocabulary (32000), fp32 logits, median of 200 calls.

    python benchmarks/gpu_greedy_transfer.py [--out benchmarks/results/gpu_greedy_transfer]
    python benchmarks/gpu_greedy_transfer.py --render RESULT.json   # the markdown of a saved run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(batches=(1, 32, 128), vocab: int = 32000, calls: int = 200) -> dict:
    import torch

    from ember.runtime.cuda_session import greedy_to_host, logits_to_host

    res = {"device": torch.cuda.get_device_name(0), "vocab": vocab, "rows": []}
    for b in batches:
        x = torch.randn(b, vocab, device="cuda")
        for _ in range(20):
            logits_to_host(x).argmax(axis=1)
            greedy_to_host(x)
        row = {"batch": b}
        for name, fn in (("full_logits_ms", lambda: logits_to_host(x).argmax(axis=1)),
                         ("device_argmax_ms", lambda: greedy_to_host(x)),
                         ("device_argmax_plus_one_row_ms", lambda: greedy_to_host(x, [0]))):
            ts = []
            for _ in range(calls):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            row[name] = round(1e3 * float(np.median(ts)), 4)
        assert (logits_to_host(x).argmax(axis=1) == greedy_to_host(x)[0]).all()
        res["rows"].append(row)
    return res


def markdown(res: dict) -> str:
    md = [f"# Logits to the host vs argmax on the device — {res['device']}", "",
          f"Vocabulary {res['vocab']}, fp32 logits already on the device; ms per decode step (median).", "",
          "| batch | full logits + host argmax | device argmax (B tokens) | device argmax + one sampled row |",
          "|---:|---:|---:|---:|"]
    for r in res["rows"]:
        md.append(f"| {r['batch']} | {r['full_logits_ms']:.3f} | {r['device_argmax_ms']:.3f} | "
                  f"{r['device_argmax_plus_one_row_ms']:.3f} |")
    md += ["", "Reproduce: `python benchmarks/gpu_greedy_transfer.py` (needs a CUDA build of torch)."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_greedy_transfer"))
    ap.add_argument("--render", help="write the JSON + markdown of a saved run's JSON instead of measuring")
    a = ap.parse_args()
    res = json.loads(Path(a.render).read_text()) if a.render else measure()
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
