"""``ember check`` (ember/check.py) on the CPU tier: an FP16 engine against its FP32 graph
(``--reference``), tolerances that must fail, and the error paths. The CUDA backend's row is
covered by tests/test_gpu.py and the TensorRT one by tests/test_tensorrt.py where present."""
from __future__ import annotations

import json

import pytest

from ember import check_cli
from ember.check import check_folder, format_report, step_cases
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.engine_format.manifest import read_manifest
from ember.errors import ArtifactError, InputError


def _cli(argv: list[str]) -> int:
    """``ember check ...`` through its own subparser (the full CLI also loads optional extensions)."""
    import argparse

    parser = argparse.ArgumentParser()
    check_cli.add_parser(parser.add_subparsers())
    a = parser.parse_args(["check", *argv])
    return a.func(a)


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "fp16"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", quiet=True))
    return out


def test_fp16_engine_against_fp32_reference(fp16_folder, llama_tiny):
    rows = check_folder(fp16_folder, reference=llama_tiny / "step.onnx")
    assert "onnxruntime-cpu" in {r.backend for r in rows}  # + onnxruntime-cuda where present
    assert {r.case for r in rows} == {"decode", "prefill"}
    assert all(r.ok for r in rows), format_report(rows)
    logits = [r for r in rows if r.output == "logits"]
    assert logits and all(r.tolerance == 2e-2 and r.top1_agreement >= 0.75 for r in logits)
    assert 0 < max(r.rel_error for r in rows) < 2e-2  # FP16 differs from FP32, a little


def test_tight_tolerance_fails_and_cli_exits_1(fp16_folder, llama_tiny, capsys):
    rows = check_folder(fp16_folder, reference=llama_tiny / "step.onnx", tolerances={"logits": 1e-9})
    assert not all(r.ok for r in rows if r.output == "logits")
    rc = _cli([str(fp16_folder), "--reference", str(llama_tiny / "step.onnx"), "--tol", "logits=1e-9"])
    assert rc == 1 and "NO" in capsys.readouterr().out


def test_nothing_to_compare_fails_with_a_reason(llama_tiny, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider: the engine is compared on it")
    assert check_folder(llama_tiny) == []
    assert _cli([str(llama_tiny)]) == 1  # a check that compared nothing did not pass
    out = capsys.readouterr()
    assert "nothing compared" in out.out and "--reference" in out.err
    assert _cli([str(llama_tiny), "--json"]) == 1


def test_tensorrt_part_without_source_onnx_is_an_error(tmp_path, llama_tiny):
    import shutil

    folder = tmp_path / "trt"
    shutil.copytree(llama_tiny, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["parts"][0]["backend"] = "tensorrt"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="--reference"):
        check_folder(folder)


def test_step_cases_follow_the_contract(llama_tiny):
    part = read_manifest(llama_tiny).part("step")
    cases = step_cases(part)
    dec, pre = cases["decode"], cases["prefill"]
    assert dec["input_ids"].shape == (4, 1) and pre["input_ids"].shape == (2, 8)
    assert (dec["positions"][:, 0] == dec["past_lengths"]).all()
    assert dec["past_key.0"].shape[2] == 32 and (dec["past_lengths"] <= 32).all()
    with pytest.raises(InputError, match="OUTPUT=NUMBER"):
        _cli([str(llama_tiny), "--tol", "logits"])


def test_fused_decode_part_checked_against_the_step_reference(fp16_folder, llama_tiny):
    """The FP16 folder's fused decode part, compared with the FP32 step graph run on the same
    decode state (new K/V placed at each row's past length)."""
    rows = [r for r in check_folder(fp16_folder, reference=llama_tiny / "step.onnx") if r.part == "decode"]
    assert rows and {r.backend for r in rows} >= {"onnxruntime-cpu"}
    assert {r.output for r in rows} >= {"logits", "present_key.0", "present_value.1"}
    assert all(r.ok for r in rows), format_report(rows)
    assert 0 < max(r.rel_error for r in rows if r.output == "logits") < 2e-2
