"""One engine builder (runtime/engine_builder.py) serves ``ember.load`` and the benchmarks:
the scheduler is sized from the KV budget the same way, and the engine takes EOS, length
limit and config from the manifest."""
from __future__ import annotations

import numpy as np
import pytest

import ember
from ember.bench.model import BenchModel
from ember.engine_format.decoder_spec import KVGeometry, kv_geometry
from ember.engine_format.manifest import read_manifest
from ember.errors import InputError
from ember.runtime.engine_builder import SchedulerOptions, make_engine, make_scheduler, parse_bytes


def test_parse_bytes_units_and_errors():
    assert parse_bytes("2KiB") == 2048 and parse_bytes("1MB") == 10**6 and parse_bytes(7) == 7
    assert parse_bytes(None) is None
    with pytest.raises(InputError, match="not understood"):
        parse_bytes("lots")


def test_scheduler_capacity_from_the_kv_budget():
    geometry = KVGeometry(1, 1, 25)  # 100 bytes per position in FP16 (K and V)
    full = make_scheduler(SchedulerOptions(max_batch=4), max_positions=64, geometry=geometry, kv_dtype="float16",
                          device="cpu")
    assert full.kv_capacity_tokens == 4 * 64 and full.max_seq_len == 64
    budget = make_scheduler(SchedulerOptions(max_batch=4, kv_memory="12800"), max_positions=64, geometry=geometry,
                            kv_dtype="float16", device="cpu")
    assert budget.kv_capacity_tokens == 128 and budget.max_seq_len == 32  # 128 tokens over 4 slots


def test_load_and_bench_build_the_same_engine(gpt2_tiny):
    manifest = read_manifest(gpt2_tiny)
    cfg = manifest.model["config"]
    per_token = kv_geometry(cfg).slot_bytes(1, np.dtype(manifest.part("step").inputs[4].dtype).itemsize)
    with ember.load(gpt2_tiny, max_batch=3, kv_memory=per_token * 3 * 20, threads=1) as loaded:
        assert loaded.scheduler.kv_capacity_tokens == 60 and loaded.scheduler.max_seq_len == 20
        assert loaded.eos_token_id == cfg.get("eos_token_id") and loaded.tokenizer is not None
        prompt = loaded.encode("hello world", "prompt")
        [want] = loaded.generate([prompt], max_new_tokens=5, ignore_eos=True)
    with BenchModel(gpt2_tiny, threads=1).engine(max_batch=3) as bench:
        assert bench.scheduler.max_seq_len == cfg["max_positions"] and bench.manifest is not None
        [got] = bench.generate([prompt], max_new_tokens=5, ignore_eos=True)
    assert got.token_ids == want.token_ids and len(want.token_ids) == 5


def test_make_engine_reads_the_manifest(gpt2_tiny):
    manifest = read_manifest(gpt2_tiny)
    sched = make_scheduler(SchedulerOptions(max_batch=1), max_positions=8, geometry=KVGeometry(1, 1, 1),
                           kv_dtype="float32", device="cpu")
    engine = make_engine(manifest, sched, executor=None)
    assert engine.max_positions == manifest.model["config"]["max_positions"]
    assert engine.config is manifest.model["config"] and engine.tokenizer is None
