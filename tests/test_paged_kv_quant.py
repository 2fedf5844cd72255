"""Quantized KV pools of the paged step graph (``--kv-dtype int8|fp8``, export/kv_quant.py): the
numpy reference of PagedAttention stores K/V as the schema says (symmetric scale, round to
nearest, saturation), the graph with int8 / fp8 pools and compile-time scales follows the FP16-pool
graph of the same model over prefill chunks and decodes, and a wrong scale is caught."""
from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.compiler.compile import PAGED_TOLERANCE, CompileOptions, compile_decoder
from ember.engine_format.manifest import read_manifest
from ember.errors import ConfigError
from ember.export.config import BUILTIN, DecoderConfig
from ember.export.kv_quant import CALIB_LENGTHS, calibration_prompts, kv_bounds, kv_cache_dtype, kv_scales, per_tensor
from ember.export.paged_reference import reference_session
from ember.export.paged_step import PackedSequence, build_paged_graph, cache_bindings, check_paged_against_torch, packed_inputs
from ember.export.sources import random_init_, resolve_decoder_source, step_model_class

BLOCK = 4
SMALL = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_positions=64, norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {
    "llama-tiny": BUILTIN["llama-tiny"],
    "gpt2-tiny": BUILTIN["gpt2-tiny"],  # no rotary: K's bound is its plain absmax
    "qwen3-qknorm": DecoderConfig(family="qwen3", **{**SMALL, "num_kv_heads": 1}, head_dim=32),
}
# relative logits error vs the FP16-pool graph (largest over every call), and the least top-1 agreement
# over 46 rows (measured: int8 <= 2.8e-2 and >= 97.8 %, fp8 <= 4.6e-2 and >= 95.7 %: the tiny random
# models' logits are nearly flat, std 0.16, so a few rows are near-ties)
TOL = {"int8": 4e-2, "fp8": 7e-2}
MIN_AGREEMENT = {"int8": 0.9, "fp8": 0.9}


def _model(cfg):
    m = step_model_class(cfg.family)(cfg)
    random_init_(m, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms away from 1: a misplaced scale would show
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def _calibrated(model, cfg, kv_dtype: str):
    rng = np.random.default_rng(7)  # as the compile without a tokenizer: random tokens, other than the test's
    bounds = kv_bounds(model, cfg, [rng.integers(0, cfg.vocab_size, n).tolist() for n in CALIB_LENGTHS])
    return kv_scales(bounds, kv_cache_dtype(kv_dtype))


def _teacher_forced(proto, cfg, kv_dtype: str, steps: int = 14) -> np.ndarray:
    """Logits of a fixed schedule -- three prompts packed (one split in two chunks), then decodes of
    fixed tokens -- through ``proto`` with pools of ``kv_dtype``: [calls, rows, V]."""
    sess = reference_session(proto)
    np_dtype = {"fp16": np.float16, "int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}[kv_dtype]
    num_blocks = 3 * -(-48 // BLOCK)
    pools = {name: np.zeros((num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim), np_dtype)
             for name, _ in cache_bindings(cfg.num_layers)}
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (9, 4, 13)]
    past = [0, 0, 0]
    blocks = [tuple(range(s * 12, (s + 1) * 12)) for s in range(3)]
    plans = [[(0, prompts[0]), (1, prompts[1]), (2, prompts[2][:6])], [(2, prompts[2][6:])]]
    plans += [[(s, [int(rng.integers(1, cfg.vocab_size))]) for s in range(3)] for _ in range(steps)]
    out = []
    for plan in plans:
        shares = [PackedSequence(tuple(t), past[s], blocks[s]) for s, t in plan]
        res = dict(zip(sess.output_names, sess.run(None, {**packed_inputs(shares, BLOCK, max_blocks=12), **pools})))
        for cache_in, cache_out in cache_bindings(cfg.num_layers):
            pools[cache_in] = res[cache_out]
        for s, t in plan:
            past[s] += len(t)
        logits = res["logits"]
        out.append(np.pad(logits, ((0, 3 - len(logits)), (0, 0))) if len(logits) < 3 else logits)
    return np.stack(out)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_pools_follow_the_fp16_pool_graph(name, kv_dtype):
    cfg = CONFIGS[name]
    model = _model(cfg)
    want = _teacher_forced(build_paged_graph(model, cfg), cfg, "fp16")
    quant = build_paged_graph(model, cfg, kv_scales=_calibrated(model, cfg, kv_dtype), kv_dtype=kv_dtype)
    got = _teacher_forced(quant, cfg, kv_dtype)
    real = np.abs(want).max(-1) > 0  # rows of a call with fewer sequences are padding
    err = float(np.abs(got - want).max() / np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1))[real].mean())
    print(f"{name} {kv_dtype}: max relative logits error {err:.2e}, top-1 agreement {agree:.1%} over {real.sum()} rows")
    assert err < TOL[kv_dtype]
    assert agree >= MIN_AGREEMENT[kv_dtype]


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_a_key_scale_ten_times_too_small_saturates_and_changes_the_logits(kv_dtype):
    """With scores of order 1 (Q/K weights x8) the keys decide the attention: K values clipped by a
    scale 10x too small change the logits far beyond the quantization's own error (measured: about
    5e-2 with the right scales, 0.7 with K's divided by 10)."""
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    want = _teacher_forced(build_paged_graph(model, cfg), cfg, "fp16")
    scales = _calibrated(model, cfg, kv_dtype)

    def err(kv_scales) -> float:
        got = _teacher_forced(build_paged_graph(model, cfg, kv_scales=kv_scales, kv_dtype=kv_dtype), cfg, kv_dtype)
        return float(np.abs(got - want).max() / np.abs(want).max())

    assert err(scales) < 0.1 < 0.3 < err([(k / 10, v) for k, v in scales])


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_per_tensor_scales_are_the_schemas_other_layout(kv_dtype):
    """``per_tensor``: one scale [1] per layer's K and V (for a kernel without per-channel scales):
    the graph says PER_TENSOR and still follows the FP16-pool graph (int8 coarser than per channel)."""
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    want = _teacher_forced(build_paged_graph(model, cfg), cfg, "fp16")
    scales = per_tensor(_calibrated(model, cfg, kv_dtype))
    proto = build_paged_graph(model, cfg, kv_scales=scales, kv_dtype=kv_dtype)
    node = next(n for n in proto.graph.node if n.op_type == "PagedAttention")
    assert {a.name: a.s for a in node.attribute if a.name.endswith("quant_type")} == {
        "k_quant_type": b"PER_TENSOR", "v_quant_type": b"PER_TENSOR"}
    got = _teacher_forced(proto, cfg, kv_dtype)
    print(f"per-tensor {kv_dtype}: max relative logits error {np.abs(got - want).max() / np.abs(want).max():.2e}")
    assert np.abs(got - want).max() / np.abs(want).max() < 2 * TOL[kv_dtype]


def _one_op(kv_onnx_type: int, scale: np.ndarray, quant_type: str) -> onnx.ModelProto:
    """A lone PagedAttention: one KV head of D=8, no rotary, K/V given separately."""
    vi = helper.make_tensor_value_info
    node = helper.make_node("PagedAttention", ["q", "k", "v", "kc", "vc", "cu", "past", "table", "", "", "", "", "", "",
                                              "ks", "vs"], ["o", "kc_out", "vc_out"], domain="com.microsoft",
                            num_heads=1, kv_num_heads=1, k_quant_type=quant_type, v_quant_type=quant_type)
    graph = helper.make_graph(
        [node], "one", [vi("q", TensorProto.FLOAT16, [3, 8]), vi("k", TensorProto.FLOAT16, [3, 8]),
                        vi("v", TensorProto.FLOAT16, [3, 8]), vi("kc", kv_onnx_type, [1, 4, 1, 8]),
                        vi("vc", kv_onnx_type, [1, 4, 1, 8]), vi("cu", TensorProto.INT32, [2]),
                        vi("past", TensorProto.INT32, [1]), vi("table", TensorProto.INT32, [1, 1])],
        [vi("o", TensorProto.FLOAT16, [3, 8]), vi("kc_out", kv_onnx_type, [1, 4, 1, 8]),
         vi("vc_out", kv_onnx_type, [1, 4, 1, 8])],
        [numpy_helper.from_array(scale, "ks"), numpy_helper.from_array(scale, "vs")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("dtype,onnx_type,qmax", [(np.int8, TensorProto.INT8, 127),
                                                   (ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 448)])
def test_reference_stores_rounded_saturated_values_and_reads_them_scaled(dtype, onnx_type, qmax):
    scale = np.full((1, 1, 8), 0.5, np.float32)
    scale[0, 0, 1] = 0.25  # per channel: channel 1's steps are finer
    k = np.array([[0.74, 0.74, -0.26, 1.0, 2.0, -3.0, 0.0, 0.1]] * 3, np.float16)
    k[2, 3], k[2, 4] = 1000.0, -1000.0  # far past qmax * 0.5: saturated, never wrapped or NaN
    v = -k
    sess = reference_session(_one_op(onnx_type, scale, "PER_CHANNEL"))
    feeds = dict(q=np.zeros((3, 8), np.float16), k=k, v=v, kc=np.zeros((1, 4, 1, 8), dtype),
                 vc=np.zeros((1, 4, 1, 8), dtype), cu=np.array([0, 3], np.int32), past=np.array([0], np.int32),
                 table=np.array([[0]], np.int32))
    out, kc, vc = sess.run(None, feeds)
    stored = kc[0, :3, 0].astype(np.float32)
    want = np.clip(k.astype(np.float32) / scale[0], -qmax - (dtype == np.int8), qmax)
    want = np.rint(want) if dtype == np.int8 else want.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(stored, want)
    assert stored[2, 3] == qmax and stored[2, 4] == -qmax - (dtype == np.int8)
    np.testing.assert_array_equal(vc[0, :3, 0].astype(np.float32), -stored if dtype != np.int8 else
                                  np.clip(np.rint(-k.astype(np.float32) / scale[0]), -128, 127))
    # q = 0: uniform attention, so the first query's output is V's first token as read back (q * scale)
    np.testing.assert_allclose(out[0].astype(np.float32), vc[0, 0, 0].astype(np.float32) * scale[0, 0], rtol=1e-3)


def test_reference_refuses_a_scale_that_does_not_fit_the_quant_type():
    sess = reference_session(_one_op(TensorProto.INT8, np.ones((1, 1, 8), np.float32), "PER_TENSOR"))
    feeds = dict(q=np.zeros((3, 8), np.float16), k=np.zeros((3, 8), np.float16), v=np.zeros((3, 8), np.float16),
                 kc=np.zeros((1, 4, 1, 8), np.int8), vc=np.zeros((1, 4, 1, 8), np.int8), cu=np.array([0, 3], np.int32),
                 past=np.array([0], np.int32), table=np.array([[0]], np.int32))
    with pytest.raises(ValueError, match="k_scale of shape"):
        sess.run(None, feeds)


def test_k_bound_covers_rotated_keys_at_every_position():
    """The K scale is set from prompts at positions < 96; the cache holds K rotated at any position.
    Rotated K at far positions never exceeds the bound (the rotary pair norm), so nothing saturates."""
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, cfg.vocab_size, 16).tolist()
    (kb, _), = kv_bounds(model, cfg, [prompt])[:1]
    t = len(prompt)
    far = torch.arange(cfg.max_positions - t, cfg.max_positions).reshape(1, t)
    past = [torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    with torch.no_grad():
        k_far = model(torch.tensor([prompt]), far, torch.zeros(1, dtype=torch.int64), torch.tensor([t]), *past)[1]
    with torch.no_grad():
        k_near = model(torch.tensor([prompt]), torch.arange(t).reshape(1, t), torch.zeros(1, dtype=torch.int64),
                       torch.tensor([t]), *past)[1]
    per_channel_absmax = k_near[0].abs().amax(1).numpy()
    assert (np.abs(k_far[0].numpy()).max(1) <= kb * (1 + 1e-5)).all()
    assert (np.abs(k_far[0].numpy()).max(1) > per_channel_absmax * (1 + 1e-3)).any()  # a plain absmax would clip


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("kvq") / "llama"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", paged="on", kv_dtype="int8", quiet=True))
    return out


def test_compile_writes_int8_pools_with_scales_and_records_them(int8_folder):
    part = read_manifest(int8_folder).part("paged")
    assert part.tensor("key_cache", layer=0).dtype == "int8"
    record = part.extra["kv_cache"]
    assert record["dtype"] == "int8" and record["quant_type"] == "PER_CHANNEL"
    assert record["calibration"]["source"] == "built-in calibration prompts"  # llama-tiny has a tokenizer
    assert record["calibration"]["tokens"] > 100
    assert part.extra["check"]["max_rel_error"] < PAGED_TOLERANCE["int8"]
    proto = onnx.load(str(int8_folder / part.file))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    cfg = BUILTIN["llama-tiny"]
    assert inits["kv_scale.key.0"].shape == (cfg.num_kv_heads, 1, cfg.head_dim)
    node = next(n for n in proto.graph.node if n.op_type == "PagedAttention")
    assert list(node.input)[14:16] == ["kv_scale.key.0", "kv_scale.value.0"]


def test_a_scale_ten_times_too_small_is_caught(int8_folder, tmp_path):
    part = read_manifest(int8_folder).part("paged")
    proto = onnx.load(str(int8_folder / part.file))
    for init in proto.graph.initializer:
        if init.name.startswith("kv_scale."):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / 10, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    src = resolve_decoder_source("llama-tiny")  # the weights the folder was compiled from (seed 0)
    good_err = check_paged_against_torch(src.model, src.config, int8_folder / part.file)
    bad_err = check_paged_against_torch(src.model, src.config, bad)
    assert good_err < PAGED_TOLERANCE["int8"] < bad_err


def test_calibration_without_a_tokenizer_uses_seeded_random_tokens():
    src = SimpleNamespace(tokenizer=None, config=BUILTIN["llama-tiny"])
    prompts, source = calibration_prompts(src, None, seed=5)
    assert source == "random tokens (seed 5)" and [len(p) for p in prompts] == list(CALIB_LENGTHS)
    assert calibration_prompts(src, None, seed=5)[0] == prompts != calibration_prompts(src, None, seed=6)[0]
    with pytest.raises(ConfigError, match="--calib prompts.txt: this model has no tokenizer"):
        calibration_prompts(src, "prompts.txt", seed=5)


def test_kv_dtype_needs_the_paged_graph():
    with pytest.raises(ConfigError, match="--kv-dtype int8 .*--paged on"):
        CompileOptions(dtype="fp16", kv_dtype="int8")
    with pytest.raises(ConfigError, match="--kv-dtype 'int4'"):
        CompileOptions(dtype="fp16", paged="on", kv_dtype="int4")


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_onnx_runtime_resolves_the_quantized_graph(kv_dtype, tmp_path):
    """The installed ONNX Runtime's schema checks (types, attributes) pass the graph: loading it on
    the CPU stops only at the missing CPU kernel (a float16 scale, say, fails earlier: INVALID_GRAPH)."""
    ort = pytest.importorskip("onnxruntime")
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    path = tmp_path / "paged.onnx"
    onnx.save(build_paged_graph(model, cfg, host_bounds=True, kv_scales=_calibrated(model, cfg, kv_dtype),
                                kv_dtype=kv_dtype), str(path))
    with pytest.raises(Exception, match="NOT_IMPLEMENTED : Could not find an implementation for PagedAttention"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_scales_leave_headroom_over_the_calibration_bound_and_fp8_scales_do_not():
    bounds = [(np.array([[2.0, 0.0]], np.float32), np.array([[254.0, 1.0]], np.float32))]  # [Hkv=1, D=2]
    (k8, v8), = kv_scales(bounds, kv_cache_dtype("int8"))
    np.testing.assert_allclose(v8[0, 0], [1.25 * 254 / 127, 1.25 / 127], rtol=1e-6)
    assert k8[0, 0, 1] == np.finfo(np.float32).tiny  # a channel calibration never moved: no zero scale
    (_, vf), = kv_scales(bounds, kv_cache_dtype("fp8"))
    np.testing.assert_allclose(vf[0, 0], [254 / 448, 1 / 448], rtol=1e-6)
