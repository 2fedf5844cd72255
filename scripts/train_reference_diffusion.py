#!/usr/bin/env python
"""Train Ember's reference diffusion pipeline on coloured shapes drawn with Pillow.

    python scripts/train_reference_diffusion.py                     # default run (about 12 min on 1 core)
    python scripts/train_reference_diffusion.py --unet-steps 20 --vae-steps 20 --images 240 -o /tmp/ref-diff

Writes a diffusers StableDiffusionPipeline folder (default artifacts/reference-diffusion/) that
``ember compile`` accepts, with training.json (steps, times, losses, VAE reconstruction PSNR, data
hash, seed, versions, machine). See docs/diffusion.md, "The trained reference pipeline".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.errors import EmberError  # noqa: E402
from ember.reference.diffusion_train import (  # noqa: E402
    DEFAULT_OUTPUT, DiffusionTrainConfig, config_with, train_reference_pipeline,
)


def main(argv: list[str] | None = None) -> int:
    d = DiffusionTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help=f"folder (default {DEFAULT_OUTPUT})")
    ap.add_argument("--images", type=int, help=f"rendered training images (default {d.images})")
    ap.add_argument("--vae-steps", type=int, help=f"autoencoder steps (default {d.vae_steps})")
    ap.add_argument("--unet-steps", type=int, help=f"UNet + text encoder steps; sets the LR schedule (default {d.unet_steps})")
    ap.add_argument("--unet-batch", type=int, help=f"latents per UNet step (default {d.unet_batch})")
    ap.add_argument("--unet-lr", type=float, help=f"peak learning rate of the UNet stage (default {d.unet_lr})")
    ap.add_argument("--minutes", type=float, help=f"wall-clock guard; stops the UNet stage early and says so (default {d.minutes})")
    ap.add_argument("--seed", type=int, help=f"default {d.seed}")
    ap.add_argument("--threads", type=int, help=f"torch threads, fixed for determinism (default {d.threads})")
    args = ap.parse_args(argv)
    try:
        cfg = config_with(d, **{k: v for k, v in vars(args).items() if k != "output"})
        record = train_reference_pipeline(cfg, args.output, log=lambda s: print(s, flush=True))
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} (UNet {record['parameters']['unet']:,} parameters, {record['denoiser']['steps']} steps, "
          f"{record['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
