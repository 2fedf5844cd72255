"""The diffusion device path (torch tensors bound through IOBinding, the DDIM update on the
device, static-batch sessions = the CUDA-graph path) exercised on the CPU, the FP16 GPU build
and the attention fusion into com.microsoft.MultiHeadAttention (checked on ORT's CPU provider)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ember
from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
from ember.errors import ConfigError, InputError
from ember.passes.error_correction import relative_l2
from ember.runtime.diffusion.ddim import DDIM
from ember.runtime.diffusion.pipeline import DiffusionPipeline

STEPS = 12
PROMPTS = ["a red cube on a table", "a blue sphere", "a green cone at dusk"]
CALIB = ("a cat", "a dog")


@pytest.fixture(scope="module")
def fp32_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tiny-dp"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="dp", dec=True, quiet=True, calib_prompts=CALIB)
    compile_diffusion("sd-tiny", out, opts, open_pipeline=DiffusionPipeline)
    return out


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tiny-fp16"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="dp", dec=True, quiet=True, calib_prompts=CALIB,
                                   dtype="fp16")
    compile_diffusion("sd-tiny", out, opts, open_pipeline=DiffusionPipeline)
    return out


def _pair(folder, **device_kw):
    host = ember.load(folder)
    dev = DiffusionPipeline(folder, host.manifest, device="cpu", io_binding=True, **device_kw)
    return host, dev


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_device_path_gives_the_host_path_images_with_cache_dec_and_staggered_fusion(fp32_engine, cuda_graph) -> None:
    host, dev = _pair(fp32_engine, cuda_graph=cuda_graph)
    for kw in (dict(cache=False), dict(), dict(stagger=2)):  # uncached; DP + DEC; staggered requests fused
        a = host.generate(PROMPTS, steps=STEPS, seed=5, **kw)
        b = dev.generate(PROMPTS, steps=STEPS, seed=5, **kw)
        assert a.loop.group_sizes == b.loop.group_sizes and a.loop.shallow_calls == b.loop.shallow_calls
        assert np.abs(a.latents - b.latents).max() <= 1e-4 * np.abs(a.latents).max(), kw
        assert all(np.abs(x.astype(int) - y).max() <= 1 for x, y in zip(a.images, b.images))
    groups = b.loop.group_sizes  # cache + fusion exercised: both engines in one iteration, 3 requests live
    assert any(f and s for f, s in groups) and max(f + s for f, s in groups) == 3
    solo = [dev.generate([p], steps=STEPS, seed=5 + i) for i, p in enumerate(PROMPTS)]
    for i, s in enumerate(solo):  # each fused request gets the image it gets alone
        assert relative_l2(b.latents[i], s.latents[0]) < 1e-5
    if cuda_graph:  # one session, a graph id and static buffers per batch size
        assert dev.device_status["unet_full"] == "on (shared, batches [2, 4, 6])"


def test_calibration_through_the_device_path_makes_the_host_paths_schedule(fp32_engine, tmp_path) -> None:
    """``ember compile --calib-device cuda`` calibrates on the device path (DevicePartSession): the
    DP costs run the shallow engine on host arrays (``run_host``); on the CPU provider the same
    folder results as the host path's."""
    import functools

    out = tmp_path / "dev-calibrated"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="dp", dec=True, quiet=True, calib_prompts=CALIB)
    compile_diffusion("sd-tiny", out, opts, open_pipeline=functools.partial(DiffusionPipeline, io_binding=True,
                                                                            cuda_graph=False))
    host, dev = (ember.load(f).cache for f in (fp32_engine, out))
    assert dev["method"] == host["method"] == "dp" and dev["full_steps"] == host["full_steps"]


def test_graph_sessions_fall_back_per_batch_then_plain_with_the_reasons(fp32_engine, monkeypatch) -> None:
    from ember.runtime.diffusion.device_engines import DevicePartSession

    real = DevicePartSession._session
    refuse = {"shared"}

    def session(self, batch, graph=False):
        if graph and batch is None and "shared" in refuse:
            raise RuntimeError("shared refused: a Memcpy node")
        if graph and batch is not None and "per-batch" in refuse:
            raise RuntimeError("per-batch refused: node X is on the CPU")
        return real(self, batch, graph)

    monkeypatch.setattr(DevicePartSession, "_session", session)
    host = ember.load(fp32_engine)
    a = host.generate(PROMPTS, steps=STEPS, seed=1, stagger=2)
    dev = DiffusionPipeline(fp32_engine, host.manifest, device="cpu", io_binding=True, cuda_graph=True)
    b = dev.generate(PROMPTS, steps=STEPS, seed=1, stagger=2)  # static-batch sessions, one per batch size
    assert dev.device_status["unet_full"] == "on (per-batch, batches [2, 4, 6])"
    assert np.abs(a.latents - b.latents).max() <= 1e-4 * np.abs(a.latents).max()
    refuse.add("per-batch")
    dev = DiffusionPipeline(fp32_engine, host.manifest, device="cpu", io_binding=True, cuda_graph=True)
    b = dev.generate(PROMPTS, steps=STEPS, seed=1, stagger=2)
    assert np.abs(a.latents - b.latents).max() <= 1e-5 * np.abs(a.latents).max()
    assert dev.device_status["unet_full"] == ("unavailable: shared refused: a Memcpy node; "
                                              "per batch: per-batch refused: node X is on the CPU")
    assert any("CUDA graphs unavailable" in n for n in b.notes)


def test_ddim_update_on_torch_tensors_matches_numpy() -> None:
    import torch

    from ember.export.diffusion.config import SD1_SCHEDULER

    rng = np.random.default_rng(0)
    x, eps = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t, steps = np.array([981, 501, 1]), np.array([50, 20, 50])
    for clip in (False, True):
        s = DDIM.from_config({**SD1_SCHEDULER, "clip_sample": clip})
        want = s.step(eps, t, x, steps)
        got = s.step(torch.from_numpy(eps), t, torch.from_numpy(x), steps)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def _random_feeds(sess, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    dt = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {i.name: (rng.standard_normal([batch if isinstance(d, str) else d for d in i.shape])
                     * (400 if i.name == "timestep" else 1)).astype(dt[i.type]) for i in sess.get_inputs()}


@pytest.mark.parametrize("part", ["unet_full", "unet_shallow"])
def test_attention_fusion_matches_the_unfused_graph_on_cpu(fp32_engine, part, tmp_path) -> None:
    from ember.passes.mha_fusion import fuse_attention

    model = onnx.load(str(fp32_engine / f"{part}.onnx"))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    n = fuse_attention(model)
    assert n == softmaxes > 0
    assert not any(x.op_type in ("Softmax", "Sqrt") for x in model.graph.node)  # scores and scale arithmetic gone
    assert sum(x.op_type == "MultiHeadAttention" and x.domain == "com.microsoft" for x in model.graph.node) == n
    onnx.save(model, str(tmp_path / "fused.onnx"))
    ref = ort.InferenceSession(str(fp32_engine / f"{part}.onnx"), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    feeds = _random_feeds(ref)
    for a, b in zip(ref.run(None, feeds), got.run(None, feeds)):
        assert relative_l2(b, a) < 1e-5


def test_fp16_build_is_fp16_with_fused_attention_and_fp32_timestep_angles(fp16_engine, fp32_engine) -> None:
    m = json.loads((fp16_engine / "manifest.json").read_text())
    parts = {p["name"]: p for p in m["parts"]}
    assert {p["extra"]["dtype"] for p in parts.values()} == {"fp16"}
    assert parts["unet_full"]["extra"]["fused_attention"] == 8 and parts["unet_shallow"]["extra"]["fused_attention"] == 2
    unet = onnx.load(str(fp16_engine / "unet_full.onnx"))
    assert {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}["sample"] == onnx.TensorProto.FLOAT16
    sin = next(n for n in unet.graph.node if n.op_type == "Sin")  # the timestep embedding's angles stay FP32
    dtypes = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(unet).graph.value_info}
    assert dtypes.get(sin.input[0]) == onnx.TensorProto.FLOAT
    fp16 = ember.load(fp16_engine)
    fp32 = ember.load(fp32_engine)
    for kw in (dict(cache=False), dict()):
        a = fp32.generate(PROMPTS[:2], steps=STEPS, seed=2, **kw)
        b = fp16.generate(PROMPTS[:2], steps=STEPS, seed=2, **kw)
        assert relative_l2(b.latents, a.latents) < 2e-2, kw  # FP16 tolerance over 12 CFG steps


def test_device_option_errors_name_the_fix(fp32_engine) -> None:
    with pytest.raises(InputError, match="cuda:N"):
        ember.load(fp32_engine, device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match="onnxruntime-gpu"):
            ember.load(fp32_engine, device="cuda:0")
    with pytest.raises(ConfigError, match="--dtype"):
        DiffusionCompileOptions(dtype="bf16")


def test_cli_generate_image_takes_a_device(fp32_engine, tmp_path, capsys) -> None:
    from ember.cli import main

    rc = main(["generate-image", str(fp32_engine), "a house", "-o", str(tmp_path / "x.png"), "--steps", str(STEPS),
               "--device", "cpu", "--json"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and info["device"] == "cpu" and (tmp_path / "x.png").exists()


def test_ort_unet_fusions_build_is_a_typed_fp16_graph_for_cuda_only(tmp_path) -> None:
    out = tmp_path / "tiny-ortfused"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="uniform", quiet=True, dtype="fp16",
                                   ort_unet_fusions=True)
    compile_diffusion("sd-tiny", out, opts)
    m = json.loads((out / "manifest.json").read_text())
    parts = {p["name"]: p["extra"] for p in m["parts"]}
    fused = parts["unet_full"]["ort_unet_fusions"]
    assert parts["unet_full"]["cuda_only"] and fused["MultiHeadAttention"] == 8
    assert fused["NhwcConv"] > 0 and fused["GroupNorm"] + fused.get("SkipGroupNorm", 0) > 0
    assert "cuda_only" not in parts["text_encoder"] and parts["text_encoder"]["dtype"] == "fp16"
    unet = onnx.load(str(out / "unet_full.onnx"))
    assert {i.type.tensor_type.elem_type for i in unet.graph.input} == {onnx.TensorProto.FLOAT16}
    assert [d.dim_value for d in unet.graph.input[0].type.tensor_type.shape.dim[1:]] == [4, 8, 8]  # spatial dims restored
    producer = {o: n for n in unet.graph.node for o in n.output}
    angles = producer[next(n for n in unet.graph.node if n.op_type == "Sin").input[0]]
    consts = {t.name: t.data_type for t in unet.graph.initializer}
    const_types = [consts.get(i) or next((a.t.data_type for a in producer[i].attribute), None)
                   for i in angles.input if i in consts or (i in producer and producer[i].op_type == "Constant")]
    assert angles.op_type == "Mul" and const_types == [onnx.TensorProto.FLOAT]  # the timestep angles stay FP32
    with pytest.raises(ConfigError, match="--ort-unet-fusions"):
        ember.load(out)
    with pytest.raises(ConfigError, match="--dtype fp16"):
        DiffusionCompileOptions(ort_unet_fusions=True)
    # ORT's CPU provider has no kernel for them: the graph is typed through (it gets to kernel lookup)
    with pytest.raises(Exception, match="NhwcConv"):
        ort.InferenceSession(str(out / "unet_full.onnx"), providers=["CPUExecutionProvider"])


def test_export_cache_reuses_one_export_across_compiles(tmp_path, monkeypatch) -> None:
    import ember.export.diffusion.onnx_export as onnx_export

    calls = []
    real = onnx_export.export_parts
    monkeypatch.setattr(onnx_export, "export_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(steps=STEPS, cache_interval=3, schedule="uniform", quiet=True, export_cache=str(tmp_path / "cache"))
    compile_diffusion("sd-tiny", tmp_path / "a", DiffusionCompileOptions(**common))
    compile_diffusion("sd-tiny", tmp_path / "b", DiffusionCompileOptions(dtype="fp16", **common))
    assert len(calls) == 1  # the second compile copied the FP32 parts
    compile_diffusion("sd-tiny", tmp_path / "c", DiffusionCompileOptions(seed=1, **common))
    assert len(calls) == 2  # other weights: exported again
    a, b = ember.load(tmp_path / "a"), ember.load(tmp_path / "b")
    ra, rb = (p.generate(PROMPTS[:1], steps=STEPS, seed=3, cache=False) for p in (a, b))
    assert relative_l2(rb.latents, ra.latents) < 2e-2  # the FP16 build of the same export
    c = ember.load(tmp_path / "c").generate(PROMPTS[:1], steps=STEPS, seed=3, cache=False)
    assert relative_l2(c.latents, ra.latents) > 0.1
