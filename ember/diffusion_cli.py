"""The diffusion flags of ``ember compile`` and the compile they run (``ember/cli.py`` calls
``add_diffusion_compile_args(compile_parser)`` and ``run_diffusion_compile(args, out)``).

Top level, not in the compiler: a diffusion compile calibrates by running the runtime's
pipeline on the half-built folder, handed to ``compile_diffusion`` as ``open_pipeline``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_diffusion_compile_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``ember compile`` that only diffusion sources use (--quantize/--calib/--seed are shared)."""
    g = p.add_argument_group("diffusion (sd-* built-ins or a diffusers folder)")
    cache = g.add_mutually_exclusive_group()
    cache.add_argument("--cache-interval", type=int, default=None, metavar="N",
                       help="one full UNet step per N steps on average (1 = no caching)")
    cache.add_argument("--cache-speedup", type=float, default=None, metavar="X",
                       help="choose the full-step budget for a UNet-loop MACs speedup of X")
    g.add_argument("--schedule", choices=["dp", "uniform"], default="dp", help="cache schedule (default: dp)")
    g.add_argument("--cache-branch", type=int, default=0, help="skip branch to cache at (0 = shallowest)")
    g.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the source's)")
    g.add_argument("--dec", action="store_true", help="fit decoupled error-correction tables")
    g.add_argument("--dec-target", choices=["noise", "feature"], default="feature",
                   help="DEC cache table: the least-squares regression of the cached feature (default), or the "
                        "per-channel affine that minimises the shallow tail's guided-noise error (better where the "
                        "calibration prompts cover what is generated, worse where they do not; docs/diffusion.md)")
    g.add_argument("--dec-shrink", choices=["cv", "off"], default="cv",
                   help="keep per step the share of the DEC cache correction that lowers the guided-noise error most "
                        "on calibration runs the fit left out (cv, default; needs 2+ calibration runs), or all of it (off)")
    g.add_argument("--dec-uncond-runs", type=int, default=0, metavar="N",
                   help="DEC's fit also sees N calibration runs of the empty prompt (unconditional samples), which "
                        "the cache schedule does not (default 0; docs/diffusion.md)")
    g.add_argument("--calib-seeds", type=int, default=1, metavar="S",
                   help="calibration trajectories per calibration prompt (seeds 1000, 1001, ...; default 1)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps the schedule/DEC are fitted for")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="default CFG scale (also used in calibration)")
    g.add_argument("--schedule-features", choices=["auto", "float", "quantized"], default="auto",
                   help="measure DP/DEC features through the float or the quantized graphs (auto: quantized if --quantize)")
    g.add_argument("--schedule-distance", choices=["noise", "feature"], default="noise",
                   help="DP reuse cost: the error reusing a cached feature puts into the guided noise prediction, "
                        "measured through the shallow engine (default), or docs/design.md §5.2's feature L1 distance")
    g.add_argument("--schedule-weights", choices=["none", "sampler", "measured"], default="none",
                   help="weight each step's reuse cost: 'sampler', by how far the DDIM sampler carries a noise-prediction "
                        "error at that step into x_0 (undamped; overstates early steps on a trained model); 'measured', "
                        "by how far a perturbation of that step's prediction moves the final latent on the calibration "
                        "runs (costs steps + 1 calibration runs of UNet rows, batched)")
    g.add_argument("--fused-attention", choices=["auto", "on", "off"], default="auto",
                   help="rewrite the UNet attention into com.microsoft.MultiHeadAttention (auto: with --dtype fp16)")
    g.add_argument("--calib-device", default="cpu", help="where calibration runs the pipeline (cpu or cuda[:N])")
    g.add_argument("--ort-unet-fusions", action="store_true",
                   help="with --dtype fp16: also run ONNX Runtime's CUDA UNet fusions (NhwcConv, GroupNorm, "
                        "BiasSplitGelu): the folder then runs on --device cuda only")


def _prompts(path: str | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    text = Path(path).read_text()
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    return tuple(str(x) for x in items)


def run_diffusion_compile(a, out: str) -> int:
    from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    kw = dict(steps=a.steps, cache_interval=a.cache_interval, cache_speedup=a.cache_speedup, schedule=a.schedule,
              branch=a.cache_branch, image_size=a.image_size, quantize=a.quantize, calib_method=a.calib_method, dec=a.dec,
              dec_target=a.dec_target, dec_shrink=a.dec_shrink, calib_seeds=a.calib_seeds,
              dec_uncond_runs=a.dec_uncond_runs,
              schedule_features=a.schedule_features,
              schedule_weights=a.schedule_weights, schedule_distance=a.schedule_distance, guidance_scale=a.guidance_scale, seed=a.seed,
              validate=not getattr(a, "no_validate", False), overwrite=getattr(a, "overwrite", False),
              quiet=getattr(a, "quiet", False), backend=getattr(a, "backend", "onnxruntime"),
              backend_extra=getattr(a, "trt_options", {}), dtype=getattr(a, "dtype", "fp32"),
              fused_attention={"auto": None, "on": True, "off": False}[a.fused_attention], calib_device=a.calib_device,
              ort_unet_fusions=a.ort_unet_fusions)
    prompts = _prompts(getattr(a, "calib", None))
    if prompts is not None:
        kw["calib_prompts"] = prompts
    m = compile_diffusion(a.source, out, DiffusionCompileOptions(**kw), open_pipeline=DiffusionPipeline)
    c = m.extra["diffusion"]["cache"]
    print(f"wrote {out}: {c['method']} schedule, {c['budget']}/{c['steps']} full steps"
          + (f", {m.quantization['scheme']}" if m.quantization else "") + (", DEC" if m.extra["diffusion"]["dec"] else ""))
    return 0
