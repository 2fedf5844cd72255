"""The serving benchmark harness: workloads, metrics, every arm on a tiny engine, reports, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ember.bench.metrics import ArmResult, RequestRecord, summarize
from ember.bench.workload import LengthDist, WorkloadSpec, make_workload
from ember.errors import InputError


def test_workload_is_seeded_and_follows_its_distributions():
    spec = WorkloadSpec(400, 5.0, LengthDist(8, 128), LengthDist(16, 16), seed=4)
    a, b = make_workload(spec, 1000, avoid_token=0), make_workload(spec, 1000, avoid_token=0)
    assert a == b
    arr = np.array([r.arrival_s for r in a])
    assert arr[0] == 0 and np.all(np.diff(arr) >= 0)
    assert abs(np.diff(arr).mean() - 1 / 5.0) < 0.05  # Poisson gaps have mean 1/rate
    assert {len(r.prompt_ids) for r in a} <= set(range(8, 129)) and {r.max_new_tokens for r in a} == {16}
    assert all(0 < t < 1000 for r in a for t in r.prompt_ids)
    burst = make_workload(WorkloadSpec(5, math.inf, LengthDist(8, 8), LengthDist(4, 4)), 50)
    assert [r.arrival_s for r in burst] == [0.0] * 5
    gamma = make_workload(WorkloadSpec(2000, 5.0, LengthDist(1, 1), LengthDist(1, 1), arrival="gamma", gamma_cv=3.0), 9)
    gaps = np.diff([r.arrival_s for r in gamma])
    assert 2.0 < gaps.std() / gaps.mean() < 4.0


def test_workload_rejects_bad_specs():
    with pytest.raises(InputError, match="LO:HI"):
        LengthDist.parse("8-128")
    with pytest.raises(InputError, match="rate"):
        WorkloadSpec(4, 0.0, LengthDist(1, 1), LengthDist(1, 1))
    assert LengthDist.parse("16:256") == LengthDist(16, 256) and LengthDist.parse("8") == LengthDist(8, 8)


def test_summarize_percentiles_and_extrapolation():
    recs = [RequestRecord(i, 10.0, 4, 3, token_times=[11.0 + i, 11.5 + i, 12.0 + i], finished=12.0 + i) for i in range(4)]
    s = summarize(ArmResult("x", recs, 10.0, 15.0, 1 << 20))
    assert s["total_s"] == 5.0 and s["output_tokens"] == 12 and s["output_tok_s"] == pytest.approx(12 / 5)
    assert s["ttft"]["p50"] == pytest.approx(2.5) and s["tpot"]["p99"] == pytest.approx(0.5)
    assert s["itl"]["p50"] == pytest.approx(0.5) and s["e2e"]["p50"] == pytest.approx(3.5)
    half = [RequestRecord(0, 0.0, 4, 10, token_times=[1.0, 2.0], finished=None)]
    s = summarize(ArmResult("y", half, 0.0, 4.0, 0, extrapolated=True))
    assert s["extrapolated"] and s["total_s"] == pytest.approx(20.0) and s["completed"] == 0


@pytest.fixture(scope="module")
def tiny_model(gpt2_tiny):
    from ember.bench.model import BenchModel

    return BenchModel(gpt2_tiny)


def test_every_arm_serves_the_same_greedy_tokens(tiny_model):
    from ember.bench.runner import ServeOptions, run_arm

    spec = WorkloadSpec(10, 50.0, LengthDist(2, 20), LengthDist(1, 12), seed=2)
    reqs = make_workload(spec, tiny_model.vocab_size, tiny_model.eos_token_id)
    opts = ServeOptions(max_batch=4, window_s=0.05)
    tokens = {}
    for arm in ("fused", "holes", "static", "dynamic", "sequential", "concurrent", "hf"):
        res = run_arm(arm, tiny_model, reqs, spec, opts)
        assert not res.extrapolated and all(r.finished is not None for r in res.records)
        assert [len(r.token_ids) for r in res.records] == [q.max_new_tokens for q in reqs]
        tokens[arm] = [r.token_ids for r in res.records]
    for arm, toks in tokens.items():
        assert toks == tokens["fused"], f"{arm} differs from the fused engine"


def test_cap_extrapolates_and_report_files(tiny_model, tmp_path):
    from ember.bench.report import write_report
    from ember.bench.runner import ServeOptions, run_serve

    # 3 x 400 tokens one at a time cannot finish in 0.05 s (gpt2-tiny decodes ~4k tokens/s here)
    spec = WorkloadSpec(3, math.inf, LengthDist(4, 4), LengthDist(400, 400), seed=0)
    doc = run_serve(tiny_model, spec, ["fused", "sequential"], ServeOptions(max_batch=4, cap_s=0.05),
                    show_progress=False, name="t")
    seq = next(r for r in doc["runs"] if r["arm"] == "sequential")
    assert seq["extrapolated"] and seq["completed"] < 3 and seq["total_s"] > seq["measured_s"]
    paths = write_report(doc, tmp_path / "t")
    assert [p.exists() and p.stat().st_size > 0 for p in paths] == [True] * 3
    assert json.loads(paths[0].read_text())["runs"][0]["arm"] == "ember-fused"
    assert "| sequential | ~" in paths[1].read_text()


def test_cli_bench_serve(gpt2_tiny, tmp_path, capsys):
    from ember.cli import main

    rc = main(["bench", "serve", str(gpt2_tiny), "--arms", "fused,static", "-n", "4", "--rate", "20,inf",
               "--prompt-len", "4:8", "--output-len", "3", "--max-batch", "2", "--quiet", "-o", str(tmp_path / "r")])
    assert rc == 0
    assert (tmp_path / "r.png").exists()
    out = capsys.readouterr().out
    assert "ember-fused" in out and "static" in out and "20 req/s" in out
    assert main(["bench", "serve", str(gpt2_tiny), "--arms", "nope", "--quiet"]) == 2


def test_hf_arm_maps_llama_weights(llama_tiny):
    from ember.bench.model import BenchModel
    from ember.bench.runner import ServeOptions, run_arm

    model = BenchModel(llama_tiny)
    spec = WorkloadSpec(3, math.inf, LengthDist(3, 9), LengthDist(6, 6), seed=5)
    reqs = make_workload(spec, model.vocab_size, model.eos_token_id)
    got = {arm: [r.token_ids for r in run_arm(arm, model, reqs, spec, ServeOptions(max_batch=3)).records]
           for arm in ("fused", "hf")}
    assert got["hf"] == got["fused"]


def test_batching_bound_from_per_token_times():
    from ember.bench.report import batching_bound

    def run(arm, tpot, rate=None):
        return {"arm": arm, "rate": rate, "requests": 32, "tpot": {"p50": tpot}}

    b = batching_bound([run("ember-fused", 0.100), run("static", 0.1), run("sequential", 0.025)])
    assert b["requests"] == 32 and abs(b["bound"] - 8.0) < 1e-9
    assert batching_bound([run("ember-fused", 0.1), run("static", 0.1)]) is None  # no one-slot arm
    assert batching_bound([run("ember-fused", 0.1, rate=4.0), run("sequential", 0.025, rate=4.0)]) is None
    assert batching_bound([run("ember-fused", None), run("sequential", 0.025)]) is None
