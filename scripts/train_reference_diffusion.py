#!/usr/bin/env python
"""Train Ember's reference diffusion pipeline on coloured shapes drawn with Pillow.

    python scripts/train_reference_diffusion.py                     # default run (about 12 min on 1 core)
    python scripts/train_reference_diffusion.py --unet-steps 20 --vae-steps 20 --images 240 -o /tmp/ref-diff

Writes a diffusers StableDiffusionPipeline folder (default artifacts/reference-diffusion/) that
``ember compile`` accepts, with training.json (steps, times, losses, VAE reconstruction PSNR, data
hash, seed, versions, machine). See docs/diffusion.md, "The trained reference pipeline".
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.reference.cli import add_overrides, run_training, training_parser  # noqa: E402
from ember.reference.diffusion_train import (  # noqa: E402
    DEFAULT_OUTPUT, DiffusionTrainConfig, config_with, train_reference_pipeline,
)


def main(argv: list[str] | None = None) -> int:
    d = DiffusionTrainConfig()
    ap = training_parser(__doc__, DEFAULT_OUTPUT)
    add_overrides(ap, d, {  # option: what it sets (its type and default come from DiffusionTrainConfig)
        "images": "rendered training images",
        "vae_steps": "autoencoder steps",
        "unet_steps": "UNet + text encoder steps; sets the LR schedule",
        "unet_batch": "latents per UNet step",
        "unet_lr": "peak learning rate of the UNet stage",
        "minutes": "wall-clock guard; stops the UNet stage early and says so",
        "seed": "random seed",
        "threads": "torch threads, fixed for determinism",
    })
    return run_training(ap, argv, d, config_with, train_reference_pipeline, summary)


def summary(record: dict) -> str:
    return (f"UNet {record['parameters']['unet']:,} parameters, {record['denoiser']['steps']} steps, "
            f"{record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
