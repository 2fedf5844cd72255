"""The decoder compile plan: source -> step graph ONNX -> passes -> backend engine -> folder.

``compile_decoder`` is the API behind ``ember compile``; every CLI option is a field of
``CompileOptions``. The folder is written atomically, and only where ``-o`` may write: a new or
empty folder, or an existing engine folder with ``overwrite`` (see ``ember.engine_format.writer``).
"""
from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ember.engine_format import manifest as mf
from ember.engine_format.io_specs import io_specs
from ember.engine_format.writer import atomic_folder, prepare_output, write_manifest
from ember.errors import ConfigError, EmberError
from ember.progress import StageLog

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")  # the last two: backends/tensorrt.py
DTYPES = ("fp32", "fp16")
QUANT_SCHEMES = ("int8", "fp8", "int8-weights", "int4")
# Block-wise weight-only schemes (com.microsoft.MatMulNBits, passes/matmul_nbits.py): int4 always, int8-weights on
# the ONNX Runtime backend (TensorRT builds keep its per-channel Q/DQ form, which they need).
BLOCKWISE_SCHEMES = ("int4", "int8-weights")
FUSED_DECODE = ("auto", "on", "off")
STEP_FILE = "step.onnx"


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "onnxruntime"
    dtype: str = "fp32"
    quantize: str | None = None  # int8 | fp8 | int8-weights | int4
    block_size: int | None = None  # block-wise schemes: K values per scale (32 | 64 | 128; default 32)
    int4_method: str = "rtn"  # rtn | hqq | gptq (--quantize int4)
    symmetric: bool = False  # block-wise schemes: no zero points
    quantize_lm_head: bool = False  # block-wise schemes: the LM head too (default: kept float)
    # block-wise schemes: a scheme per site in place of ``quantize``, e.g. {"attention": "int8-weights"}
    # (sites attention, mlp; schemes int4, int8-weights, float; compiler/quantize_sites.py)
    quantize_sites: dict = field(default_factory=dict)
    calib: str | None = None  # file of calibration prompts (one per line, or a JSON list)
    calib_method: str = "max"  # max | percentile | entropy
    smoothquant: float | None = None  # SmoothQuant alpha
    max_error: float | None = None  # fail compile if the quantized engine's relative error exceeds this
    seed: int = 0  # seed of built-in configs' random weights
    validate: bool = True  # check the ONNX against torch after export
    max_validation_error: float = 1e-3  # relative; beyond it the export is considered broken
    tp: int = 1
    fused_decode: str = "auto"  # auto | on | off: the GroupQueryAttention decode part (export/gqa_decode.py)
    paged: str = "off"  # on | off: the paged step graph (PagedAttention, export/paged_step.py) for kv_layout="paged" on CUDA
    kv_dtype: str = "fp16"  # fp16 | int8 | fp8: the paged graph's KV pools (export/kv_quant.py; scales from calibration)
    overwrite: bool = False  # replace an existing engine folder at the output path (--overwrite)
    quiet: bool = False
    extra: dict = field(default_factory=dict)  # TensorRT backends: TensorRTOptions fields (profiles, targets, ...)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANT_SCHEMES:
            raise ConfigError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANT_SCHEMES)}")
        self._check_blockwise()
        if self.tp < 1:
            raise ConfigError(f"--tp {self.tp} must be >= 1")
        if self.fused_decode not in FUSED_DECODE:
            raise ConfigError(f"--fused-decode {self.fused_decode!r} is not one of {', '.join(FUSED_DECODE)}")
        self._check_paged()
        from ember.compiler.backends.tensorrt import check_plan_options

        check_plan_options(self.backend, self.extra)  # before the export, not after it


    def _check_paged(self) -> None:
        if self.paged not in ("on", "off"):
            raise ConfigError(f"--paged {self.paged!r} is not one of on, off")
        from ember.export.kv_quant import kv_cache_dtype

        kv_cache_dtype(self.kv_dtype)
        if self.paged == "off":
            if self.kv_dtype != "fp16":
                raise ConfigError(f"--kv-dtype {self.kv_dtype} quantizes the KV pools of the paged step graph "
                                  f"(PagedAttention); add --paged on (with --dtype fp16), or drop --kv-dtype")
            return
        why = [w for w, bad in ((f"--backend {self.backend} (it is an ONNX Runtime graph)", self.backend != "onnxruntime"),
                                (f"--dtype {self.dtype} (PagedAttention runs FP16 only)", self.dtype != "fp16"),
                                (f"--quantize {self.quantize} (not yet for the paged graph)", self.quantize is not None),
                                (f"--tp {self.tp}", self.tp > 1)) if bad]
        if why:
            raise ConfigError(f"--paged on needs --backend onnxruntime --dtype fp16 without --quantize or --tp; "
                              f"not with {', '.join(why)}")

    @property
    def blockwise(self) -> bool:
        """Whether ``quantize`` runs as MatMulNBits (int4; int8-weights on the ONNX Runtime backend)."""
        return self.quantize == "int4" or (self.quantize == "int8-weights" and self.backend == "onnxruntime")

    @property
    def weight_schemes(self) -> set[str]:
        """The schemes the weight MatMuls get (``quantize_sites.weight_schemes``)."""
        from ember.compiler.quantize_sites import weight_schemes

        return weight_schemes(self.quantize, self.quantize_sites, self.quantize_lm_head)

    def _check_blockwise(self) -> None:
        from ember.compiler.quantize_sites import check_sites
        from ember.passes.matmul_nbits import BLOCK_SIZES, METHODS, require_working_gptq

        if self.quantize == "int4" and self.backend != "onnxruntime":
            raise ConfigError(f"--quantize int4 needs --backend onnxruntime (MatMulNBits is an ONNX Runtime operator); "
                              f"--backend {self.backend} takes int8, fp8 or int8-weights")
        if self.int4_method not in METHODS:
            raise ConfigError(f"--int4-method {self.int4_method!r} is not one of {', '.join(METHODS)}")
        check_sites(self.quantize_sites, self.quantize, self.quantize_lm_head)
        if self.int4_method != "rtn" and "int4" not in self.weight_schemes:
            raise ConfigError(f"--int4-method {self.int4_method} needs --quantize int4 (or an int4 site in "
                              f"--quantize-sites)")
        if self.int4_method == "gptq" and self.quantize_sites:
            raise ConfigError("--int4-method gptq quantizes the whole graph at one width; not with --quantize-sites "
                              "(use --int4-method rtn or hqq)")
        if self.int4_method == "gptq" and self.dtype == "fp16":
            raise ConfigError("--int4-method gptq calibrates the FP32 step graph; with --dtype fp16 use "
                              "--int4-method rtn or hqq")
        if self.int4_method == "gptq":
            require_working_gptq()  # before the export, not after it
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        flags = [f for f, given in (("--block-size", self.block_size is not None), ("--symmetric", self.symmetric),
                                    ("--quantize-lm-head", self.quantize_lm_head),
                                    ("--quantize-sites", bool(self.quantize_sites))) if given]
        if flags and not self.blockwise:
            why = (f"--quantize {self.quantize} on --backend {self.backend} is per-channel Q/DQ"
                   if self.quantize else "no --quantize was given")
            raise ConfigError(f"{', '.join(flags)} applies to block-wise --quantize int4 or int8-weights "
                              f"(ONNX Runtime backend); {why}")


def wants_fused_decode(options: CompileOptions, family: str, head_dim: int = 64, refusal: str | None = None) -> bool:
    """Whether to add the fused (GroupQueryAttention) decode part. ``auto``: for FP16 ONNX
    Runtime folders of the families in ``AUTO_FAMILIES`` (the GPU path, where it is 1.5-1.9x
    faster per decode step; ONNX Runtime's CUDA attention kernel is FP16/BF16 only), float or
    block-wise quantized (``--quantize int4|int8-weights``: the part gets the same MatMulNBits
    weights). ``on`` adds it to any family it covers and to FP32 folders: on the CPU it is
    within noise of the step graph and holds a second copy of the weights in memory
    (docs/gpu.md); ``on`` fails where it cannot apply, e.g. the Q/DQ schemes (int8, fp8).
    ``refusal``: what the model has that the part cannot express
    (``DecoderConfig.fused_decode_refusal``); ``ember inspect`` shows it."""
    from ember.export.gqa_decode import AUTO_FAMILIES, FAMILIES

    if options.fused_decode == "off":
        return False
    reasons = [r for r, bad in (
        (f"the {family} family (only the {', '.join(FAMILIES)} families have one)", family not in FAMILIES),
        (f"this {family} model ({refusal})", refusal is not None),
        (f"--backend {options.backend} (the part is an ONNX Runtime graph)", options.backend != "onnxruntime"),
        (f"--quantize {options.quantize} (the part takes the block-wise weight-only schemes, int4 and int8-weights "
         f"on --backend onnxruntime; a Q/DQ graph's int8 kernels have no fused form)",
         options.quantize is not None and not options.blockwise),
        (f"--tp {options.tp}", options.tp > 1),
        (f"head_dim {head_dim} (ONNX Runtime's GroupQueryAttention needs a multiple of 16)", head_dim % 16 != 0)) if bad]
    if options.fused_decode == "on" and reasons:
        raise ConfigError(f"--fused-decode on does not apply to {'; '.join(reasons)}; use --fused-decode off")
    return not reasons and (options.fused_decode == "on" or (options.dtype == "fp16" and family in AUTO_FAMILIES))


def compile_decoder(source: str, out: str | os.PathLike, options: CompileOptions = CompileOptions()) -> mf.Manifest:
    """Compile a decoder SOURCE (HF folder or built-in name) into the engine folder ``out``."""
    from ember.compiler.decoder_passes import LM_HEAD_GEMM, decoder_passes
    from ember.compiler.quantize_step import remove_spilled
    from ember.export.onnx_export import (check_against_reference, export_step_graph_file, save_onnx,
                                          torch_step_reference)
    from ember.export.sources import resolve_decoder_source
    from ember.passes.contract import PassContext, run_passes
    from ember.passes.matmul_nbits import NBitsCache

    prepare_output(out, overwrite=options.overwrite, source=source)  # fail before the long export
    passes = decoder_passes(options)
    log = StageLog(total=5 + len(passes) + int(options.validate) - 1, quiet=options.quiet)
    with log.stage(f"loading model source {source}"):
        src = resolve_decoder_source(source, seed=options.seed)
        c = src.config
        log.note(f"{c.family}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} kv, "
                 f"vocab {c.vocab_size}, {sum(p.numel() for p in src.model.parameters()) / 1e6:.1f} M parameters")
    fused = wants_fused_decode(options, c.family, c.head_dim, c.fused_decode_refusal())
    log.total += int(fused)  # the decode graph's own export stage
    paged = options.paged == "on"
    if paged:  # refuse an unsupported family before the long export
        from ember.export.paged_step import check_supported

        check_supported(c)
    if options.tp > 1:  # tensor parallel: per-rank segment engines (ember/compiler/tp_compile.py)
        from ember.compiler.tp_compile import compile_tp_folder

        return compile_tp_folder(src, out, options, log, source=source)
    with atomic_folder(out, overwrite=options.overwrite, source=source) as tmp:
        step_path = tmp / STEP_FILE
        records = []  # every pass's record, in order, for the manifest

        def export_rewrite(graph, base_dir):  # runs on the exported graph before it is written
            records.extend(run_passes([LM_HEAD_GEMM], graph, PassContext(folder=base_dir, options=options))[1])

        with log.stage("exporting the step graph to ONNX"):
            # big weights stay in step.onnx.data: passes read them a tensor at a time (export/external_data.py)
            proto = export_step_graph_file(src.model, c, step_path, rewrite=export_rewrite)
        check = None
        reference = torch_step_reference(src.model, c) if options.validate else None
        if fused:  # all the part needs from torch, before the torch weights go (compiler/fused_decode.py)
            from ember.compiler.fused_decode import export_float_decode

            with log.stage("fused decode graph export from torch"):
                decode = export_float_decode(src, tmp, options)
        if not paged:  # nothing below needs the torch weights: free them before ONNX Runtime maps its own
            src.model = None
            gc.collect()
        if reference is not None:
            with log.stage("validating ONNX against torch"):
                check = check_against_reference(c, step_path, reference)
                log.note(f"max abs error {check.max_abs_error:.2e}, max rel error {check.max_rel_error:.2e} ({check.worst_output})")
                if check.max_rel_error > options.max_validation_error:
                    raise EmberError(
                        f"exported graph differs from the torch model (relative error {check.max_rel_error:.2e} "
                        f"on {check.worst_output}); this is an Ember export bug: please report it with the source"
                    )
        # a fused block-wise compile quantizes each float weight the two graphs share once (issue 18)
        nbits_cache = NBitsCache() if fused and options.blockwise and options.int4_method != "gptq" else None
        proto, graph_records = run_passes(passes, proto, PassContext(folder=tmp, options=options, source=src, log=log,
                                                                     nbits_cache=nbits_cache))
        records += graph_records
        quant_info = next((r.record for r in graph_records if r.name == "quantize"), None)
        if any(r.changed for r in graph_records):
            save_onnx(proto, step_path, base_dir=tmp, keep_in_memory=False)
            remove_spilled(tmp)  # the Q/DQ pass's weights, copied into step.onnx.data by the save
        files = sorted(f.name for f in tmp.glob(STEP_FILE + "*"))
        with log.stage(f"building the {options.backend} engine" + (" + fused decode graph" if fused else "")
                       + (" + paged step graph" if paged else "")):
            parts = [_build_part(tmp, "step", step_path, files, options, max_past=c.max_positions)]
            if fused:
                from ember.compiler.fused_decode import fused_decode_part

                part, decode_files = fused_decode_part(decode, c, tmp, options, log, nbits_cache)
                parts.append(part)
                files += decode_files
            if paged:
                part, paged_files = paged_step_part(src, tmp, options, log)
                parts.append(part)
                files += paged_files
        m = write_decoder_manifest(
            src, tmp, parts, log, quantization=quant_info,
            tables=[mf.file_record(tmp, t) for t in sorted(_tables(tmp))],
            extra={"dtype": options.dtype, "export_check": check.to_dict() if check else None,
                   "options": options_record(options), "passes": [_pass_entry(r) for r in records]})
    if not options.quiet:
        total = sum((Path(out) / f).stat().st_size for f in files)
        log.note(f"wrote {out} ({total / 1e6:.1f} MB engine)")
    return m


def paged_step_part(src, folder: Path, options: CompileOptions, log: StageLog) -> tuple[mf.EnginePart, list[str]]:
    """Write ``paged_step.onnx`` (export/paged_step.py: packed tokens, PagedAttention over a block
    pool, FP16) and, with ``validate``, check it against the torch model through the numpy
    reference of its operators (``export/paged_reference.py``) on a packed call of two prompts."""
    from ember.export.onnx_export import save_onnx
    from ember.export.paged_step import PAGED_FILE, PAGED_PART, build_paged_graph, check_paged_against_torch

    path = folder / PAGED_FILE
    scales, part_extra = None, {}
    if options.kv_dtype != "fp16":
        scales, part_extra["kv_cache"] = paged_kv_scales(src, options, log)
    proto = build_paged_graph(src.model, src.config, host_bounds=True, kv_scales=scales, kv_dtype=options.kv_dtype)
    save_onnx(proto, path, keep_in_memory=False)
    del proto
    if options.validate:
        err = check_paged_against_torch(src.model, src.config, path)
        limit = PAGED_TOLERANCE[options.kv_dtype]
        log.note(f"paged step graph: max relative logits error {err:.2e} vs torch (numpy reference of PagedAttention, "
                 f"{options.kv_dtype} KV)")
        if err > limit:
            raise EmberError(f"the paged step graph ({options.kv_dtype} KV) differs from the torch model (relative "
                             f"error {err:.2e} > {limit}); this is an Ember export bug: please report it with the source")
        part_extra["check"] = {"max_rel_error": err, "against": "torch FP32, numpy reference of PagedAttention"}
    files = sorted(f.name for f in folder.glob(PAGED_FILE + "*"))
    part = _build_part(folder, PAGED_PART, path, files, options, cpu_kernels=False)
    part.extra.update(part_extra)
    return part, files


# paged graph vs FP32 torch, relative to the logits' scale, by --kv-dtype: FP16 rounding; and the
# quantized caches' (measured on llama-tiny / gpt2-tiny: int8 <= 1.1e-2, fp8 <= 2.5e-2; K and V scales 10x too small: > 0.5)
PAGED_TOLERANCE = {"fp16": 3e-2, "int8": 6e-2, "fp8": 1e-1}


def paged_kv_scales(src, options: CompileOptions, log: StageLog) -> tuple[list, dict]:
    """Per-channel K/V scales of the paged graph's int8 / fp8 pools from the torch step model on
    calibration prompts (``export/kv_quant.py``), and the manifest's record of them."""
    from ember.export.kv_quant import QUANT_TYPE, calibration_prompts, kv_bounds, kv_cache_dtype, kv_scales

    dtype = kv_cache_dtype(options.kv_dtype)
    prompts, source = calibration_prompts(src, options.calib, options.seed)
    bounds = kv_bounds(src.model, src.config, prompts)
    log.note(f"KV scales ({options.kv_dtype}, {QUANT_TYPE}): {len(prompts)} prompts from {source}; largest |K| "
             f"bound {max(float(k.max()) for k, _ in bounds):.3g}, |V| {max(float(v.max()) for _, v in bounds):.3g}")
    record = {"dtype": dtype.name, "quant_type": QUANT_TYPE, "scale_shape": [src.config.num_kv_heads, 1,
                                                                             src.config.head_dim],
              "scale": f"{dtype.headroom:g} x bound / {dtype.qmax:g}; V bound: per-channel absmax; K bound: " + (
                  "per-channel absmax (no rotary)" if src.config.positions == "learned" else
                  "per-channel max of the rotary pair norm sqrt(k_i^2 + k_(i+D/2)^2) (covers rotated K at every position)"),
              "calibration": {"source": source, "prompts": len(prompts), "tokens": sum(map(len, prompts))},
              "scale_initializers": "kv_scale.key.{layer}, kv_scale.value.{layer}"}
    return kv_scales(bounds, dtype), record


def _pass_entry(record) -> dict:
    """A pass's entry in the manifest's ``extra["passes"]``; the quantization pass's record is
    the manifest's ``quantization`` section, not repeated here."""
    entry = record.to_dict()
    if record.name == "quantize":
        entry.pop("record", None)
        entry["record_in"] = "quantization"
    return entry


def write_decoder_manifest(src, folder: Path, parts: list, log: StageLog, **fields) -> mf.Manifest:
    """Write the tokenizer and the decoder manifest of ``folder`` (the one home of that last
    stage for the plain and the tensor-parallel compile); ``fields``: further Manifest fields."""
    with log.stage("writing tokenizer and manifest"):
        tokenizer = write_tokenizer(src, folder)
        build = mf.build_environment()
        build["compile_times_s"] = log.times
        m = mf.Manifest(kind="decoder", model=model_record(src), parts=parts, tokenizer=tokenizer,
                        build=build, **fields)
        write_manifest(folder, m)
    return m


def model_record(src) -> dict:
    """The manifest's ``model`` entry for a decoder source."""
    c = src.config
    return {"name": src.name, "family": c.family, "origin": src.origin, "seed": src.seed, "config": c.to_dict(),
            "fused_decode_refusal": c.fused_decode_refusal()}


def options_record(options: CompileOptions) -> dict:
    """The compile options as recorded in the manifest (presentation-only fields left out)."""
    return {k: v for k, v in asdict(options).items() if k not in ("quiet", "overwrite")}


def write_tokenizer(src, folder: Path) -> dict | None:
    """Save the source's tokenizer (and chat template, if any) under ``folder/tokenizer/``; return
    the manifest's record: ``{file, sha256, size[, chat_template: {file, sha256, size}]}``."""
    if src.tokenizer is None:
        return None
    (folder / mf.TOKENIZER_DIR).mkdir()
    src.tokenizer.save(str(folder / mf.TOKENIZER_DIR / "tokenizer.json"))
    record = mf.file_record(folder, f"{mf.TOKENIZER_DIR}/tokenizer.json")
    if record["size"] > mf.MAX_TOKENIZER_BYTES:
        raise ConfigError(f"{src.name}: the tokenizer is {record['size']} bytes, over the {mf.MAX_TOKENIZER_BYTES}-byte "
                          f"limit an engine folder's tokenizer may have; use the model's own tokenizer")
    if src.chat_template:
        try:
            template = src.chat_template.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{src.name}: the chat template is not valid Unicode ({e.reason} at {e.start}); restore "
                              f"the model's original template") from e
        if len(template) > mf.MAX_TEMPLATE_BYTES:
            raise ConfigError(f"{src.name}: the chat template is {len(template)} bytes, over the "
                              f"{mf.MAX_TEMPLATE_BYTES}-byte limit; restore the model's original template")
        (folder / mf.CHAT_TEMPLATE_FILE).write_bytes(template)
        record["chat_template"] = mf.file_record(folder, mf.CHAT_TEMPLATE_FILE)
    return record


def _tables(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.glob("tables/*") if p.is_file()]


def _build_part(folder: Path, name: str, onnx_path: Path, files: list[str], options: CompileOptions,
                max_past: int | None = None, cpu_kernels: bool = True) -> mf.EnginePart:
    """The manifest part of ``onnx_path``; ``cpu_kernels``: every operator has an ONNX Runtime CPU
    kernel, so the part is checked by loading it here (a part with CUDA-only operators is checked
    by its builder: ``paged_step_part`` runs it through the reference evaluator)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = io_specs(proto)
    ext = [mf.file_record(folder, f) for f in files if f != onnx_path.name]
    if options.backend == "onnxruntime":
        from ember.compiler.backends.onnxruntime import check_loads

        if cpu_kernels:
            check_loads(onnx_path)
        rec = mf.file_record(folder, onnx_path.name)
        extra = {"dtype": options.dtype}
        from ember.passes.quant_graph import ort_disabled_optimizers

        disabled = ort_disabled_optimizers(proto)
        if disabled:  # Q/DQ graphs: keep ORT from undoing the int8 fusions (see quant_graph)
            extra["ort_disabled_optimizers"] = disabled
        return mf.EnginePart(name=name, backend="onnxruntime", file=rec["file"], sha256=rec["sha256"], size=rec["size"],
                             inputs=inputs, outputs=outputs, external_data=ext, extra=extra)
    from ember.compiler.backends.tensorrt import build_plan_part  # tensorrt | tensorrt-rtx

    part = build_plan_part(folder, name, onnx_path, inputs, outputs, options, max_past=max_past)
    part.external_data = ext  # the weights of the part's source ONNX (extra['source_onnx']), kept for `ember check`
    return part
