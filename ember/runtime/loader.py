"""``ember.load``: validate an engine folder and build its engine object.

Checks, before anything is deserialized: the manifest's schema version, every file's
presence, size and sha256 (``verify="full"``; ``"size"`` skips hashing for fast restarts).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ember.compiler.manifest import Manifest, read_manifest, verify_files
from ember.errors import ArtifactError, InputError

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


def load(path: str | os.PathLike, verify: str = "full", **opts):
    """Load an engine folder. Decoder options: max_batch, kv_memory, max_queue, prefill_chunk,
    threads, compaction, device, fused_decode. Returns a DecoderEngine (or a diffusion pipeline)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if verify not in ("full", "size"):
        raise InputError(f"verify={verify!r} must be 'full' or 'size'")
    verify_files(folder, manifest, check_hashes=verify == "full")
    if manifest.kind == "decoder":
        if any(p.extra.get("rank") is not None for p in manifest.parts):
            from ember.runtime.tp import load_tp_engine

            return load_tp_engine(folder, manifest, **opts)
        return load_decoder(folder, manifest, **opts)
    if manifest.kind == "diffusion":
        from ember.runtime.diffusion import load_pipeline

        return load_pipeline(folder, manifest, **opts)
    raise ArtifactError(f"{folder}/manifest.json: unknown engine kind {manifest.kind!r}; upgrade Ember or recompile")


def load_decoder(folder: Path, manifest: Manifest, *, max_batch: int = 32, kv_memory: int | str | None = None,
                 max_queue: int = 1024, prefill_chunk: int | None = None, threads: int | None = None,
                 compaction: str = "min-move", device: str = "cpu", fused_decode: bool | None = None,
                 admit_batch: int | None = None):
    """``prefill_chunk``: prompt tokens prefilled per iteration (None: 128 on the CPU, 1024 on
    CUDA; ``scheduler.PREFILL_CHUNK``). ``admit_batch``: requests admitted together while the
    slots are busy (None: 1 on the CPU, 8 on CUDA; ``scheduler.ADMIT_BATCH``).
    ``fused_decode``: run one-token steps through the folder's fused decode part
    (GroupQueryAttention, K/V written in place) when it has one; None = yes if present
    (``EMBER_FUSED_DECODE=0`` says no)."""
    from ember.runtime.executor import LocalExecutor
    from ember.runtime.kv_pool import KVPool
    from ember.runtime.scheduler import FusionScheduler, default_admit_batch, default_prefill_chunk

    cfg = manifest.model["config"]
    part = manifest.part("step")
    layers, hkv = cfg["num_layers"], cfg["num_kv_heads"]
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    kv_dtype = next(t.dtype for t in part.inputs if t.name == "past_key.0")
    bytes_per_token = 2 * layers * hkv * head_dim * (2 if kv_dtype == "float16" else 4)
    max_pos = int(cfg["max_positions"])
    kv_bytes = parse_bytes(kv_memory)
    capacity = max_batch * max_pos if kv_bytes is None else kv_bytes // bytes_per_token
    scheduler = FusionScheduler(max_batch=max_batch, kv_capacity_tokens=capacity, max_seq_len=max_pos,
                                prefill_chunk=prefill_chunk or default_prefill_chunk(device), max_queue=max_queue,
                                compaction=compaction, admit_batch=admit_batch or default_admit_batch(device))
    if part.backend == "tensorrt" and not device.startswith("cuda"):
        raise InputError(f"{folder} holds a TensorRT plan, which runs on an NVIDIA GPU only: load it with "
                         f"device='cuda:0' (CLI: --device cuda:0), or recompile with --backend onnxruntime for the CPU")
    if fused_decode is None:
        fused_decode = os.environ.get("EMBER_FUSED_DECODE", "1") != "0"
    decode_part = manifest.find_part("decode") if fused_decode else None
    if device == "cpu":
        from ember.runtime.decode_session import DecodeSession
        from ember.runtime.session import StepSession

        session = StepSession(folder / part.file, layers, threads=threads,
                              disabled_optimizers=part.extra.get("ort_disabled_optimizers"))
        decode = DecodeSession(folder / decode_part.file, layers, threads=threads) if decode_part else None
    elif device.startswith("cuda"):
        from ember.runtime.cuda_session import make_cuda_executor

        return _engine(make_cuda_executor(folder, manifest, part, device, max_batch, scheduler.max_seq_len,
                                          decode_part=decode_part), scheduler, folder, manifest, max_pos)
    else:
        raise InputError(f"device {device!r} is not understood; use 'cpu' or 'cuda:N'")
    pool = KVPool(layers, hkv, head_dim, slots=max_batch, max_capacity=scheduler.max_seq_len, dtype=kv_dtype)
    return _engine(LocalExecutor(session, pool, decode=decode), scheduler, folder, manifest, max_pos)


def _engine(executor, scheduler, folder: Path, manifest: Manifest, max_pos: int):
    from ember.runtime.decoder import DecoderEngine

    tokenizer = None
    if manifest.tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / manifest.tokenizer["file"]))
    cfg = manifest.model["config"]
    return DecoderEngine(executor, scheduler, tokenizer=tokenizer, eos_token_id=cfg.get("eos_token_id"),
                         max_positions=max_pos, config=cfg, manifest=manifest)
