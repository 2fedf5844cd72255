"""GPU tier: the ONNX Runtime CUDA runtime against the CPU engine (marked ``gpu``; skipped
where onnxruntime-gpu or a CUDA device is missing).
"""
from __future__ import annotations

import numpy as np
import pytest

import ember
from gpu_env import cuda_reason

pytestmark = pytest.mark.gpu

REASON = cuda_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

import torch  # noqa: E402

from ember.compiler.compile import CompileOptions, compile_decoder  # noqa: E402
from ember.engine_format.manifest import read_manifest  # noqa: E402
from ember.runtime.cuda_session import CudaStepSession, make_cuda_executor  # noqa: E402
from ember.runtime.device_kv_pool import DeviceKVPool  # noqa: E402
from ember.runtime.kv_pool import KVPool  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = d / dtype
        compile_decoder("llama-tiny", out[dtype], CompileOptions(dtype=dtype, quiet=True))
    return out


PROMPTS = [[5, 6, 7], list(range(20, 45)), [1], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


@pytest.mark.parametrize("graphs,async_launch", [("1", "1"), ("0", "1"), ("1", "0")])
def test_cuda_fp32_greedy_equals_cpu(folders, monkeypatch, graphs, async_launch):
    monkeypatch.setenv("EMBER_CUDA_GRAPH", graphs)  # on: padded graph decodes (graph_window)
    monkeypatch.setenv("EMBER_ASYNC_LAUNCH", async_launch)  # on: streaming overlaps the next step
    with ember.load(folders["fp32"]) as cpu, ember.load(folders["fp32"], device="cuda:0") as gpu:
        a = cpu.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
        b = gpu.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_cuda_mixed_greedy_and_sampled_requests(folders):
    """Greedy rows take the on-device argmax, sampled rows get their logits row: in one fused
    batch the greedy requests still equal the CPU engine's and seeded sampling repeats."""
    def run(eng):
        hs = [eng.submit(p, max_new_tokens=12, ignore_eos=True, **({"temperature": 0.9, "seed": 7} if i % 2 else {}))
              for i, p in enumerate(PROMPTS)]
        return [h.result(timeout=120).token_ids for h in hs]

    with ember.load(folders["fp32"]) as cpu, ember.load(folders["fp32"], device="cuda:0") as gpu:
        a, b, c = run(cpu), run(gpu), run(gpu)
    assert [a[i] for i in (0, 2)] == [b[i] for i in (0, 2)]  # greedy rows
    assert b == c and all(len(t) == 12 for t in b)  # sampled rows: same seed, same tokens


def test_fp16_top1_agrees_with_fp32(folders):
    exs = {}
    for dtype, f in folders.items():
        m = read_manifest(f)
        exs[dtype] = make_cuda_executor(f, m, m.part("step"), "cuda:0", 8, 64)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (8, 6)).astype(np.int64)
    pos = np.tile(np.arange(6, dtype=np.int64), (8, 1))
    new = np.full(8, 6, np.int64)
    agree = total = 0
    for _ in range(16):
        l32, l16 = exs["fp32"].run(0, ids, pos, new), exs["fp16"].run(0, ids, pos, new)
        assert np.abs(l16 - l32).max() / np.abs(l32).max() < 2e-2
        agree += int((l32.argmax(-1) == l16.argmax(-1)).sum())
        total += 8
        ids, pos, new = l32.argmax(-1).reshape(8, 1), pos[:, -1:] + 1, np.ones(8, np.int64)
    assert agree / total >= 0.95


def test_device_pool_matches_numpy_pool_on_cuda():
    rng = np.random.default_rng(1)
    args = dict(num_layers=2, num_kv_heads=2, head_dim=4, slots=3, max_capacity=100, dtype="float16")
    ref, dev = KVPool(**args), DeviceKVPool(**args)
    for t in (5, 1, 1, 30, 1):
        new = [rng.standard_normal((3, 2, t, 4)).astype(np.float16) for _ in range(4)]
        lens = np.full(3, t, np.int64)
        ref.write(0, new, lens)
        dev.write(0, [torch.from_numpy(a).cuda() for a in new], lens)
    ref.move(2, 1), dev.move(2, 1)
    assert ref.lengths.tolist() == dev.lengths.tolist()
    for a, b in zip(ref.k + ref.v, dev.k + dev.v):  # live positions (past a slot's length: unspecified)
        for slot, n in enumerate(ref.lengths):
            np.testing.assert_array_equal(a[slot, :, :n], b.cpu().numpy()[slot, :, :n])


def test_cuda_graph_decode_matches_plain(folders):
    f = folders["fp16"]
    m = read_manifest(f)
    g = CudaStepSession(f / "step.onnx", 2, cuda_graph=True)
    if g.cuda_graph_status != "on":
        pytest.skip(f"ONNX Runtime refused CUDA graphs for the step graph: {g.cuda_graph_status}")
    plain = make_cuda_executor(f, m, m.part("step"), "cuda:0", 4, 64)
    from ember.runtime.cuda_session import DeviceExecutor

    graph = DeviceExecutor(g, DeviceKVPool(2, 2, 16, slots=4, max_capacity=64, dtype="float16"))
    ids = np.array([[3, 4, 5]] * 4, np.int64)
    pos = np.tile(np.arange(3, dtype=np.int64), (4, 1))
    for ex in (plain, graph):
        ex.run(0, ids, pos, np.full(4, 3, np.int64))
    for step in range(5):
        tok = np.full((4, 1), 7 + step, np.int64)
        p = np.full((4, 1), 3 + step, np.int64)
        a = plain.run(0, tok, p, np.ones(4, np.int64))
        b = graph.run(0, tok, p, np.ones(4, np.int64))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def test_check_runs_the_cuda_backend(folders):
    from ember.check import check_folder

    rows = check_folder(folders["fp32"])
    assert {r.backend for r in rows} == {"onnxruntime-cuda"}
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


@pytest.fixture(scope="module")
def gpt2_fused(tmp_path_factory):
    """gpt2-tiny in FP16 with the fused decode part (``--fused-decode on``: not built by ``auto``)."""
    f = tmp_path_factory.mktemp("gpu-gpt2") / "fp16"
    compile_decoder("gpt2-tiny", f, CompileOptions(dtype="fp16", fused_decode="on", quiet=True))
    return f


@pytest.mark.parametrize("family,graphs", [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_cuda_fused_decode_matches_step_graph(folders, gpt2_fused, family, graphs):
    """FP16 folders carry the fused decode part (GroupQueryAttention, K/V in place): its decode
    logits follow the portable step graph's, teacher-forced on the same tokens (LLaMA: rotary,
    grouped K/V heads; GPT-2: learned positions, LayerNorm, no rotary)."""
    f = folders["fp16"] if family == "llama" else gpt2_fused
    m = read_manifest(f)
    decode = m.find_part("decode")
    assert decode is not None
    rows, plen, steps = 4, 9, 12
    plain = make_cuda_executor(f, m, m.part("step"), "cuda:0", rows, 64, cuda_graph=False)
    fused = make_cuda_executor(f, m, m.part("step"), "cuda:0", rows, 64, cuda_graph=graphs, decode_part=decode)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.model["config"]["vocab_size"], (rows, plen)).astype(np.int64)
    pos = np.tile(np.arange(plen, dtype=np.int64), (rows, 1))
    new = np.full(rows, plen, np.int64)
    agree, total = 0, 0
    for step in range(steps):
        a, b = plain.run(0, ids, pos, new), fused.run(0, ids, pos, new)
        if step:  # decode steps (the first call is the prefill, on the step graph in both)
            assert np.abs(a - b).max() / np.abs(a).max() < 3e-2
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += rows
        ids = a.argmax(-1).reshape(rows, 1).astype(np.int64)
        pos = (pos[:, -1:] + 1).astype(np.int64)
        new = np.ones(rows, np.int64)
    assert agree >= 0.9 * total
    assert fused.pool.lengths[:rows].tolist() == [plen + steps - 1] * rows
    kv_a, kv_b = plain.pool.storage, fused.pool.storage
    n = plen + steps - 1
    assert torch.allclose(kv_a[..., :n, :].float(), kv_b[..., :n, :].float(), atol=3e-2, rtol=3e-2)
