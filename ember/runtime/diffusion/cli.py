"""``ember generate-image``: ``ember/cli.py`` calls ``add_parser(subparsers)``.

The diffusion flags of ``ember compile`` live in ``ember/diffusion_cli.py`` (a compile
calibrates by running the pipeline, so it sits above both the compiler and the runtime).
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
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: ONNX Runtime's CUDA provider, "
                   "device-resident latents, CUDA graphs (EMBER_CUDA_GRAPH=0 turns them off)")
    p.add_argument("--json", action="store_true", help="print timings and paths as JSON")
    p.set_defaults(func=cmd_generate_image)
    return p


add_parser = add_generate_image_parser  # the name ember.cli's extension loader calls


def cmd_generate_image(a) -> int:
    import ember

    pipe = ember.load(a.folder, threads=a.threads, device=a.device)
    res = pipe.generate(a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, seed=a.seed,
                        guidance_scale=a.guidance_scale, height=a.height, width=a.width, cache=not a.no_cache,
                        dec=not a.no_dec, stagger=a.stagger)
    out = Path(a.output)
    paths = [out] if len(a.prompt) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(a.prompt))]
    for i, path in enumerate(paths):
        res.save(path, i)
    info = {"images": [str(p) for p in paths], "timings": {k: round(v, 4) for k, v in res.timings.items()},
            "full_steps": res.loop.full_calls, "shallow_steps": res.loop.shallow_calls, "notes": res.notes,
            "device": a.device, "cuda_graphs": pipe.device_status}
    if a.json:
        print(json.dumps(info))
    else:
        for n in res.notes:
            print(f"note: {n}", file=sys.stderr)
        print(f"wrote {', '.join(info['images'])} in {res.timings['total_s']:.2f} s "
              f"(UNet {res.timings['unet_s']:.2f} s; {res.loop.full_calls} full + {res.loop.shallow_calls} shallow calls)")
    return 0
