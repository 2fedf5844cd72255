"""Issue 19's serving workloads (ember/bench/paged_*.py, ``ember bench paged``,
benchmarks/gpu_paged_serve.py): the arms' budgets are honest (sized through the real scheduler
builder), the requests are what the workload says, an arm's runs on a real tiny engine count what
they claim, the report marks failures and targets, the benchmark's CPU smoke path and the CLI on
a compiled folder run two workloads end to end, and a folder without the paged graph has its
paged arms skipped with the reason."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import ember
from ember.bench.paged_report import derived, markdown
from ember.bench.paged_workloads import (GENAI, SIZES, WORKLOADS, kv_held_tokens, memory_ratio, mixed_lengths,
                                         parse_workloads, plan_arms, run_burst, run_sequential)
from ember.bench.peers.runners import EmberRunner
from ember.bench.workload import LengthDist
from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError
from ember.runtime.engine_builder import SchedulerOptions, make_scheduler

LLAMA_1B = KVGeometry(22, 4, 64)  # layers, KV heads, head_dim
ROOT = Path(__file__).resolve().parents[1]


def scheduler_of(load: dict, max_positions: int):
    opts = {k: v for k, v in load.items() if k in ("max_batch", "kv_memory", "kv_layout", "kv_block_size",
                                                    "prefix_caching")}
    return make_scheduler(SchedulerOptions(**opts), max_positions=max_positions, geometry=LLAMA_1B,
                          kv_dtype="float16", device="cuda:0")


def test_mixed_arms_get_the_same_kv_bytes_and_slots_fit_the_longest_request():
    s = SIZES["cuda"]
    slots, paged = plan_arms("mixed", s, 32000, LLAMA_1B, 2)
    longest = s.mixed_prompt.hi + s.mixed_output.hi  # 2,560
    assert slots.load["kv_memory"] == paged.load["kv_memory"] == s.mixed_slots * longest * 2 * 22 * 4 * 64 * 2
    slot_sched, paged_sched = scheduler_of(slots.load, longest), scheduler_of(paged.load, longest)
    assert (slot_sched.max_batch, slot_sched.max_seq_len) == (s.mixed_slots, longest)  # today's pool, no more
    assert paged_sched.kv_capacity_tokens == s.mixed_slots * longest  # the same tokens, in blocks
    assert paged_sched.max_batch == s.mixed_max_batch > s.mixed_slots  # blocks, not max_batch, bound it
    assert slots.timed == paged.timed and len(slots.timed) == s.mixed_requests and slots.warm != slots.timed
    *_, int8 = plan_arms("mixed", s, 32000, LLAMA_1B, 2, kv_dtypes=("int8",))
    assert (int8.name, int8.kv_dtype) == ("paged int8 KV", "int8")  # same bytes, other folder
    assert int8.load == paged.load and paged.load["kv_block_size"] == 256  # the CUDA default for every pool
    got = derived("mixed", {"slots": {"stats": {"running_peak": 16}, "tok_per_s": 100.0},
                            "paged": {"stats": {"running_peak": 32}, "tok_per_s": 150.0},
                            "paged int8 KV": {"stats": {"running_peak": 64}, "tok_per_s": 160.0}})
    assert (got["running_peak_paged_over_slots"], got["running_peak_paged_int8_over_slots"]) == (2.0, 4.0)
    assert got["tok_per_s_paged_int8_over_slots"] == 1.6


def test_mixed_requests_are_seeded_and_span_their_ranges():
    reqs = mixed_lengths(1000, 400, LengthDist(16, 2048), LengthDist(16, 512), seed=3)
    assert reqs == mixed_lengths(1000, 400, LengthDist(16, 2048), LengthDist(16, 512), seed=3)
    plen, new = [len(r.prompt) for r in reqs], [r.new for r in reqs]
    assert 16 <= min(plen) < 200 and 1900 < max(plen) <= 2048 and 16 <= min(new) < 60 and 470 < max(new) <= 512
    assert reqs != mixed_lengths(1000, 400, LengthDist(16, 2048), LengthDist(16, 512), seed=4)


def test_prefix_arms_differ_only_in_prefix_caching_and_hold_every_request_unshared():
    s = SIZES["cuda"]
    on, off, slots = plan_arms("prefix", s, 32000, LLAMA_1B, 2)
    assert off.load == {**on.load, "prefix_caching": False} and "prefix_caching" not in on.load
    assert {len(r.prompt) for r in on.timed} == {1024 + 16} and len(on.timed) == 64
    assert len({tuple(r.prompt[:1024]) for r in on.timed}) == 1 and len({tuple(r.prompt) for r in on.timed}) == 64
    assert on.warm[0].prompt[:1024] != on.timed[0].prompt[:1024]  # the warm-up caches another system prompt
    paged_sched = scheduler_of(off.load, 2560)
    assert paged_sched.kv_capacity_tokens >= 64 * (1024 + 16 + 16)  # cache off costs compute, not admission
    assert on.load["kv_block_size"] == 256  # the engine's default on CUDA for llama-1b's FP16 pool (head size 64)
    assert scheduler_of(slots.load, 2560).max_seq_len == 5 * 256  # the same bytes: 1,056 positions in whole blocks
    small = plan_arms("prefix", replace(s, kv_block_size=16), 32000, LLAMA_1B, 2)[2]
    assert scheduler_of(small.load, 2560).max_seq_len == 1024 + 16 + 16
    big = plan_arms("prefix", replace(s, kv_block_size=64), 32000, LLAMA_1B, 2)[1]  # 1,056 positions: 16.5 blocks
    assert big.load["kv_block_size"] == 64 and scheduler_of(big.load, 2560).blocks.num_blocks == 64 * 17


def test_ttft1_prompts_are_distinct_so_no_prefix_is_cached():
    arms = plan_arms("ttft1", SIZES["cuda"], 32000, LLAMA_1B, 2)
    assert [a.name for a in arms] == ["slots", "paged", GENAI] and all(a.sequential for a in arms)
    prompts = [tuple(r.prompt[:16]) for r in arms[1].warm + arms[1].timed]
    assert len(set(prompts)) == len(prompts) == 23 and {len(r.prompt) for r in arms[1].timed} == {128}


def test_smoke_sizes_fit_llama_tiny_and_workload_names_are_checked():
    assert SIZES["cpu"].positions(WORKLOADS) <= 256
    assert SIZES["cuda"].positions(["mixed"]) == 2560 and SIZES["cuda"].positions(["ttft1"]) == 192
    assert parse_workloads("prefix, mixed") == ["prefix", "mixed"]
    with pytest.raises(InputError, match="burst, prefix, mixed, ttft1"):
        parse_workloads("prefix,mixd")


def test_burst_and_sequential_runs_count_what_they_claim(llama_tiny):
    s = replace(SIZES["cpu"], mixed_requests=6, mixed_warm=2, mixed_prompt=LengthDist(4, 40),
                mixed_output=LengthDist(2, 12), ttft_requests=3)
    timed = plan_arms("mixed", s, 512, LLAMA_1B, 2)[0].timed
    with ember.load(llama_tiny, max_batch=4, verify="size") as eng:
        res = run_burst(eng, timed[:2], timed, poll_s=0.001)
        peak = eng.stats()["running_peak"]
        seq = run_sequential(EmberRunner.over(eng), timed[:1], timed)
    assert [len(t) for t in res["tokens"]] == [r.new for r in timed]
    assert res["output_tokens"] == sum(r.new for r in timed) and res["tok_per_s"] > 0
    assert 0 < res["ttft_ms"]["p50"] <= res["ttft_ms"]["p90"] and res["running_max_polled"] <= peak == 4
    assert seq["tokens"] == res["tokens"]  # alone or in the burst: the same greedy tokens
    assert seq["decode_ms_per_token"] > 0 and seq["ttft_ms"]["p50"] > 0


def report_doc(prefix_arms: dict, mixed_arms: dict) -> dict:
    workloads = {w: {"arms": arms, "derived": derived(w, arms)} for w, arms in (("prefix", prefix_arms),
                                                                                 ("mixed", mixed_arms))}
    return {"model": "m", "device_name": "GPU", "machine_line": "host", "model_line": "tiny", "token_bytes": 4,
            "sizes": SIZES["cuda"].record(), "command": "python benchmarks/gpu_paged_serve.py", "workloads": workloads}


def test_report_computes_the_ratios_and_marks_failed_arms():
    t = [[1, 2], [3, 4]]
    prefix = {"paged cache on": {"ttft_ms": {"p50": 10.0, "p90": 20.0}, "tokens": t},
              "paged cache off": {"ttft_ms": {"p50": 60.0, "p90": 80.0}, "tokens": [[1, 2], [3, 5]]},
              "slots": {"error": "RuntimeError: out of memory"}}
    mixed = {"slots": {"stats": {"running_peak": 16}, "tok_per_s": 1000.0, "tokens": t},
             "paged": {"stats": {"running_peak": 40}, "tok_per_s": 1200.0, "tokens": t}}
    doc = report_doc(prefix, mixed)
    assert doc["workloads"]["prefix"]["derived"]["ttft_median_off_over_on"] == 6.0
    assert doc["workloads"]["prefix"]["derived"]["tokens_equal_to"] == {"paged cache on": {"paged cache off": "1/2"}}
    md = markdown(doc)
    assert "| slots | error: RuntimeError: out of memory |" in md
    assert "prefix ttft_median_off_over_on: 6.00 (target >= 5): met" in md
    assert "mixed running_peak_paged_over_slots: 2.50 (target >= 3): NOT met" in md
    assert "mixed tok_per_s_paged_over_slots: 1.20 (target >= 1.3): NOT met" in md
    assert "| paged cache off | 60.0 | 80.0 |" in md
    failed = report_doc({"paged cache on": {"error": "x"}, "paged cache off": {"ttft_ms": {"p50": 1.0}}}, {})
    assert "prefix ttft_median_off_over_on: not measured (an arm failed or was skipped)" in markdown(failed)


def test_the_benchmark_smoke_run_writes_every_workload_it_ran(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_paged_serve.py"), "--device", "cpu", "--out", str(out),
           "--workdir", str(tmp_path / "work"), "--workloads", "prefix,mixed", "--prefix-requests", "4",
           "--prefix-system", "32", "--mixed-requests", "8", "--mixed-prompt", "4:16", "--mixed-output", "4:16",
           "--mixed-slots", "2", "--name", "smoke"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[gpu_paged_serve t=" in run.stdout and "== mixed" in run.stdout  # progress lines
    doc = json.loads((out / "smoke.json").read_text())
    prefix, mixed = doc["workloads"]["prefix"]["arms"], doc["workloads"]["mixed"]["arms"]
    assert not [a for a in (*prefix.values(), *mixed.values()) if "error" in a]
    on, off = prefix["paged cache on"]["stats"], prefix["paged cache off"]["stats"]
    assert off["prefix_cache_hits_total"] == 0 < on["prefix_cache_hits_total"]
    assert on["prefill_tokens_total"] < off["prefill_tokens_total"] == 2 * 4 * (32 + 8)  # warm-up + timed bursts
    assert doc["workloads"]["prefix"]["derived"]["tokens_equal_to"]["paged cache on"]["paged cache off"] == "4/4"
    # 2 slot rows of 32 positions = 4 blocks of 16, each prompt fits one: up to 4 sequences admitted
    assert mixed["slots"]["stats"]["kv_capacity_tokens"] == mixed["paged"]["stats"]["kv_capacity_tokens"] == 2 * 32
    assert mixed["paged"]["stats"]["running_peak"] > mixed["slots"]["stats"]["running_peak"] == 2
    assert doc["sizes"]["mixed_prompt"] == "U[4,16]" and "## mixed" in (out / "smoke.md").read_text()


def test_kv_held_counts_the_system_prompt_once_only_where_it_is_shared():
    s = SIZES["cuda"]
    on, off, slots = plan_arms("prefix", s, 32000, LLAMA_1B, 2)
    assert kv_held_tokens("prefix", on, s) == 1024 + 64 * 32
    assert kv_held_tokens("prefix", off, s) == kv_held_tokens("prefix", slots, s) == 64 * (1024 + 32)
    burst_slots, burst_paged = plan_arms("burst", s, 32000, LLAMA_1B, 2)
    assert kv_held_tokens("burst", burst_paged, s) == 256 + 32 * 96 and kv_held_tokens("mixed", burst_paged, s) is None
    res = {"device_peak_mib": 3000.0, "device_used_before_load_mib": 500.0}
    assert memory_ratio(res, 2 * 2**30, 2**29) == pytest.approx(2500 / 2560)


# -- ember bench paged ----------------------------------------------------------------------
TINY = ["--prefix-requests", "4", "--prefix-system", "32", "--mixed-requests", "8", "--mixed-prompt", "4:16",
        "--mixed-output", "4:16", "--mixed-slots", "2", "--kv-block-size", "8"]


def test_cli_runs_prefix_and_mixed_on_a_compiled_folder(llama_tiny_paged, tmp_path, capsys):
    from ember.cli import main

    stem = tmp_path / "paged"
    assert main(["bench", "paged", str(llama_tiny_paged), "--workloads", "prefix,mixed", *TINY, "-o", str(stem)]) == 0
    doc = json.loads(stem.with_suffix(".json").read_text())
    prefix, mixed = doc["workloads"]["prefix"], doc["workloads"]["mixed"]
    assert list(prefix["arms"]) == ["paged cache on", "paged cache off", "slots"]
    assert list(mixed["arms"]) == ["slots", "paged"]
    assert not [a for a in (*prefix["arms"].values(), *mixed["arms"].values()) if "error" in a or "skipped" in a]
    on, off = prefix["arms"]["paged cache on"]["stats"], prefix["arms"]["paged cache off"]["stats"]
    assert off["prefix_cache_hits_total"] == 0 < on["prefix_cache_hits_total"] and on["kv_block_size"] == 8
    # the prefix cache changes no token
    assert prefix["derived"]["tokens_equal_to"]["paged cache on"]["paged cache off"] == "4/4"
    assert prefix["derived"]["ttft_median_off_over_on"] > 0 and prefix["derived"]["ttft_p90_off_over_on"] > 0
    assert mixed["derived"]["running_peak_paged_over_slots"] > 1 and mixed["derived"]["tok_per_s_paged_over_slots"] > 0
    # the budget is the folder's own: 2 slot rows x 32 positions x its bytes per token (FP16 llama-tiny: 256)
    assert mixed["budget_bytes"] == 2 * 32 * doc["token_bytes"] == 2 * 32 * 2 * 2 * 2 * 16 * 2
    md = stem.with_suffix(".md").read_text()
    assert "## prefix" in md and "## mixed" in md and md in capsys.readouterr().out
    assert doc["command"].startswith(f"ember bench paged {llama_tiny_paged} --device cpu --workloads prefix,mixed")
    assert "--mixed-prompt=4:16" in doc["command"]  # as typed: the command reruns


def test_cli_checks_the_folder_before_it_runs(llama_tiny, tmp_path, capsys):
    from ember.cli import main

    folder = str(llama_tiny)
    assert main(["bench", "paged", folder, "--workloads", "prefix", "--prefix-system", "300"]) == 2
    err = capsys.readouterr().err
    assert folder in err and "holds 256 positions" in err and "--prefix-system" in err
    assert main(["bench", "paged", folder, "--workloads", "ttft1", "--genai-folder", str(tmp_path)]) == 2
    assert "no genai_config.json" in capsys.readouterr().err


def test_paged_arms_of_a_folder_without_the_paged_graph_are_skipped_on_cuda(llama_tiny, tmp_path):
    from ember.bench.paged_serve import PagedRun, run_workloads

    sizes = replace(SIZES["cpu"], prefix_requests=2, prefix_system=16, prefix_own=4, prefix_new=2)
    run = PagedRun(llama_tiny, ("prefix",), sizes, device="cuda:0")
    ran = []  # the slot arm's process: no arm of the paged layout starts one
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ember.bench.paged_serve.run_arm", lambda folder, genai, w, arm, *a: ran.append(arm.name) or {})
        doc = run_workloads(run, {"command": "test"}, log=lambda _: None)
    arms = doc["workloads"]["prefix"]["arms"]
    assert ran == ["slots"]
    for name in ("paged cache on", "paged cache off"):
        assert str(llama_tiny) in arms[name]["skipped"] and "--paged on" in arms[name]["skipped"]
    assert "| paged cache on | skipped: " in markdown(doc)
