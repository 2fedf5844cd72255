"""CLI pieces for diffusion: ``ember generate-image`` and the diffusion flags of ``ember compile``.

The lead's ``ember/cli.py`` calls ``add_parser(subparsers)`` (generate-image),
``add_diffusion_compile_args(compile_parser)`` and ``run_diffusion_compile(args, out)``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_generate_image_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate-image", help="generate images with a compiled diffusion folder")
    p.add_argument("folder", help="engine folder written by `ember compile sd-...`")
    p.add_argument("prompt", nargs="+", help="one or more prompts (fused into shared UNet calls)")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with several prompts, NAME-<i>.png")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the compiled count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt's noise (next prompts: seed+i)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: compiled)")
    p.add_argument("--height", type=int, default=None, help="must equal the compiled image size")
    p.add_argument("--width", type=int, default=None, help="must equal the compiled image size")
    p.add_argument("--no-cache", action="store_true", help="run every step on the full UNet")
    p.add_argument("--no-dec", action="store_true", help="ignore the error-correction tables")
    p.add_argument("--stagger", type=int, default=0, help="start prompt i after i*STAGGER steps (fusion demo)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print timings and paths as JSON")
    p.set_defaults(func=cmd_generate_image)
    return p


add_parser = add_generate_image_parser  # the name ember.cli's extension loader calls


def cmd_generate_image(a) -> int:
    import ember

    pipe = ember.load(a.folder, threads=a.threads)
    res = pipe.generate(a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, seed=a.seed,
                        guidance_scale=a.guidance_scale, height=a.height, width=a.width, cache=not a.no_cache,
                        dec=not a.no_dec, stagger=a.stagger)
    out = Path(a.output)
    paths = [out] if len(a.prompt) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(a.prompt))]
    for i, path in enumerate(paths):
        res.save(path, i)
    info = {"images": [str(p) for p in paths], "timings": {k: round(v, 4) for k, v in res.timings.items()},
            "full_steps": res.loop.full_calls, "shallow_steps": res.loop.shallow_calls, "notes": res.notes}
    if a.json:
        print(json.dumps(info))
    else:
        for n in res.notes:
            print(f"note: {n}", file=sys.stderr)
        print(f"wrote {', '.join(info['images'])} in {res.timings['total_s']:.2f} s "
              f"(UNet {res.timings['unet_s']:.2f} s; {res.loop.full_calls} full + {res.loop.shallow_calls} shallow calls)")
    return 0


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
    g.add_argument("--steps", type=int, default=50, help="denoising steps the schedule/DEC are fitted for")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="default CFG scale (also used in calibration)")
    g.add_argument("--schedule-features", choices=["auto", "float", "quantized"], default="auto",
                   help="measure DP/DEC features through the float or the quantized graphs (auto: quantized if --quantize)")
    g.add_argument("--schedule-weights", choices=["sampler", "none"], default="sampler",
                   help="weight each step's feature error in the DP objective by how far the sampler carries a "
                        "noise-prediction error at that step into x_0 (none: docs/design.md §5.2's unweighted J)")


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

    kw = dict(steps=a.steps, cache_interval=a.cache_interval, cache_speedup=a.cache_speedup, schedule=a.schedule,
              branch=a.cache_branch, image_size=a.image_size, quantize=a.quantize, calib_method=a.calib_method, dec=a.dec,
              schedule_features=a.schedule_features,
              schedule_weights=a.schedule_weights, guidance_scale=a.guidance_scale, seed=a.seed,
              validate=not getattr(a, "no_validate", False), overwrite=getattr(a, "overwrite", False),
              quiet=getattr(a, "quiet", False), backend=getattr(a, "backend", "onnxruntime"),
              backend_extra=getattr(a, "trt_options", {}))
    prompts = _prompts(getattr(a, "calib", None))
    if prompts is not None:
        kw["calib_prompts"] = prompts
    m = compile_diffusion(a.source, out, DiffusionCompileOptions(**kw))
    c = m.extra["diffusion"]["cache"]
    print(f"wrote {out}: {c['method']} schedule, {c['budget']}/{c['steps']} full steps"
          + (f", {m.quantization['scheme']}" if m.quantization else "") + (", DEC" if m.extra["diffusion"]["dec"] else ""))
    return 0
