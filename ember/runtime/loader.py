"""``ember.load``: validate an engine folder and build its engine object.

Checks, before anything is deserialized: the load options, the manifest's schema version
and model config, and every file the manifest names -- inside the folder, a regular file,
its size and sha256 (``verify="full"``; ``"size"`` skips hashing the engine files for fast
restarts; the tokenizer and chat template are hashed as they are read either way).
"""
from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

from ember.compiler.manifest import (MANIFEST_NAME, Manifest, check_decoder_config, kv_geometry, read_manifest,
                                     read_member, resolve_member, tokenizer_members, verify_files)
from ember.errors import ArtifactError, InputError
from ember.runtime.backend_choice import choose_backend, onnx_graph, plan_needs_gpu, runs_plan

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
    threads, compaction, device, fused_decode, admit_batch, backend (tensor-parallel folders add tp,
    timeout_s, heartbeat_s, startup_timeout_s; diffusion folders take threads and backend). Returns a
    DecoderEngine (or a diffusion pipeline). An option the folder's kind does not take is an
    InputError listing those it does. ``backend='onnxruntime'`` runs a TensorRT or TensorRT-RTX
    folder's parts from the ONNX graphs their plans were built from (``runtime/backend_choice.py``)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if verify not in ("full", "size"):
        raise InputError(f"verify={verify!r} must be 'full' or 'size'")
    backend = choose_backend(folder, manifest, opts.pop("backend", None))
    if backend is not None:
        opts["backend"] = backend
    if manifest.kind == "decoder":
        tensor_parallel = any(p.extra.get("rank") is not None for p in manifest.parts)
        if tensor_parallel:
            from ember.runtime.tp import load_tp_engine as build
        else:
            _check_single_process(folder, opts)
            build = load_decoder
        _check_options(build, opts, folder, "a tensor-parallel decoder folder" if tensor_parallel else "a decoder folder")
        check_decoder_config(manifest.model, str(folder / MANIFEST_NAME))
        verify_files(folder, manifest, check_hashes=verify == "full")
        return build(folder, manifest, **opts)
    if manifest.kind == "diffusion":
        from ember.runtime.diffusion import load_pipeline

        verify_files(folder, manifest, check_hashes=verify == "full")
        return load_pipeline(folder, manifest, **opts)
    raise ArtifactError(f"{folder}/manifest.json: unknown engine kind {manifest.kind!r}; upgrade Ember or recompile")


def _check_single_process(folder: Path, opts: dict) -> None:
    """``tp`` on a folder compiled without ``--tp``: 1 (or None) is what it is; more is an error."""
    tp = opts.pop("tp", None)
    if tp is not None and tp != 1:
        raise InputError(f"tp={tp!r}: {folder} was compiled for one process, not for tensor-parallel ranks; omit tp "
                         f"(CLI: --tp), or compile a TP folder with `ember compile SOURCE --tp {tp} -o FOLDER`")


def _check_options(build, opts: dict, folder: Path, kind: str) -> None:
    accepted = [n for n, p in inspect.signature(build).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise InputError(f"ember.load: option(s) {', '.join(unknown)} are not understood for {folder} ({kind}); "
                         f"accepted: verify, {', '.join(accepted)}")


def load_decoder(folder: Path, manifest: Manifest, *, max_batch: int = 32, kv_memory: int | str | None = None,
                 max_queue: int = 1024, prefill_chunk: int | None = None, threads: int | None = None,
                 compaction: str = "min-move", device: str = "cpu", fused_decode: bool | None = None,
                 admit_batch: int | None = None, backend: str | None = None):
    """``prefill_chunk``: prompt tokens prefilled per iteration (None: 128 on the CPU, 1024 on
    CUDA; ``scheduler.PREFILL_CHUNK``). ``admit_batch``: requests admitted together while the
    slots are busy (None: 1 on the CPU, 8 on CUDA; ``scheduler.ADMIT_BATCH``).
    ``fused_decode``: run one-token steps through the folder's fused decode part
    (GroupQueryAttention, K/V written in place) when it has one; None = yes if present
    (``EMBER_FUSED_DECODE=0`` says no). ``backend``: None (the step part's own) or
    ``'onnxruntime'`` (a plan's source ONNX graph on ONNX Runtime; ``load`` checks it)."""
    from ember.runtime.executor import LocalExecutor
    from ember.runtime.kv_pool import KVPool
    from ember.runtime.scheduler import FusionScheduler, default_admit_batch, default_prefill_chunk

    cfg = check_decoder_config(manifest.model, str(folder / MANIFEST_NAME))
    part = manifest.part("step")
    layers, hkv, head_dim = kv_geometry(cfg)
    kv_dtype = next(t.dtype for t in part.inputs if t.name == "past_key.0")
    bytes_per_token = 2 * layers * hkv * head_dim * (2 if kv_dtype == "float16" else 4)
    max_pos = int(cfg["max_positions"])
    kv_bytes = parse_bytes(kv_memory)
    capacity = max_batch * max_pos if kv_bytes is None else kv_bytes // bytes_per_token
    scheduler = FusionScheduler(max_batch=max_batch, kv_capacity_tokens=capacity, max_seq_len=max_pos,
                                prefill_chunk=prefill_chunk or default_prefill_chunk(device), max_queue=max_queue,
                                compaction=compaction, admit_batch=admit_batch or default_admit_batch(device),
                                rope_switch=longrope_switch(cfg, part, folder))
    if runs_plan(part, backend) and not device.startswith("cuda"):
        raise plan_needs_gpu(folder, part, device)
    if fused_decode is None:
        fused_decode = os.environ.get("EMBER_FUSED_DECODE", "1") != "0"
    decode_part = manifest.find_part("decode") if fused_decode else None
    if device == "cpu":
        from ember.runtime.decode_session import DecodeSession
        from ember.runtime.session import StepSession

        session = StepSession(onnx_graph(folder, part), layers, threads=threads,
                              disabled_optimizers=part.extra.get("ort_disabled_optimizers"))
        decode = (DecodeSession(resolve_member(folder, decode_part.file, "parts[decode]"), layers, threads=threads)
                  if decode_part else None)
    elif device.startswith("cuda"):
        from ember.runtime.cuda_session import make_cuda_executor

        return _engine(make_cuda_executor(folder, manifest, part, device, max_batch, scheduler.max_seq_len,
                                          decode_part=decode_part, backend=backend), scheduler, folder, manifest,
                       max_pos)
    else:
        raise InputError(f"device {device!r} is not understood; use 'cpu' or 'cuda:N'")
    pool = KVPool(layers, hkv, head_dim, slots=max_batch, max_capacity=scheduler.max_seq_len, dtype=kv_dtype)
    return _engine(LocalExecutor(session, pool, decode=decode), scheduler, folder, manifest, max_pos)


def longrope_switch(cfg: dict, part, folder: Path) -> int | None:
    """LongRoPE's switch length (original_max_position_embeddings) of a decoder whose step graph
    takes the per-row ``rope_long`` input, for the scheduler's recompute (``scheduler.py``,
    step 4); None for other models. A LongRoPE folder compiled before that input existed rotated
    each position by itself: it is refused (recompile)."""
    from ember.models.description import DecoderConfig

    scaling = cfg.get("rope_scaling")
    longrope = isinstance(scaling, dict) and scaling.get("type") == "longrope"
    takes_input = any(t.name == "rope_long" for t in part.inputs)
    if longrope != takes_input:
        raise ArtifactError(f"{folder}: model.config {'has' if longrope else 'has no'} LongRoPE scaling but the step "
                            f"graph {'lacks' if longrope else 'takes'} the rope_long input; recompile the folder "
                            f"with this Ember")
    return DecoderConfig.from_dict(cfg).longrope_switch if longrope else None


def _engine(executor, scheduler, folder: Path, manifest: Manifest, max_pos: int):
    from ember.runtime.decoder import DecoderEngine

    cfg = manifest.model["config"]
    return DecoderEngine(executor, scheduler, tokenizer=load_tokenizer(folder, manifest),
                         eos_token_id=cfg.get("eos_token_id"), max_positions=max_pos, config=cfg, manifest=manifest)


def load_tokenizer(folder: str | os.PathLike, manifest: Manifest):
    """The folder's ``tokenizers.Tokenizer`` (None when the manifest records none), parsed from
    the very bytes checked against the manifest's size and sha256."""
    member, _ = tokenizer_members(manifest, str(Path(folder) / MANIFEST_NAME))
    if member is None:
        return None
    from tokenizers import Tokenizer

    data = read_member(folder, member)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception; UnicodeDecodeError for binary junk
        raise ArtifactError(f"{Path(folder) / member.file} is not a valid tokenizer file ({e}); recompile the "
                            f"folder") from e
