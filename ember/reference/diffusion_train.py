"""Train the reference diffusion pipeline: an SD-1.x-shaped latent diffusion model on ``shapes``.

Two stages, both on the CPU:
1. an ``AutoencoderKL`` (32 px RGB <-> 16x16x4 latents) trained to reconstruct the shapes
   (MSE + a small KL term, SD's recipe); ``scaling_factor`` is set to 1 / std of the latents;
2. a ``UNet2DConditionModel`` (epsilon prediction, SD-1.x's scaled-linear betas) and its
   ``CLIPTextModel`` trained together on those latents, the prompt replaced by "" one time in
   ten so classifier-free guidance has an unconditional branch; the saved weights are an EMA.

Deterministic like ``ember.reference.train``: fixed seed, thread count and
``torch.use_deterministic_algorithms``; data and batches from seeded generators. A run that ends
at its step counts is reproduced bit for bit on the same machine type and torch version;
``minutes`` is a guard that stops the UNet stage early and says so (``stopped_by: "time"``).
The output is a diffusers ``StableDiffusionPipeline`` folder (``ember compile`` accepts it)
plus ``training.json``, written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ember.errors import InputError
from ember.export.diffusion.config import SD1_SCHEDULER
from ember.reference import shapes
from ember.reference.train import make_deterministic

DEFAULT_OUTPUT = Path("artifacts/reference-diffusion")
CFG_DROPOUT = 0.1  # fraction of training prompts replaced by "" (the unconditional branch)


@dataclass(frozen=True)
class DiffusionTrainConfig:
    image_size: int = 32
    images: int = 3072  # rendered training images (balanced over the 12 prompts)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three blocks: latent side = image side / 4
    text_hidden: int = 64
    text_layers: int = 2
    max_text_length: int = 24
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # 1800 x 32 latents at 2e-3 reached loss 0.034 in 500 s; 900 x 64 at 1e-3 (the same
    # images seen) 0.047 in 615 s, with blobbier shapes.
    unet_steps: int = 1800
    unet_batch: int = 32
    unet_lr: float = 2e-3
    warmup_steps: int = 100  # at most a tenth of unet_steps
    ema_decay: float = 0.999
    minutes: float = 30.0  # a guard only: a run it stops is not reproducible by its arguments
    seed: int = 0
    # One thread: on a shared 2-core host a 2-thread step waits at every parallel region for the
    # thread that was descheduled; measured 4-18 s vs 0.7 s per UNet step under load average 8.
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("images", "text_hidden", "text_layers", "vae_steps", "vae_batch", "unet_steps", "unet_batch",
                     "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1")
        down = 2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)
        if self.image_size % down:
            raise InputError(f"image_size={self.image_size} must be a multiple of {down} (VAE and UNet downsampling)")
        if self.max_text_length < max(len(p) for p in shapes.PROMPTS) + 2:
            raise InputError(f"max_text_length={self.max_text_length} is shorter than the longest prompt + BOS/EOS")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_modules(cfg: DiffusionTrainConfig) -> tuple[Any, Any, Any, Any]:
    """(tokenizer, text encoder, UNet, VAE) with seeded initial weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ember.export.diffusion.source import BOS, EOS, byte_level_tokenizer

    tok = byte_level_tokenizer(cfg.max_text_length)
    n = len(cfg.unet_channels)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=1, cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_text_length,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS),
        projection_dim=cfg.text_hidden))
    m = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * m,
                        up_block_types=("UpDecoderBlock2D",) * m, block_out_channels=cfg.vae_channels,
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=cfg.image_size)
    return tok, text, unet, vae


def lr_at(step: int, peak: float, total: int, warmup: int) -> float:
    warmup = max(1, min(warmup, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vae(vae, pixels, cfg: DiffusionTrainConfig, log: Callable[[str], None]) -> dict:
    """Fit the autoencoder; returns its record (final reconstruction MSE in [-1, 1] units)."""
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    losses = []
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_lr, cfg.vae_steps, cfg.warmup_steps)
        x = pixels[torch.randint(0, len(pixels), (cfg.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mse.item())
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: mse {losses[-1]:.5f}")
    vae.eval()
    return {"steps": cfg.vae_steps, "final_batch_mse": losses[-1]}


def encode_latents(vae, pixels, batch: int = 256):
    """Posterior means of ``pixels`` (unscaled), float32 [N, 4, h, w]."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def train_denoiser(unet, text, tok, latents, labels, cfg: DiffusionTrainConfig, start: float,
                   log: Callable[[str], None]) -> tuple[Any, Any, dict]:
    """Train UNet + text encoder on scaled latents; returns their EMA copies and the record."""
    import torch
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config({k: v for k, v in SD1_SCHEDULER.items() if k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")})
    alphas = noise_sched.alphas_cumprod.float()
    ids = torch.tensor([e.ids for e in tok.encode_batch(["", *shapes.PROMPTS])], dtype=torch.int64)  # row 0: ""
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    unet.train()
    text.train()
    losses, stopped_by, t0 = [], "max_steps", time.perf_counter()
    for step in range(cfg.unet_steps):
        if time.perf_counter() - start > cfg.minutes * 60:
            stopped_by = "time"
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.unet_lr, cfg.unet_steps, cfg.warmup_steps)
        pick = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[pick]
        rows = labels[pick] + 1
        rows = torch.where(torch.rand(cfg.unet_batch, generator=gen) < CFG_DROPOUT, torch.zeros_like(rows), rows)
        t = torch.randint(0, alphas.numel(), (cfg.unet_batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        cond = text(input_ids=ids[rows]).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            recent = float(np.mean(losses[-100:]))
            log(f"unet step {step}: loss {recent:.4f} (mean of last {min(100, len(losses))}) "
                f"lr {lr_at(step, cfg.unet_lr, cfg.unet_steps, cfg.warmup_steps):.2e} ({time.perf_counter() - t0:.0f} s)")
    tail = losses[-200:]
    return ema_unet, ema_text, {"steps": len(losses), "stopped_by": stopped_by,
                                "seconds": round(time.perf_counter() - t0, 1),
                                "final_loss_mean_200": float(np.mean(tail)) if tail else None}


def train_reference_pipeline(cfg: DiffusionTrainConfig, output: Path = DEFAULT_OUTPUT,
                             log: Callable[[str], None] = print) -> dict:
    """Render, train both stages, save the pipeline folder; returns the record (training.json)."""
    import diffusers
    import torch

    start = time.perf_counter()
    data = shapes.render_shapes(cfg.images, cfg.image_size, seed=cfg.seed)
    make_deterministic(cfg.seed, cfg.threads)
    tok, text, unet, vae = build_modules(cfg)
    pixels = torch.from_numpy(data.as_tensor_range())
    vae_record = train_vae(vae, pixels, cfg, log)
    raw = encode_latents(vae, pixels)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        recon_mse = float(torch.nn.functional.mse_loss(vae.decode(raw[:256]).sample, pixels[:256]))
    vae_record.update(scaling_factor=scaling, recon_mse=recon_mse, recon_psnr_db=10 * math.log10(4.0 / recon_mse))
    log(f"vae: reconstruction PSNR {vae_record['recon_psnr_db']:.1f} dB, scaling_factor {scaling:.4f}")
    ema_unet, ema_text, unet_record = train_denoiser(unet, text, tok, raw * scaling, torch.from_numpy(data.labels),
                                                     cfg, start, log)
    record = {
        "stopped_by": unet_record["stopped_by"], "wall_seconds": round(time.perf_counter() - start, 1),
        "vae": vae_record, "denoiser": unet_record,
        "parameters": {"unet": sum(p.numel() for p in ema_unet.parameters()),
                       "text_encoder": sum(p.numel() for p in ema_text.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters())},
        "data": {"images": cfg.images, "image_size": cfg.image_size, "prompts": list(shapes.PROMPTS),
                 "sha256": _sha256(data.images)},
        "config": asdict(cfg), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": cfg.threads},
    }
    log(f"trained in {record['wall_seconds']:.0f} s ({unet_record['steps']} UNet steps, "
        f"loss {unet_record['final_loss_mean_200']:.4f})")
    save_pipeline(cfg, tok, ema_text, ema_unet, vae, record, Path(output))
    return record


def _sha256(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_pipeline(cfg: DiffusionTrainConfig, tok, text, unet, vae, record: dict, output: Path) -> None:
    """Write the diffusers folder + training.json beside ``output`` and rename it into place."""
    from ember.export.diffusion.source import DiffusionSource, save_pipeline_folder

    src = DiffusionSource(
        name=output.name, unet=unet.eval(), text_encoder=text.eval(), vae=vae.eval(),
        scheduler_config={"_class_name": "DDIMScheduler", **SD1_SCHEDULER}, tokenizer=tok,
        max_text_length=cfg.max_text_length, pad_token_id=text.config.pad_token_id, sample_size=cfg.latent_size,
        vae_scale=cfg.image_size // cfg.latent_size, vae_scaling_factor=float(vae.config.scaling_factor),
        config=asdict(cfg))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    save_pipeline_folder(src, tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if output.exists():
        os.rename(output, old)
    os.rename(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def ensure_reference_pipeline(output: Path = DEFAULT_OUTPUT, cfg: DiffusionTrainConfig | None = None,
                              log: Callable[[str], None] = print) -> Path:
    """The cached folder at ``output``; trained first (the default config) when it is missing."""
    if not (Path(output) / "model_index.json").exists():
        log(f"{output} is missing: training the reference diffusion pipeline")
        train_reference_pipeline(cfg or DiffusionTrainConfig(), Path(output), log=log)
    return Path(output)


def config_with(cfg: DiffusionTrainConfig, **overrides) -> DiffusionTrainConfig:
    """``cfg`` with the non-None overrides applied (the CLI's flags)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
