"""Assembling a ``DecoderEngine`` from a decoder folder: one home for the plain loader
(``loader.load_decoder``), the tensor-parallel loader (``tp.load_tp_engine``) and the
benchmarks (``bench.model.BenchModel``).

The caller makes the executor (CPU, CUDA, TensorRT, tensor-parallel: each needs the
scheduler's ``max_seq_len`` to size its KV pool); this module sizes the scheduler from the KV
budget (``SchedulerOptions``) and joins scheduler, executor, tokenizer and the manifest's
model config into the engine::

    scheduler = make_scheduler(options, max_positions=..., geometry=..., kv_dtype=..., device=...)
    executor = <the caller's>(max_seq_len=scheduler.max_seq_len)
    engine = make_engine(manifest, scheduler, executor, tokenizer)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ember.engine_format.decoder_spec import KVGeometry
from ember.engine_format.manifest import Manifest
from ember.errors import InputError
from ember.runtime.decoder import DecoderEngine
from ember.runtime.kv_blocks import BlockManager, kv_blocks_within, kv_itemsize, refuse_rings
from ember.runtime.paged_scheduler import PagedScheduler
from ember.runtime.scheduler import FusionScheduler, default_admit_batch, default_prefill_chunk

KV_LAYOUTS = ("slots", "paged")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_bytes(v: int | str | None) -> int | None:
    """'512MiB', '2GB', '1g', 1234 -> bytes."""
    if v is None or isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"memory size {v!r} is not understood; write e.g. 2GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_capacity_tokens(geometry: KVGeometry, kv_dtype: str, max_batch: int, max_positions: int,
                       kv_bytes: int | None) -> int:
    """The scheduler's KV budget in tokens: ``max_batch`` slots of the most positions (<= ``max_positions``)
    that fit ``kv_bytes`` (None: no limit) -- a sliding-window layer's ring counts at most its ring.
    ``geometry``: this process's pool (a tensor-parallel rank holds its share of the KV heads)."""
    if kv_bytes is None:
        return max_batch * max_positions
    return max_batch * geometry.positions_within(kv_bytes // max_batch, kv_itemsize(kv_dtype), max_positions)


@dataclass(frozen=True)
class SchedulerOptions:
    """The ``ember.load`` options that size and pace the scheduler (``loader.load_decoder`` documents them).

    ``kv_memory``: this process's KV budget (bytes or '2GiB'); None: ``max_batch`` sequences of
    the model's full length. ``prefill_chunk`` / ``admit_batch`` None: the device's defaults.
    ``kv_layout``: ``"slots"`` (``max_batch`` rows of one sequence each, ``KVPool``) or
    ``"paged"`` (a pool of ``kv_block_size``-token blocks shared by every sequence, with prefix
    caching and preemption: ``PagedScheduler``, docs/kv.md). ``prefix_caching``: the paged
    layout shares computed prompt blocks between requests (False: every request computes its
    whole prompt, as the slot layout, which never shares KV, always does)."""

    max_batch: int = 32
    kv_memory: int | str | None = None
    max_queue: int = 1024
    prefill_chunk: int | None = None
    compaction: str = "min-move"
    admit_batch: int | None = None
    kv_layout: str = "slots"
    kv_block_size: int = 16
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise InputError(f"kv_layout={self.kv_layout!r} must be one of {', '.join(KV_LAYOUTS)}")
        if self.kv_block_size < 1:
            raise InputError(f"kv_block_size={self.kv_block_size} must be >= 1 (tokens per KV block)")


def make_scheduler(options: SchedulerOptions, *, max_positions: int, geometry: KVGeometry, kv_dtype: str,
                   device: str, rope_switch: int | None = None) -> FusionScheduler:
    """The scheduler of an engine whose KV pool is laid out as ``geometry`` in ``kv_dtype``;
    ``rope_switch``: LongRoPE's switch length (``decoder_spec.longrope_switch``), None for other models."""
    if options.kv_layout == "paged":
        return make_paged_scheduler(options, max_positions=max_positions, geometry=geometry, kv_dtype=kv_dtype,
                                    device=device, rope_switch=rope_switch)
    capacity = kv_capacity_tokens(geometry, kv_dtype, options.max_batch, max_positions, parse_bytes(options.kv_memory))
    return FusionScheduler(max_batch=options.max_batch, kv_capacity_tokens=capacity, max_seq_len=max_positions,
                           prefill_chunk=options.prefill_chunk or default_prefill_chunk(device),
                           max_queue=options.max_queue, compaction=options.compaction,
                           admit_batch=options.admit_batch or default_admit_batch(device), rope_switch=rope_switch)


def make_paged_scheduler(options: SchedulerOptions, *, max_positions: int, geometry: KVGeometry, kv_dtype: str,
                         device: str, rope_switch: int | None = None) -> PagedScheduler:
    """``kv_layout="paged"``: a block pool of ``kv_memory`` (None: as many tokens as the slot
    layout's ``max_batch`` full-length sequences); the executor sizes its pool from
    ``scheduler.blocks``."""
    refuse_rings(geometry)
    kv_bytes = parse_bytes(options.kv_memory)
    bs = options.kv_block_size
    if kv_bytes is None:
        num_blocks = -(-options.max_batch * max_positions // bs)
    else:
        num_blocks = kv_blocks_within(geometry, kv_itemsize(kv_dtype), bs, kv_bytes)
        if num_blocks < 1:
            raise InputError(f"--kv-memory {options.kv_memory} holds no block of {bs} tokens; raise it or lower "
                             f"--kv-block-size")
    return PagedScheduler(BlockManager(num_blocks, bs, prefix_caching=options.prefix_caching), max_batch=options.max_batch, max_seq_len=max_positions,
                          prefill_chunk=options.prefill_chunk or default_prefill_chunk(device),
                          max_queue=options.max_queue, rope_switch=rope_switch)


def make_engine(manifest: Manifest, scheduler: FusionScheduler, executor, tokenizer=None) -> DecoderEngine:
    """The engine over ``executor`` and ``scheduler``; EOS, length limit and config from ``manifest``
    (its ``model.config`` already checked by ``decoder_spec.check_decoder_config``)."""
    cfg = manifest.model["config"]
    return DecoderEngine(executor, scheduler, tokenizer=tokenizer, eos_token_id=cfg.get("eos_token_id"),
                         max_positions=int(cfg["max_positions"]), config=cfg, manifest=manifest)
