"""Write a ``run_serve`` result as JSON + a markdown table + a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path


def _ms(d: dict, key: str, p: str) -> str:
    v = d[key][p]
    return "-" if v is None else f"{v * 1000:.0f}"


def _s(d: dict, key: str, p: str) -> str:
    v = d[key][p]
    return "-" if v is None else f"{v:.1f}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# {doc['name']}: {doc['model']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, onnxruntime {m['onnxruntime']}.  ",
             f"Options: {doc['options']}.  ", f"Wall time of the whole run: {doc['wall_s']:.0f} s.", ""]
    by_rate: dict = {}
    for r in doc["runs"]:
        by_rate.setdefault(r["rate"], []).append(r)
    for rate, runs in by_rate.items():
        lines += [f"## {runs[0]['workload']}", "",
                  "| arm | total s | vs fused | out tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p99 ms "
                  "| e2e p50/p90/p99 s | peak RSS MiB (at start) | done |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        fused = next((r for r in runs if r["arm"] == "ember-fused"), None)
        for r in runs:
            est = "~" if r["extrapolated"] else ""
            ratio = f"{r['total_s'] / fused['total_s']:.2f}x" if fused else "-"
            lines.append(
                f"| {r['arm']} | {est}{r['total_s']:.1f} | {ratio} | {r['output_tok_s']:.1f} | {r['req_s']:.3f} "
                f"| {_ms(r, 'ttft', 'p50')}/{_ms(r, 'ttft', 'p99')} | {_ms(r, 'tpot', 'p50')}/{_ms(r, 'tpot', 'p99')} "
                f"| {_ms(r, 'itl', 'p99')} | {_s(r, 'e2e', 'p50')}/{_s(r, 'e2e', 'p90')}/{_s(r, 'e2e', 'p99')} "
                f"| {r['peak_rss_mib']:.0f} ({r.get('rss_at_start_mib', 0):.0f}) | {r['completed']}/{r['requests']} |")
        lines.append("")
        bound = batching_bound(runs)
        if bound is not None:
            lines += [f"Per-token cost bound from this table: {bound['requests']} requests x TPOT p50 of the one-slot "
                      f"sequential arm ({bound['tpot_one_ms']:.1f} ms) / TPOT p50 of the fused arm at "
                      f"{bound['requests']} rows ({bound['tpot_fused_ms']:.1f} ms) = **{bound['bound']:.1f}x**: the most "
                      f"batching can cut the decode time of one-request-at-a-time serving on this machine (prefill aside).", ""]
    if any(r["extrapolated"] for r in doc["runs"]):
        lines += ["`~`: the arm hit its time cap; total time = measured time x planned tokens / produced tokens "
                  "(its latency columns cover the requests that completed).", ""]
    lines += ["Peak RSS is the whole process's (weights included), sampled during the arm; all arms share one "
              "process, so the RSS at the arm's start is shown in brackets.", "", "Notes per arm:", ""]
    for arm, note in dict((r["arm"], r["notes"]) for r in doc["runs"]).items():
        lines.append(f"- **{arm}**: {note}")
    return "\n".join(lines) + "\n"


def batching_bound(runs: list[dict]) -> dict | None:
    """For an all-at-once workload with fused and sequential arms: N x TPOT(one slot) / TPOT(N
    rows fused), the ratio per-token step costs allow batching N requests to gain over running
    them one at a time (concurrent instances on a shared device do no better than one at a
    time); None when the table lacks them."""
    fused = next((r for r in runs if r["arm"] == "ember-fused"), None)
    one = next((r for r in runs if r["arm"] == "sequential"), None)
    if fused is None or one is None or fused["rate"] is not None:
        return None
    tf, t1 = fused["tpot"]["p50"], one["tpot"]["p50"]
    if not tf or not t1:
        return None
    n = fused["requests"]
    return {"requests": n, "tpot_one_ms": t1 * 1e3, "tpot_fused_ms": tf * 1e3, "bound": n * t1 / tf}


def _nan(v: float | None, scale: float = 1.0) -> float:
    return float("nan") if v is None else v * scale


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in doc["runs"]))
    rates = [r for r in dict.fromkeys(r["rate"] for r in doc["runs"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if len(rates) > 1:  # latency vs rate (saturating "inf" plotted at the right edge)
        finite = [r for r in rates if r is not None]
        top = max(finite) * 2 if finite else 1.0
        x_of = {r: (top if r is None else r) for r in rates}
        for arm in arms:
            rs = [r for r in doc["runs"] if r["arm"] == arm]
            xs = [x_of[r["rate"]] for r in rs]
            axes[0].plot(xs, [r["output_tok_s"] for r in rs], "o-", label=arm)
            axes[1].plot(xs, [_nan(r["tpot"]["p99"], 1000) for r in rs], "o-", label=arm)
            axes[2].plot(xs, [_nan(r["e2e"]["p99"]) for r in rs], "o-", label=arm)
        for ax in axes:
            ax.set_xlabel("arrival rate (req/s)" + (f"; {top:g} = all at once" if None in rates else ""))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("output tokens/s")
        axes[1].set_ylabel("p99 TPOT (ms)")
        axes[2].set_ylabel("p99 end-to-end latency (s)")
    else:
        rs = [r for r in doc["runs"]]
        names = [r["arm"] for r in rs]
        axes[0].bar(names, [r["total_s"] for r in rs], color=["C1" if r["extrapolated"] else "C0" for r in rs])
        axes[0].set_ylabel("total time (s; orange = extrapolated)")
        axes[1].bar(names, [r["output_tok_s"] for r in rs])
        axes[1].set_ylabel("output tokens/s")
        axes[2].bar(names, [_nan(r["tpot"]["p99"], 1000) for r in rs])
        axes[2].set_ylabel("p99 TPOT (ms; none = no request completed)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8) if len(rates) > 1 else None
    fig.suptitle(f"{doc['name']}: {doc['model']} on {doc['machine']['cpu']} ({doc['machine']['cores']} cores)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: dict, stem: str | Path) -> list[Path]:
    """Write ``stem``.json, .md and .png; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(doc, indent=1))
    paths[1].write_text(markdown(doc))
    plot(doc, paths[2])
    return paths
