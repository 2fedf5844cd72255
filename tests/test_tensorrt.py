"""TensorRT backend: everything that does not need TensorRT (profiles, options, plan
compatibility, error paths) on the CPU tier; the build + run test is marked ``tensorrt``
and skipped where the ``tensorrt`` package is missing (it ships from NVIDIA's index only).
"""
from __future__ import annotations

import importlib.util

import pytest

from ember.compiler.backends.tensorrt import TensorRTOptions, build_plan_part, plan_profiles
from ember.engine_format.manifest import TensorSpec
from ember.engine_format.profiles import DimRange, ProfileSpec, check_profile, profile_shapes, select_profile, step_profiles
from ember.engine_format.tensorrt_part import check_plan_compat
from ember.errors import ArtifactError, ConfigError, InputError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "tensorrt is not installed (NVIDIA's index only: pip install --extra-index-url https://pypi.nvidia.com tensorrt)"


def step_inputs(layers: int = 2, hkv: int = 2, d: int = 16, dtype: str = "float16") -> list[TensorSpec]:
    ins = [TensorSpec("input_ids", "int64", ["batch", "tokens"]), TensorSpec("positions", "int64", ["batch", "tokens"]),
           TensorSpec("past_lengths", "int64", ["batch"]), TensorSpec("new_lengths", "int64", ["batch"])]
    for i in range(layers):
        ins += [TensorSpec(f"past_key.{i}", dtype, ["batch", hkv, "past", d]),
                TensorSpec(f"past_value.{i}", dtype, ["batch", hkv, "past", d])]
    return ins


def test_step_profiles_decode_and_prefill():
    ins = step_inputs()
    dec, pre = step_profiles(ins, max_batch=64, max_past=1024, prefill_tokens=256, prefill_batch=4)
    assert dec.dims["tokens"] == DimRange(1, 1, 1) and dec.dims["batch"].max == 64
    assert pre.dims["tokens"].min == 2 and pre.dims["tokens"].max == 256 and pre.dims["batch"].max == 4
    shapes = profile_shapes(ins, dec)
    assert shapes["past_key.1"][0] == (1, 2, 1, 16) and shapes["past_key.1"][2] == (64, 2, 1024, 16)
    assert shapes["input_ids"][2] == (64, 1)
    for p in (dec, pre):
        check_profile(ins, profile_shapes(ins, p), p.name)  # consistent by construction


def test_check_profile_names_the_disagreeing_inputs():
    ins = step_inputs()
    shapes = profile_shapes(ins, step_profiles(ins)[0])
    lo, mid, hi = shapes["past_value.1"]
    shapes["past_value.1"] = (lo, mid, (hi[0], hi[1], hi[2] // 2, hi[3]))  # 'past' max differs
    with pytest.raises(ConfigError, match=r"past_key.0.*past_value.1.*'past'"):
        check_profile(ins, shapes)
    shapes = profile_shapes(ins, step_profiles(ins)[0])
    lo, mid, hi = shapes["past_key.0"]
    shapes["past_key.0"] = (lo, mid, (hi[0], 3, hi[2], hi[3]))  # static Hkv = 2
    with pytest.raises(ConfigError, match="static"):
        check_profile(ins, shapes)
    shapes = profile_shapes(ins, step_profiles(ins)[0])
    del shapes["new_lengths"]
    with pytest.raises(ConfigError, match="new_lengths"):
        check_profile(ins, shapes)


def test_profile_validation_and_selection():
    with pytest.raises(ConfigError):
        DimRange(4, 2, 8)
    ins = step_inputs()
    profiles = step_profiles(ins, max_batch=32, max_past=512, prefill_tokens=64, prefill_batch=2)
    assert select_profile(profiles, {"batch": 32, "tokens": 1, "past": 100}) == 0
    assert select_profile(profiles, {"batch": 2, "tokens": 9, "past": 100}) == 1
    with pytest.raises(InputError, match="outside every optimization profile"):
        select_profile(profiles, {"batch": 3, "tokens": 9, "past": 100})
    with pytest.raises(ConfigError, match="symbolic dim"):
        step_profiles([TensorSpec("x", "float32", [1, 4])])
    assert ProfileSpec.from_dict(profiles[1].to_dict()) == profiles[1]
    with pytest.raises(ConfigError, match="malformed"):
        ProfileSpec.from_dict({"name": "x", "dims": {"batch": [1, 2]}})


def test_options_from_extra():
    o = TensorRTOptions.from_extra({"max_batch": 16, "version_compatible": True}, max_past=1024)
    assert o.max_batch == 16 and o.max_past == 1024 and o.version_compatible
    with pytest.raises(ConfigError, match="unknown TensorRT option"):
        TensorRTOptions.from_extra({"max_batchsize": 4})
    with pytest.raises(ConfigError, match="hardware-compatibility-level"):
        TensorRTOptions(hardware_compatibility_level="hopper")
    bad = {"profiles": [{"name": "p", "dims": {"batch": [1, 1, 4], "tokens": [1, 1, 1]}}]}  # no 'past'
    with pytest.raises(ConfigError, match="'past'"):
        plan_profiles(step_inputs(), TensorRTOptions.from_extra(bad))


BUILT = {"tensorrt": "10.4.0", "compute_capability": "9.0", "version_compatible": False,
         "hardware_compatibility_level": "none"}


def test_plan_compat_rules():
    check_plan_compat(BUILT, {"tensorrt": "10.4.0", "compute_capability": "9.0"})
    with pytest.raises(ArtifactError, match=r"TensorRT 10.4.0 for sm_90; this machine has TensorRT 10.3.0 / sm_90.*--version-compatible"):
        check_plan_compat(BUILT, {"tensorrt": "10.3.0", "compute_capability": "9.0"})
    with pytest.raises(ArtifactError, match="--hardware-compatibility-level ampere"):
        check_plan_compat(BUILT, {"tensorrt": "10.4.0", "compute_capability": "8.9"})
    vc = {**BUILT, "version_compatible": True}
    check_plan_compat(vc, {"tensorrt": "10.7.1", "compute_capability": "9.0"})
    with pytest.raises(ArtifactError):
        check_plan_compat(vc, {"tensorrt": "10.2.0", "compute_capability": "9.0"})  # older runtime
    with pytest.raises(ArtifactError):
        check_plan_compat(vc, {"tensorrt": "11.0.0", "compute_capability": "9.0"})  # other major
    amp = {**BUILT, "hardware_compatibility_level": "ampere+"}
    check_plan_compat(amp, {"tensorrt": "10.4.0", "compute_capability": "8.6"})
    with pytest.raises(ArtifactError):
        check_plan_compat(amp, {"tensorrt": "10.4.0", "compute_capability": "7.5"})
    with pytest.raises(ArtifactError, match="pypi.nvidia.com"):
        check_plan_compat(BUILT, {"tensorrt": None, "compute_capability": "9.0"})


class _Opts:
    dtype = "fp16"
    extra: dict = {}


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_build_without_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="pypi.nvidia.com"):
        build_plan_part(tmp_path, "step", tmp_path / "step.onnx", step_inputs(), [], _Opts())


def test_bad_profiles_fail_before_tensorrt_is_needed(tmp_path):
    o = _Opts()
    o.extra = {"profiles": [{"name": "p", "dims": {"batch": [1, 2, 4], "tokens": [1, 1, 1]}}]}
    with pytest.raises(ConfigError, match="'past'"):
        build_plan_part(tmp_path, "step", tmp_path / "step.onnx", step_inputs(), [], o)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_plan_matches_onnx(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from ember.check import check_folder
    from ember.compiler.compile import CompileOptions, compile_decoder

    compile_decoder("llama-tiny", tmp_path / "trt", CompileOptions(backend="tensorrt", dtype="fp16", quiet=True,
                                                                   extra={"max_batch": 8, "max_past": 256,
                                                                          "timing_cache": str(tmp_path / "tc")}))
    rows = check_folder(tmp_path / "trt")
    assert rows and all(r.ok for r in rows), rows
    assert (tmp_path / "tc").exists()  # the timing cache was written
    import ember

    with ember.load(tmp_path / "trt", device="cuda:0", max_batch=4) as eng:
        out = eng.generate([[1, 2, 3], [4, 5]], max_new_tokens=8, ignore_eos=True)
    assert [len(c.token_ids) for c in out] == [8, 8]
    assert all(0 <= t < 512 for c in out for t in c.token_ids)
