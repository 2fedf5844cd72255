"""``ember.load``: validate an engine folder and build its engine object.

Checks, before anything is deserialized: the load options, the manifest's schema version
and model config, and every file the manifest names -- inside the folder, a regular file,
its size and sha256 (``verify="full"``; ``"size"`` skips hashing the engine files for fast
restarts; the tokenizer and chat template are hashed as they are read either way).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from ember.engine_format.decoder_spec import check_decoder_config, kv_geometry, longrope_switch
from ember.engine_format.manifest import (MANIFEST_NAME, Manifest, read_manifest, read_member, resolve_member,
                                         tokenizer_members, verify_files)
from ember.engine_format.roles import KEY_CACHE, PAST_KEY
from ember.engine_format.tp_spec import is_tensor_parallel
from ember.errors import ArtifactError, InputError
from ember.runtime.backend_choice import choose_backend, onnx_graph, plan_needs_gpu, runs_plan
from ember.runtime.kv_blocks import default_kv_block_size


def load(path: str | os.PathLike, verify: str = "full", **opts):
    """Load an engine folder. Decoder options: max_batch, kv_memory, max_queue, prefill_chunk,
    threads, compaction, device, fused_decode, admit_batch, backend (tensor-parallel folders add tp,
    timeout_s, heartbeat_s, startup_timeout_s; diffusion folders take threads, backend and device). Returns a
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
        tensor_parallel = is_tensor_parallel(manifest)
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
                 admit_batch: int | None = None, backend: str | None = None, kv_layout: str = "slots",
                 kv_block_size: int | None = None, prefix_caching: bool = True):
    """``prefill_chunk``: prompt tokens prefilled per iteration (None: 128 on the CPU, 1024 on
    CUDA; ``scheduler.PREFILL_CHUNK``). ``admit_batch``: requests admitted together while the
    slots are busy (None: 1 on the CPU, 8 on CUDA; ``scheduler.ADMIT_BATCH``).
    ``fused_decode``: run one-token steps through the folder's fused decode part
    (GroupQueryAttention, K/V written in place) when it has one; None = yes if present
    (``EMBER_FUSED_DECODE=0`` says no). ``backend``: None (the step part's own) or
    ``'onnxruntime'`` (a plan's source ONNX graph on ONNX Runtime; ``load`` checks it).
    ``kv_layout``: ``'slots'`` (default) or ``'paged'`` (blocks of ``kv_block_size`` tokens with
    prefix caching, which ``prefix_caching=False`` turns off: ``engine_builder.SchedulerOptions``,
    docs/kv.md; None: ``kv_blocks.default_kv_block_size``, 256 or 128 on CUDA (FlashAttention's tile at the head size), 16 elsewhere). Paged on the CPU runs the
    step graph over gathered blocks (no fused decode part); on CUDA it runs the folder's paged
    step graph (``ember compile --dtype fp16 --paged on``) alone: one copy of the weights."""
    from ember.runtime.engine_builder import SchedulerOptions, make_engine, make_scheduler
    from ember.runtime.executor import LocalExecutor
    from ember.runtime.kv_pool import KVPool

    cfg = check_decoder_config(manifest.model, str(folder / MANIFEST_NAME))
    part = manifest.part("step")
    geometry = kv_geometry(cfg)
    kv_dtype = part.tensor(PAST_KEY, layer=0).dtype
    paged_part = None
    if kv_layout == "paged" and device.startswith("cuda"):
        paged_part = manifest.find_part("paged")
        if paged_part is None:
            raise InputError(f"{folder}: kv_layout='paged' on {device} runs the folder's paged step graph, which it does "
                             f"not have; recompile with `ember compile SOURCE --dtype fp16 --paged on`, or load with "
                             f"kv_layout='slots' (CLI: --kv-layout slots)")
        kv_dtype = paged_part.tensor(KEY_CACHE, layer=0).dtype
    if kv_block_size is None:
        kv_block_size = default_kv_block_size(device, geometry.head_dim)
    options = SchedulerOptions(max_batch, kv_memory, max_queue, prefill_chunk, compaction, admit_batch, kv_layout,
                               kv_block_size, prefix_caching)
    scheduler = make_scheduler(options, max_positions=int(cfg["max_positions"]), geometry=geometry, kv_dtype=kv_dtype,
                               device=device, rope_switch=longrope_switch(cfg, part, str(folder / MANIFEST_NAME)))
    if runs_plan(part, backend) and not device.startswith("cuda"):
        raise plan_needs_gpu(folder, part, device)
    if fused_decode is None:
        fused_decode = os.environ.get("EMBER_FUSED_DECODE", "1") != "0"
    decode_part = manifest.find_part("decode") if fused_decode else None
    if device == "cpu":
        from ember.ort.decode_session import DecodeSession
        from ember.ort.session import StepSession

        session = StepSession(onnx_graph(folder, part), geometry.num_layers, threads=threads,
                              disabled_optimizers=part.extra.get("ort_disabled_optimizers"))
        if kv_layout == "paged":
            from ember.runtime.paged_executor import HostPagedExecutor

            executor = HostPagedExecutor(session, geometry, scheduler.blocks.num_blocks, kv_block_size, kv_dtype)
            return make_engine(manifest, scheduler, executor, load_tokenizer(folder, manifest))
        decode = (DecodeSession(resolve_member(folder, decode_part.file, "parts[decode]"), geometry.num_layers,
                                threads=threads) if decode_part else None)
        pool = KVPool(*geometry[:3], slots=max_batch, max_capacity=scheduler.max_seq_len, dtype=kv_dtype,
                      layer_rings=geometry.layer_rings)
        executor = LocalExecutor(session, pool, decode=decode)
    elif paged_part is not None:  # one graph for every step: the step graph and the fused part stay on disk
        from ember.runtime.cuda_paged import PagedGraphExecutor, cuda_paged_session
        from ember.runtime.cuda_session import parse_device
        from ember.runtime.paged_memory import memory_plan, weight_bytes

        index = parse_device(device)
        path = resolve_member(folder, paged_part.file, "parts[paged]")
        max_blocks = -(-scheduler.max_seq_len // kv_block_size)
        session = cuda_paged_session(path, int(cfg["vocab_size"]), scheduler.max_batch, max_blocks, device_index=index)
        executor = PagedGraphExecutor(session, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                                      scheduler.blocks.num_blocks, kv_block_size, device=f"cuda:{index}",
                                      kv_dtype=kv_dtype)
        executor.memory_plan = memory_plan(cfg, weight_bytes(path), executor.pool_bytes, session.buffer_bytes,
                                           max_tokens=scheduler.prefill_chunk + scheduler.max_batch,
                                           max_rows=scheduler.max_batch, max_seq_len=scheduler.max_seq_len)
    elif device.startswith("cuda"):
        from ember.runtime.cuda_session import make_cuda_executor

        executor = make_cuda_executor(folder, manifest, part, device, max_batch, scheduler.max_seq_len,
                                      decode_part=decode_part, backend=backend)
    else:
        raise InputError(f"device {device!r} is not understood; use 'cpu' or 'cuda:N'")
    return make_engine(manifest, scheduler, executor, load_tokenizer(folder, manifest))


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
