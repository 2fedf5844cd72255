"""Tensor-parallel runtime on CPU: 2 processes over gloo, rank 0 scheduling.

TP=2 greedy tokens equal TP=1 tokens through the fusion scheduler with staggered requests
(and slot moves); an idle engine outlives its collective timeout (keep-alives); a killed or
stopped rank ends the run with an error naming it, in bounded time.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.runtime.requests import FinishReason


@pytest.fixture(scope="session")
def tp2_folders(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("tp2")
    for name in ("llama-tiny", "gpt2-tiny"):
        out[name] = root / name
        compile_decoder(name, out[name], CompileOptions(tp=2, quiet=True))
    return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 2, 41], [17] * 12, [400, 401, 402, 403], [9, 99], [250, 251, 252, 253, 254]]
LENGTHS = [16, 4, 16, 10, 6, 12]  # request 1 finishes first, leaving a hole between live slots


def _reference(folder) -> list[list[int]]:
    """TP=1 tokens, each request alone."""
    with ember.load(folder, max_batch=1) as eng:
        return [eng.generate([p], max_new_tokens=n, ignore_eos=True)[0].token_ids for p, n in zip(PROMPTS, LENGTHS)]


def _staggered(eng) -> list[list[int]]:
    """First wave of 3, then the rest while the first is mid-decode (max_batch=3: they queue)."""
    handles = [eng.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS[:3], LENGTHS[:3])]
    first = iter(handles[0])
    for _ in range(3):
        next(first)
    handles += [eng.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS[3:], LENGTHS[3:])]
    return [h.result(timeout=120).token_ids for h in handles]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_tp2_tokens_equal_tp1(request, tp2_folders, name):
    ref = _reference(request.getfixturevalue(name.replace("-", "_")))
    with ember.load(tp2_folders[name], max_batch=3, prefill_chunk=8, timeout_s=20) as eng:
        assert len(eng.executor.worker_pids) == 1
        got = _staggered(eng)
        stats = eng.stats()
        comm = eng.executor.comm_stats()
    assert got == ref
    assert stats["requests_finished_total"] == len(PROMPTS) and stats["slot_moves_total"] >= 1
    layers = 2
    assert comm["all_reduces"] == (2 * layers + 1) * comm["gathers"]  # one gather of logits per step call


def test_idle_engine_outlives_collective_timeout(tp2_folders, gpt2_tiny):
    ref = _reference(gpt2_tiny)[:2]
    with ember.load(tp2_folders["gpt2-tiny"], timeout_s=3) as eng:
        got = [c.token_ids for c in eng.generate(PROMPTS[:1], max_new_tokens=LENGTHS[0], ignore_eos=True)]
        before = eng.executor.comm.stats.broadcasts
        time.sleep(4.5)  # idle longer than the timeout: keep-alive pings keep the workers waiting
        pings = eng.executor.comm.stats.broadcasts - before
        got += [c.token_ids for c in eng.generate(PROMPTS[1:2], max_new_tokens=LENGTHS[1], ignore_eos=True)]
    assert got == ref
    assert pings >= 4  # heartbeat_s = 0.5 s by default at timeout_s=3


@pytest.mark.parametrize("sig,expect", [(signal.SIGKILL, "rank 1 exited"), (signal.SIGSTOP, "rank 1 stopped responding")])
def test_failed_rank_ends_run_with_named_error(tp2_folders, sig, expect):
    timeout_s = 3.0
    eng = ember.load(tp2_folders["llama-tiny"], timeout_s=timeout_s)
    pid = eng.executor.worker_pids[0]
    try:
        h = eng.submit([1, 2, 3], max_new_tokens=200, ignore_eos=True)
        events = iter(h)
        for _ in range(5):
            next(events)
        t0 = time.perf_counter()
        os.kill(pid, sig)
        c = h.result(timeout=60)
        elapsed = time.perf_counter() - t0
        assert c.finish_reason is FinishReason.ERROR
        assert expect in c.error and "tensor-parallel" in c.error
        assert 5 <= len(c.token_ids) < 200
        assert elapsed < timeout_s + 5, elapsed
        # the engine stays failed: later requests fail at once with the same diagnosis
        later = eng.submit([4, 5], max_new_tokens=3).result(timeout=30)
        assert later.finish_reason is FinishReason.ERROR and expect in later.error
    finally:
        if sig == signal.SIGSTOP:
            os.kill(pid, signal.SIGKILL)
        eng.close()


_TORCHRUN_SCRIPT = """
import json, sys
import ember
eng = ember.load(sys.argv[1], timeout_s=20)  # ranks != 0 serve inside ember.load and exit there
res = eng.generate(json.loads(sys.argv[2]), max_new_tokens=int(sys.argv[3]), ignore_eos=True)
print("TOKENS " + json.dumps([c.token_ids for c in res]), flush=True)
eng.close()
"""


def test_torchrun_launch(tp2_folders, llama_tiny, tmp_path):
    """The same engine under `torchrun` (the multi-node launcher): rank 0 prints, rank 1 exits 0."""
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "tp_torchrun.py"
    script.write_text(_TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(script), str(tp2_folders["llama-tiny"]), json.dumps(PROMPTS[:2]), str(LENGTHS[0])],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert len(lines) == 1  # only rank 0 returns an engine
    with ember.load(llama_tiny) as eng:
        ref = [c.token_ids for c in eng.generate(PROMPTS[:2], max_new_tokens=LENGTHS[0], ignore_eos=True)]
    assert json.loads(lines[0][len("TOKENS "):]) == ref


def test_load_errors_name_the_fix(tp2_folders):
    from ember.errors import InputError

    with pytest.raises(InputError, match="compiled for 2 ranks"):
        ember.load(tp2_folders["llama-tiny"], tp=4)
    with pytest.raises(InputError, match="device 'tpu'"):
        ember.load(tp2_folders["llama-tiny"], device="tpu")


def _gpus() -> int:
    try:
        import onnxruntime as ort
        import torch

        ok = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
        return torch.cuda.device_count() if ok else 0
    except ImportError:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs with torch NCCL and onnxruntime-gpu (issue 8)")
def test_tp2_on_two_gpus_nccl(tp2_folders, llama_tiny):
    ref = _reference(llama_tiny)
    with ember.load(tp2_folders["llama-tiny"], device="cuda", max_batch=3, timeout_s=60) as eng:
        assert _staggered(eng) == ref
