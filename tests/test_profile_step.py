"""benchmarks/profile_step.py: per-op-type kernel time of a compiled engine's step."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_counts_every_node_of_the_timed_runs(profile_step, gpt2_tiny):
    from ember.engine_format.manifest import read_manifest

    cfg = read_manifest(gpt2_tiny).model["config"]
    r = profile_step.profile_batch(gpt2_tiny / "step.onnx", cfg, batch=2, context=5, capacity=16, threads=1, reps=3,
                                   top=4)
    layers = cfg["num_layers"]
    assert r["ops"]["Gemm"]["nodes"] == 4 * layers + 1  # c_attn, c_proj, c_fc, mlp_proj per layer + LM head
    assert r["ops"]["Softmax"]["nodes"] == layers
    assert 0 < r["kernel_ms"] and len(r["slowest_nodes"]) == 4
    assert abs(sum(o["ms"] for o in r["ops"].values()) - r["kernel_ms"]) < 1e-6
    md = profile_step.markdown([r], "gpt2-tiny", profile_step.machine_info(), 1, "cmd")
    assert f"| Gemm | {4 * layers + 1} |" in md and "Slowest nodes at B=2" in md


def test_profile_rejects_a_context_that_does_not_fit(profile_step, gpt2_tiny):
    with pytest.raises(ValueError, match="--capacity"):
        profile_step.profile_batch(gpt2_tiny / "step.onnx", {}, batch=1, context=16, capacity=16, threads=1, reps=1)
