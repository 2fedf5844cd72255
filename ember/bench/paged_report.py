"""Issue 19's serving workloads: the report of a run (``paged_serve.run_workloads``' document):
each workload's comparisons (``derived``), issue 19's targets (``verdicts``) and the markdown."""
from __future__ import annotations

from ember.bench.paged_workloads import GENAI

# issue 19's targets: (workload, the ratio's key, the least it must be)
TARGETS = (("prefix", "ttft_median_off_over_on", 5.0), ("mixed", "running_peak_paged_over_slots", 3.0),
           ("mixed", "tok_per_s_paged_over_slots", 1.3))


def tokens_equal(arms: dict[str, dict], reference: str) -> dict[str, str]:
    """Per arm that ran: how many requests got ``reference``'s greedy tokens ('k/n')."""
    ref = arms.get(reference, {}).get("tokens")
    if ref is None:
        return {}
    return {name: f"{sum(a == b for a, b in zip(r['tokens'], ref))}/{len(ref)}"
            for name, r in arms.items() if name != reference and "tokens" in r}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def derived(workload: str, arms: dict[str, dict]) -> dict:
    """The workload's comparisons (ratios and token agreement) from its arms' results."""
    ok = {k: v for k, v in arms.items() if "error" not in v and "skipped" not in v}
    get = lambda arm, *keys: _dig(ok.get(arm), keys)  # noqa: E731
    out: dict = {"tokens_equal_to": {}}
    if workload == "prefix":
        out["ttft_median_off_over_on"] = _ratio(get("paged cache off", "ttft_ms", "p50"),
                                                get("paged cache on", "ttft_ms", "p50"))
        out["ttft_p90_off_over_on"] = _ratio(get("paged cache off", "ttft_ms", "p90"),
                                             get("paged cache on", "ttft_ms", "p90"))
        out["tokens_equal_to"]["paged cache on"] = tokens_equal(ok, "paged cache on")
    elif workload == "mixed":
        for arm in [a for a in arms if a.startswith("paged")]:  # "paged", then "paged int8 KV"...
            tag = arm.replace(" KV", "").replace(" ", "_")
            out[f"running_peak_{tag}_over_slots"] = _ratio(get(arm, "stats", "running_peak"),
                                                           get("slots", "stats", "running_peak"))
            out[f"tok_per_s_{tag}_over_slots"] = _ratio(get(arm, "tok_per_s"), get("slots", "tok_per_s"))
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    elif workload == "ttft1":
        out["ttft_median_paged_over_genai"] = _ratio(get("paged", "ttft_ms", "p50"), get(GENAI, "ttft_ms", "p50"))
        out["ttft_median_slots_over_genai"] = _ratio(get("slots", "ttft_ms", "p50"), get(GENAI, "ttft_ms", "p50"))
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    else:
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    return out


def _dig(d: dict | None, keys: tuple) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def verdicts(doc: dict) -> list[str]:
    """One line per issue 19 target whose workload ran: the number, the target, met or not."""
    lines = []
    for workload, key, least in TARGETS:
        w = doc["workloads"].get(workload)
        if w is None:
            continue
        v = w.get("derived", {}).get(key)
        verdict = "not measured (an arm failed or was skipped)" if v is None else \
            f"{v:.2f} (target >= {least:g}): {'met' if v >= least else 'NOT met'}"
        lines.append(f"- {workload} {key}: {verdict}")
    ttft = doc["workloads"].get("ttft1", {}).get("derived", {}).get("ttft_median_paged_over_genai")
    if ttft is not None:
        lines.append(f"- ttft1 paged TTFT / ONNX Runtime GenAI's: {ttft:.2f} (target <= 1): "
                     f"{'met' if ttft <= 1 else 'NOT met'}")
    return lines


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = {  # workload -> (header, value of an arm's result)
    "burst": (("burst s", lambda r: _f(r.get("wall_s"), ".2f")), ("tok/s", lambda r: _f(r.get("tok_per_s"), ".0f")),
              ("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".1f")),
              ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".1f")),
              ("prompt tokens computed", lambda r: _f(_dig(r, ("stats", "prefill_tokens_total")), "d"))),
    "prefix": (("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".1f")),
               ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".1f")),
               ("burst s", lambda r: _f(r.get("wall_s"), ".2f")),
               ("prompt tokens computed", lambda r: _f(_dig(r, ("stats", "prefill_tokens_total")), "d")),
               ("prefix cache hits", lambda r: _f(_dig(r, ("stats", "prefix_cache_hits_total")), "d"))),
    "mixed": (("max_batch", lambda r: _f(_dig(r, ("stats", "max_batch")), "d")),
              ("KV positions", lambda r: _f(_dig(r, ("stats", "kv_capacity_tokens")), "d")),
              ("running peak", lambda r: _f(_dig(r, ("stats", "running_peak")), "d")),
              ("running mean", lambda r: _f(r.get("running_mean_polled"), ".1f")),
              ("preemptions", lambda r: _f(_dig(r, ("stats", "preemptions_total")), "d")),
              ("output tok/s", lambda r: _f(r.get("tok_per_s"), ".0f")),
              ("burst s", lambda r: _f(r.get("wall_s"), ".2f")),
              ("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".0f"))),
    "ttft1": (("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".2f")),
              ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".2f")),
              ("decode ms/token", lambda r: _f(r.get("decode_ms_per_token"), ".2f"))),
}
MEMORY = (("device used after load MiB", lambda r: _f(r.get("device_used_after_load_mib"), ".0f")),
          ("device peak MiB", lambda r: _f(r.get("device_peak_mib"), ".0f")),
          ("peak / (weights + KV held)", lambda r: _f(r.get("peak_over_weights_and_kv"), ".2f")))


def workload_table(workload: str, arms: dict[str, dict], memory: bool = True) -> list[str]:
    """The workload's markdown table: one row per arm (a failed or skipped arm says why); ``memory``:
    the device memory columns."""
    cols = COLUMNS[workload] + (MEMORY if memory else ())
    lines = ["| arm | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in arms.items():
        why = r.get("error") or r.get("skipped")
        if why:
            kind = "error" if "error" in r else "skipped"
            lines.append(f"| {name} | {kind}: {str(why)[:200]} |" + " |" * (len(cols) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(cell(r) for _, cell in cols) + " |")
    return lines


HEADLINES = {
    "burst": "{requests} requests at once, each a shared {system}-token system prompt + {own} own tokens, {new} new "
             "tokens.",
    "prefix": "{prefix_requests} requests at once, each a shared {prefix_system}-token system prompt + {prefix_own} "
              "own tokens, {prefix_new} new tokens; the paged arms share one block pool that holds every request "
              "unshared.",
    "mixed": "{mixed_requests} requests at once, prompts {mixed_prompt} tokens, outputs {mixed_output} tokens "
             "(seed {seed}); one KV budget for both arms (below). Running peak: the engine's `running_peak` (the "
             "most sequences running at once; the {mixed_warm}-request warm-up included); running mean: polled every "
             "10 ms over the timed burst; output tok/s: every output token over the burst's wall time.",
    "ttft1": "{ttft_requests} requests one at a time, prompts of {ttft_prompt} tokens, {ttft_new} new tokens, after "
             "{ttft_warm} warm-up requests; TTFT from the call (ONNX Runtime GenAI: from `append_tokens`, its "
             "`Generator` made before the clock starts), decode ms/token after the first token.",
}


def markdown(doc: dict) -> str:
    """The whole report: a section per workload that ran, then issue 19's targets."""
    s = doc["sizes"]
    md = [f"# Paged KV serving workloads (issue 19) -- {doc['model']} on {doc['device_name']}", "",
          f"Machine: {doc['machine_line']}.", f"Model: {doc['model_line']}.", ""]
    for workload, w in doc["workloads"].items():
        md += [f"## {workload}", "", HEADLINES[workload].format(**s)]
        if workload == "mixed" and "budget_bytes" in w:
            md.append(f"KV budget {w['budget_bytes'] / 2**20:.2f} MiB = {s['mixed_slots']} slot rows x {w['seq_len']} "
                      f"positions x {doc['token_bytes']} bytes per token; the paged arm's block pool has the same "
                      f"bytes.")
        if workload in ("burst", "prefix") and doc.get("cuda", True):
            md.append("Device memory: the whole device's use seen by the arm's process (CUDA context included); "
                      "`peak / (weights + KV held)` divides its growth from before the load by the paged graph's "
                      "weights plus the KV the burst holds at most (the system prompt once where it is shared; the "
                      "slot engine loads the step graph and the fused decode part, two copies of the weights).")
        if "error" in w:
            md.append(f"Workload failed: {w['error'][:300]}")
        md += [""] + workload_table(workload, w.get("arms", {}), memory=doc.get("cuda", True)) + [""]
        d = w.get("derived", {})
        for key, v in d.items():
            if key == "tokens_equal_to":
                for ref, eq in v.items():
                    if eq:
                        md.append(f"Requests whose greedy tokens equal the {ref} arm's: "
                                  + ", ".join(f"{k} {n}" for k, n in eq.items()) + ".")
            elif v is not None:
                md.append(f"{key}: {v:.2f}.")
        md.append("")
    lines = verdicts(doc)
    if lines:
        md += ["## Targets (issue 19)", "", *lines, ""]
    md.append(f"Reproduce: `{doc['command']}`")
    return "\n".join(md) + "\n"
