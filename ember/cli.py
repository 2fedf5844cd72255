"""``ember`` command line: a thin layer over the Python API (every option has an API twin).

Errors an input can cause (EmberError) print as one line on stderr with exit code 2,
not a traceback; ``EMBER_DEBUG=1`` shows the traceback. A subcommand whose optional
dependencies are not installed stays listed; running it names the extra to install (exit 2).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ember.errors import EmberError

# Subcommands that live with their feature: module path (its add_parser(subparsers)) ->
# (the subcommands it adds, the pyproject extra that installs their dependencies).
EXTENSIONS = {
    "ember.runtime.diffusion.cli": (("generate-image",), "diffusion"),
    "ember.server.cli": (("serve",), "serve"),
    "ember.bench.cli": (("bench",), "bench"),
    "ember.check_cli": (("check",), "gpu"),
}
# Optional dependencies -> the extra that installs them (pyproject.toml's optional-dependencies).
EXTRA_OF_MODULE = {"torch": "export", "transformers": "export", "diffusers": "diffusion", "PIL": "diffusion",
                   "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "httpx": "serve", "jinja2": "serve",
                   "matplotlib": "bench", "polygraphy": "gpu"}
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM during a compile, raised in the main thread so it unwinds (and cleans up) like Ctrl-C."""


def missing_extra(command: str, extra: str, module: str) -> EmberError:
    return EmberError(f"`ember {command}` needs the '{extra}' extra ({module} is not installed): "
                      f"pip install 'ember[{extra}]'")


def require_modules(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Import ``modules`` up front; a missing one is an EmberError naming ``extra``."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != name:
                raise
            raise missing_extra(command, extra, name) from None


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (the previous handler is
    restored after); a second SIGTERM during the cleanup does not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def on_sigterm(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a model source into an engine folder")
    p.add_argument("source", help="a local Hugging Face model folder, or a built-in config "
                                  "(gpt2-tiny, gpt2-124m, llama-tiny, llama-1b, sd-tiny, sd-small, sd-15-shape)")
    p.add_argument("-o", "--output", help="engine folder to write: a new or empty folder (default: artifacts/<name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing engine folder at -o (only once the new one is complete; a folder that "
                        "is not an engine folder is never replaced)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx"],
                   help="onnxruntime (CPU and GPUs), tensorrt (a plan for this machine's GPU) or tensorrt-rtx "
                        "(TensorRT-RTX plans for --trt-targets, built without a GPU; docs/gpu.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--quantize", choices=["int8", "fp8", "int8-weights", "int4"],
                   help="int8 / fp8: W8A8 Q/DQ (TensorRT-compatible); int8-weights: 8-bit weights, block-wise "
                        "MatMulNBits on onnxruntime, per-channel Q/DQ on TensorRT; int4: 4-bit block-wise MatMulNBits "
                        "(onnxruntime; docs/quantization.md)")
    p.add_argument("--block-size", type=int, metavar="32|64|128",
                   help="(int4, int8-weights on onnxruntime) weights per scale along K (default 32)")
    p.add_argument("--int4-method", default="rtn", metavar="rtn|hqq|gptq",
                   help="(int4) rtn: round to nearest (default); hqq: half-quadratic, no data; gptq: from --calib")
    p.add_argument("--symmetric", action="store_true", help="(int4, int8-weights) no zero points")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="(int4, int8-weights) quantize the LM head too (default: kept FP32, like the embedding)")
    p.add_argument("--quantize-sites", metavar="SITE=SCHEME[,...]",
                   help="(int4, int8-weights) a scheme per site in place of --quantize's: sites attention, mlp; "
                        "schemes int4, int8-weights, float; e.g. --quantize int4 --quantize-sites attention=int8-weights")
    p.add_argument("--calib", help="calibration prompts: a text file (one per line) or a JSON list")
    p.add_argument("--calib-method", default="max", choices=["max", "percentile", "entropy"])
    p.add_argument("--smoothquant", type=float, metavar="ALPHA", help="SmoothQuant migration strength (e.g. 0.5)")
    p.add_argument("--max-error", type=float, help="fail if the quantized engine's relative error exceeds this")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (one engine per rank)")
    p.add_argument("--fused-decode", default="auto", choices=["auto", "on", "off"],
                   help="add the fused decode graph (ONNX Runtime GroupQueryAttention, K/V updated in place) that "
                        "runs one-token steps; auto = --dtype fp16 (every family the part can express); on = FP32 too "
                        "(CPU: faster decode, a second copy of the weights in memory; docs/gpu.md)")
    p.add_argument("--paged", default="off", choices=["on", "off"],
                   help="also write the paged step graph (ONNX Runtime PagedAttention, CUDA, FP16: packed prefill and "
                        "decode tokens over a shared block pool) that serves --kv-layout paged on a GPU (docs/kv.md)")
    p.add_argument("--kv-dtype", default="fp16", choices=["fp16", "int8", "fp8"],
                   help="element type of the paged step graph's KV pools (with --paged on): int8 or fp8 (e4m3) halve "
                        "the KV memory, with per-channel scales computed at compile time from --calib (or built-in / "
                        "random prompts) (docs/kv.md, 'Quantized KV')")
    p.add_argument("--seed", type=int, default=0, help="seed of a built-in config's random weights")
    trt = p.add_argument_group("TensorRT (--backend tensorrt or tensorrt-rtx; see docs/gpu.md)")
    trt.add_argument("--trt-targets", metavar="LIST",
                     help="(tensorrt-rtx) GPUs the plans run on, e.g. sm86,sm89 or 8.6,8.9; valid: sm75, sm80, sm86, "
                          "sm89, sm120, sm121 (default: sm80 and newer; sm89 and newer for --quantize fp8)")
    trt.add_argument("--version-compatible", action="store_true",
                     help="(tensorrt) plan loads on later TensorRT of the same major")
    trt.add_argument("--hardware-compatibility-level", choices=["none", "ampere+", "same-compute-capability"],
                     help="(tensorrt) GPUs other than the build machine's that the plan runs on")
    trt.add_argument("--timing-cache", metavar="PATH", help="(tensorrt) timing cache file (locked and merged)")
    trt.add_argument("--trt-max-batch", type=int, metavar="N",
                     help="largest batch of the plans' profiles (decoders: the decode profile, default 128; "
                          "diffusion parts: default 16)")
    trt.add_argument("--builder-optimization-level", type=int, choices=range(6), metavar="0-5")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX-vs-torch check after export")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_compile, needs_extra="export")
    try:
        from ember.diffusion_cli import add_diffusion_compile_args

        add_diffusion_compile_args(p)
    except ImportError:
        pass


def _is_diffusion_source(source: str) -> bool:
    return source.startswith("sd-") or (Path(source) / "model_index.json").exists()


def _trt_options(a) -> dict:
    """The TensorRT flags given, as ``TensorRTOptions`` fields (checked per backend by the compile)."""
    trt = {"version_compatible": a.version_compatible or None,
           "hardware_compatibility_level": a.hardware_compatibility_level, "timing_cache": a.timing_cache,
           "max_batch": a.trt_max_batch, "builder_optimization_level": a.builder_optimization_level,
           "targets": a.trt_targets}
    extra = {k: v for k, v in trt.items() if v is not None}
    if extra and a.backend not in ("tensorrt", "tensorrt-rtx"):
        flags = ", ".join("--" + {"max_batch": "trt_max_batch", "targets": "trt_targets"}.get(k, k).replace("_", "-")
                          for k in extra)
        raise EmberError(f"TensorRT options ({flags}) need --backend tensorrt or --backend tensorrt-rtx")
    return extra


def _cmd_compile(a) -> int:
    out = a.output or str(Path("artifacts") / Path(a.source.rstrip("/")).name)
    a.trt_options = _trt_options(a)
    if _is_diffusion_source(a.source):
        blockwise = [f for f, given in (("--block-size", a.block_size is not None), ("--int4-method", a.int4_method != "rtn"),
                                        ("--symmetric", a.symmetric), ("--quantize-lm-head", a.quantize_lm_head),
                                        ("--quantize-sites", a.quantize_sites is not None)) if given]
        if blockwise:
            raise EmberError(f"{', '.join(blockwise)}: diffusion engines have no block-wise quantization; "
                             f"use --quantize int8 or int8-weights")
        a.needs_extra = "diffusion"
        require_modules("compile", "diffusion", ("torch", "transformers", "diffusers"))
        from ember.diffusion_cli import run_diffusion_compile

        with sigterm_interrupts():
            return run_diffusion_compile(a, out)
    require_modules("compile", "export", ("torch",))
    from ember.compiler.compile import CompileOptions, compile_decoder
    from ember.compiler.quantize_sites import parse_sites

    extra = a.trt_options
    opts = CompileOptions(backend=a.backend, dtype=a.dtype, quantize=a.quantize, calib=a.calib,
                          calib_method=a.calib_method, smoothquant=a.smoothquant, max_error=a.max_error,
                          block_size=a.block_size, int4_method=a.int4_method, symmetric=a.symmetric,
                          quantize_lm_head=a.quantize_lm_head,
                          quantize_sites=parse_sites(a.quantize_sites) if a.quantize_sites is not None else {},
                          seed=a.seed, validate=not a.no_validate, tp=a.tp, fused_decode=a.fused_decode, paged=a.paged,
                          kv_dtype=a.kv_dtype,
                          overwrite=a.overwrite, quiet=a.quiet, extra=extra)
    with sigterm_interrupts():
        compile_decoder(a.source, out, opts)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print an engine folder's manifest in human form")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(a) -> int:
    from ember.compiler.inspect import describe
    from ember.engine_format.manifest import read_manifest

    m = read_manifest(a.folder)
    print(m.to_json() if a.json else describe(m, Path(a.folder)))
    return 0


KV_LAYOUT_OPTIONS = ("kv_layout", "kv_block_size", "prefix_caching")  # the ember.load options they set


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: write 'on' or 'off'")
    return text == "on"


def add_kv_layout_arguments(g) -> None:
    """``--kv-layout`` / ``--kv-block-size`` / ``--prefix-cache`` (``ember serve`` and ``ember generate``),
    into ``KV_LAYOUT_OPTIONS``; None = ember.load's default."""
    g.add_argument("--kv-layout", default=None, choices=["slots", "paged"],
                   help="KV memory layout: 'slots' (default: one row per sequence) or 'paged' (blocks shared by every "
                        "sequence, with prefix caching and preemption; on a GPU it needs a folder compiled with --paged on)")
    g.add_argument("--kv-block-size", type=int, default=None,
                   help="tokens per KV block with --kv-layout paged (default: 256 or 128 on CUDA, FlashAttention's "
                        "tile for the head size; 16 on the CPU; docs/kv.md)")
    g.add_argument("--prefix-cache", dest="prefix_caching", type=_on_off, default=None, metavar="{on,off}",
                   help="with --kv-layout paged: share computed prompt blocks between requests (default on)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a compiled decoder")
    p.add_argument("folder")
    p.add_argument("prompt", nargs="+", help="one or more prompts (batched together)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--backend", default=None, choices=["onnxruntime"],
                   help="run a TensorRT / TensorRT-RTX folder's ONNX graphs with ONNX Runtime instead of its plans "
                        "(e.g. on a GPU the plans were not built for; docs/gpu.md)")
    p.add_argument("--tp", type=int, default=None, help="(tensor-parallel folders) number of ranks to launch")
    add_kv_layout_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="print whole completions at the end")
    p.add_argument("--json", action="store_true", help="print completions as JSON lines")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(a) -> int:
    import ember

    opts = {"threads": a.threads, "device": a.device}
    if a.backend is not None:
        opts["backend"] = a.backend
    if a.tp is not None:
        opts["tp"] = a.tp
    for name in KV_LAYOUT_OPTIONS:
        if getattr(a, name) is not None:
            opts[name] = getattr(a, name)
    t0 = time.perf_counter()
    with ember.load(a.folder, **opts) as eng:
        load_s = time.perf_counter() - t0
        stream_one = len(a.prompt) == 1 and not a.no_stream and not a.json

        def on_token(i, ev):
            sys.stdout.write(ev.text)
            sys.stdout.flush()

        t1 = time.perf_counter()
        res = eng.generate(a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                           top_p=a.top_p, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                           stream=on_token if stream_one else None)
        dt = time.perf_counter() - t1
    if stream_one:
        print()
    for i, c in enumerate(res):
        if a.json:
            print(json.dumps({"prompt": a.prompt[i], "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason.value}))
        elif not stream_one:
            print(f"--- [{i}] {a.prompt[i]!r} ({c.finish_reason.value})\n{c.text}")
    n = sum(len(c.token_ids) for c in res)
    print(f"[ember] {n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tok/s), load {load_s:.2f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: compile generative models, then run them.")
    parser.add_argument("--version", action="version", version=f"ember {__import__('ember').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_inspect(sub)
    _add_generate(sub)
    for mod, (commands, extra) in EXTENSIONS.items():
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            if e.name and mod.startswith(e.name):  # the feature's own module is not in this install
                continue
            # a dependency of an optional extra is not installed (e.g. `serve` without fastapi):
            # keep the subcommand listed; running it names the extra to install
            if e.name and e.name.split(".")[0] != "ember":
                for command in commands:
                    _add_unavailable(sub, command, extra, e.name.split(".")[0])
                continue
            raise
        m.add_parser(sub)
    return parser


def _add_unavailable(sub, command: str, extra: str, module: str) -> None:
    # prefix_chars no argument uses: every argument (options, --help) is taken as it is
    p = sub.add_parser(command, help=f"(needs the '{extra}' extra: pip install 'ember[{extra}]')",
                       prefix_chars="\0", add_help=False)
    p.add_argument("args", nargs="*")

    def unavailable(a) -> int:
        raise missing_extra(command, extra, module)

    p.set_defaults(func=unavailable)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        try:
            return a.func(a) or 0
        except ModuleNotFoundError as e:  # an optional dependency the command reached only now
            module = (e.name or "").split(".")[0]
            if module not in EXTRA_OF_MODULE:
                raise
            raise missing_extra(a.command, getattr(a, "needs_extra", None) or EXTRA_OF_MODULE[module], module) from e
    except EmberError as e:
        if os.environ.get("EMBER_DEBUG"):
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("ember: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
