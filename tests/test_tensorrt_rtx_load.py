"""Loading TensorRT-RTX folders on the CPU tier (runtime/gpu_target.py, runtime/backend_choice.py).

The folders here are the compiled gpt2-tiny folder with its step part rewritten by hand to
the TensorRT-RTX manifest contract (backend "tensorrt-rtx", ``step.plan``, targets, release,
profiles, the ONNX graph kept as ``source_onnx``). The plan file is placeholder bytes with a
correct size and sha256: every check under test happens before a plan byte is deserialized,
and ``backend='onnxruntime'`` never reads it. The GPU's compute capability and the library
are faked where a test needs them; running a plan needs an RTX-class GPU this project is not
lent (scripts/gpu_rtx_check.py is the H200 side).
"""
from __future__ import annotations

import json
import shutil
import stat
import sys
import types

import pytest

import ember
from ember.check import check_folder
from ember.engine_format.manifest import EnginePart, file_record, read_manifest
from ember.engine_format.profiles import step_profiles
from ember.errors import ArtifactError, ConfigError, InputError
from ember.runtime import gpu_target
from ember.runtime.gpu_target import GpuInfo

RELEASE = "1.7.1.116"
TARGETS = ["8.0", "8.6", "8.9", "12.0"]
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [42]]


def make_rtx_folder(src, dst, targets=TARGETS, release=RELEASE):
    """``src`` (an ONNX Runtime decoder folder) copied to ``dst`` with its step part rewritten to
    a TensorRT-RTX part whose source ONNX is the original step graph."""
    shutil.copytree(src, dst)
    (dst / "step.plan").write_bytes(b"placeholder TensorRT-RTX plan bytes (never deserialized in these tests)\n")
    m = json.loads((dst / "manifest.json").read_text())
    part = next(p for p in m["parts"] if p["name"] == "step")
    spec = read_manifest(src).part("step")
    plan = file_record(dst, "step.plan")
    part.update(backend="tensorrt-rtx", file="step.plan", sha256=plan["sha256"], size=plan["size"])
    part["extra"] = {"library": "tensorrt-rtx", "tensorrt_rtx": release, "targets": list(targets), "dtype": "fp32",
                     "quantize": None,
                     "profiles": [p.to_dict() for p in step_profiles(spec.inputs, max_batch=8, max_past=128)],
                     "source_onnx": file_record(dst, spec.file), "engine_bytes": plan["size"], "options": {}}
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


@pytest.fixture
def rtx_folder(gpt2_tiny, tmp_path):
    return make_rtx_folder(gpt2_tiny, tmp_path / "rtx")


def fake_gpu(monkeypatch, capability: str, name: str = "NVIDIA GeForce RTX 4090"):
    monkeypatch.setattr(gpu_target, "find_gpu", lambda index=0: GpuInfo(capability, name, "torch"))


def fake_library(monkeypatch, version: str = RELEASE):
    module = types.ModuleType("tensorrt_rtx_bindings")
    module.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", module)
    return module


def test_gpu_outside_the_targets_is_refused_before_anything_is_read(rtx_folder, monkeypatch):
    fake_gpu(monkeypatch, "9.0", "NVIDIA H200")
    monkeypatch.setattr(gpu_target, "import_rtx", lambda: pytest.fail("the library was reached before the target check"))
    with pytest.raises(ArtifactError) as e:
        ember.load(rtx_folder, device="cuda:0")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"step.plan was built by TensorRT-RTX {RELEASE} for sm80, sm86, sm89, sm120" in msg
    assert "this GPU (NVIDIA H200, sm90) is not one of them" in msg
    assert "--trt-targets sm90" in msg and "has no Hopper (H100/H200) target" in msg
    assert "ember.load(FOLDER, device='cuda:0', backend='onnxruntime')" in msg and "--backend onnxruntime" in msg


def test_gpu_in_the_targets_passes_the_check(rtx_folder, monkeypatch):
    fake_gpu(monkeypatch, "8.9")
    module = fake_library(monkeypatch)
    part = read_manifest(rtx_folder).part("step")
    assert gpu_target.check_rtx_plan(part, 0) is module
    fake_gpu(monkeypatch, "8.6", "NVIDIA GeForce RTX 3090")
    assert gpu_target.check_rtx_plan(part, 0) is module
    fake_gpu(monkeypatch, "7.5", "NVIDIA GeForce RTX 2080 Ti")  # a TensorRT-RTX target, not this plan's
    with pytest.raises(ArtifactError, match=r"\(NVIDIA GeForce RTX 2080 Ti, sm75\).*--trt-targets sm75"):
        gpu_target.check_rtx_plan(part, 0)


def test_in_target_load_fails_later_only_for_want_of_a_gpu(rtx_folder, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks what follows the target check on a machine without a CUDA device")
    fake_gpu(monkeypatch, "8.9")
    fake_library(monkeypatch)
    with pytest.raises(ConfigError, match="no CUDA device is visible to PyTorch"):
        ember.load(rtx_folder, device="cuda:0")


def test_cpu_device_says_plans_need_a_gpu_and_names_onnxruntime(rtx_folder):
    for kwargs in ({}, {"device": "cpu"}, {"device": "cpu", "backend": "tensorrt-rtx"}):
        with pytest.raises(InputError) as e:
            ember.load(rtx_folder, **kwargs)
        msg = str(e.value)
        assert "TensorRT-RTX plans" in msg and "NVIDIA GPU" in msg and "backend='onnxruntime'" in msg
        assert "\n" not in msg


def test_missing_library_names_the_extra(rtx_folder, monkeypatch):
    fake_gpu(monkeypatch, "8.9")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"TensorRT-RTX is not installed.*pip install 'ember\[tensorrt-rtx\]'"):
        ember.load(rtx_folder, device="cuda:0")


def test_other_release_is_refused(rtx_folder, monkeypatch):
    fake_gpu(monkeypatch, "12.0", "NVIDIA GeForce RTX 5090")
    fake_library(monkeypatch, "1.8.0.40")
    with pytest.raises(ArtifactError) as e:
        ember.load(rtx_folder, device="cuda:0")
    msg = str(e.value)
    assert f"built by TensorRT-RTX {RELEASE}, but 1.8.0.40 is installed here" in msg
    assert f"tensorrt-rtx-cu13-bindings=={RELEASE}" in msg and "backend='onnxruntime'" in msg


def test_malformed_targets_and_release_are_artifact_errors(rtx_folder, monkeypatch):
    part = read_manifest(rtx_folder).part("step")
    fake_gpu(monkeypatch, "8.9")
    for bad in (None, [], "8.9", [89], ["sm89"]):
        broken = EnginePart(**{**part.__dict__, "extra": {**part.extra, "targets": bad}})
        with pytest.raises(ArtifactError, match="records targets"):
            gpu_target.check_targets(broken, gpu_target.device_gpu(0))
    fake_library(monkeypatch)
    no_release = EnginePart(**{**part.__dict__, "extra": {**part.extra, "tensorrt_rtx": None}})
    with pytest.raises(ArtifactError, match="does not record the TensorRT-RTX release"):
        gpu_target.check_rtx_plan(no_release, 0)


def test_onnxruntime_backend_generates_the_same_tokens(rtx_folder, gpt2_tiny):
    with ember.load(gpt2_tiny) as plain:
        want = [c.token_ids for c in plain.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    with ember.load(rtx_folder, backend="onnxruntime") as eng:
        got = [c.token_ids for c in eng.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    assert got == want and all(len(t) == 12 for t in got)


def test_onnxruntime_backend_still_checks_the_source_graph(rtx_folder):
    src = rtx_folder / "step.onnx"
    data = bytearray(src.read_bytes())
    data[-1] ^= 0xFF
    src.chmod(stat.S_IWUSR | stat.S_IRUSR)
    src.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step.onnx does not match its sha256"):
        ember.load(rtx_folder, backend="onnxruntime")


def test_unknown_backend_values_are_input_errors(rtx_folder, gpt2_tiny):
    for bad in ("tensorrt", "ort", "TensorRT-RTX", 1):
        with pytest.raises(InputError, match=r"backend=.* is not understood .*its parts run on tensorrt-rtx"):
            ember.load(rtx_folder, backend=bad)
    with pytest.raises(InputError, match="its parts run on onnxruntime"):
        ember.load(gpt2_tiny, backend="tensorrt-rtx")
    with ember.load(gpt2_tiny, backend="onnxruntime") as eng:  # an ONNX Runtime folder: a no-op
        assert len(eng.generate([[1, 2]], max_new_tokens=2, ignore_eos=True)[0].token_ids) == 2


def test_check_reports_the_refusal_on_a_gpu_outside_the_targets(rtx_folder, monkeypatch, capsys):
    fake_gpu(monkeypatch, "9.0", "NVIDIA H200")
    with pytest.raises(ArtifactError, match=r"this GPU \(NVIDIA H200, sm90\) is not one of them"):
        check_folder(rtx_folder)
    from ember.cli import main

    assert main(["check", str(rtx_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ember: error: step.plan was built by TensorRT-RTX") and "\n" not in err


def test_check_without_a_gpu_compares_nothing(rtx_folder, monkeypatch):
    monkeypatch.setattr(gpu_target, "find_gpu", lambda index=0: None)
    assert check_folder(rtx_folder) == []


def test_capability_from_nvidia_smi(tmp_path, monkeypatch):
    """Without a CUDA build of torch, the capability comes from nvidia-smi (CUDA_VISIBLE_DEVICES applied)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("PyTorch sees a GPU here: the nvidia-smi path is not taken")
    log = tmp_path / "args"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"#!/bin/sh\necho \"$@\" > {log}\necho '9.0, NVIDIA H200'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_target.find_gpu(0) == GpuInfo("9.0", "NVIDIA H200", "nvidia-smi")
    assert log.read_text().split() == ["--query-gpu=compute_cap,name", "--format=csv,noheader", "-i", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_target.find_gpu(1).sm == "sm90" and log.read_text().split()[-1] == "5"
    assert gpu_target.find_gpu(2) is None  # only two devices are visible
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"no NVIDIA GPU is visible.*backend='onnxruntime'"):
        gpu_target.device_gpu(0)


def test_image_part_runs_its_source_graph_only_with_the_onnxruntime_backend(rtx_folder, gpt2_tiny):
    """The diffusion runtime's part session (runtime/diffusion/engines.py) on a plan part."""
    import numpy as np

    from ember.check import step_cases
    from ember.runtime.diffusion.engines import PartSession

    part = read_manifest(rtx_folder).part("step")
    with pytest.raises(InputError, match=r"'step' is a TensorRT-RTX plan .*backend='onnxruntime'"):
        PartSession(rtx_folder, part)
    feeds = step_cases(part)["prefill"]
    got = PartSession(rtx_folder, part, backend="onnxruntime").run(feeds)
    want = PartSession(gpt2_tiny, read_manifest(gpt2_tiny).part("step")).run(feeds)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
