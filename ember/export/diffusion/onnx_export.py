"""torch -> ONNX for the four diffusion engine parts (text encoder, UNet full/shallow, VAE decoder).

Every graph has a dynamic ``batch`` dim; the image size and text length are fixed at compile
time (the manifest records them; the runtime rejects other sizes). Graph I/O names are the
contract between compiler and runtime and are listed in ``PART_IO``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ember.export.diffusion.source import DiffusionSource
from ember.export.diffusion.unet_split import TextEncoder, UNetFull, UNetShallow, VaeDecoder

OPSET = 17

PART_IO: dict[str, tuple[list[str], list[str]]] = {
    "text_encoder": (["input_ids"], ["text_embeddings"]),
    "unet_full": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred", "cached"]),
    "unet_shallow": (
        ["sample", "timestep", "encoder_hidden_states", "cached", "cache_scale", "cache_bias", "quant_scale", "quant_bias"],
        ["noise_pred"],
    ),
    "vae_decoder": (["latents"], ["image"]),
}


def example_inputs(src: DiffusionSource, branch: int, batch: int = 2) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example inputs per part (batch ``batch``), used for tracing and for MAC counts."""
    u = src.unet
    h = src.sample_size
    c = src.latent_channels
    shallow = UNetShallow(u, branch)
    cc, qc = shallow.cache_channels, shallow.quant_channels
    _, cached = UNetFull(u, branch)(
        torch.zeros(1, c, h, h), torch.zeros(1), torch.zeros(1, src.max_text_length, u.config.cross_attention_dim)
    )
    ctx = torch.randn(batch, src.max_text_length, int(u.config.cross_attention_dim))
    x = torch.randn(batch, c, h, h)
    t = torch.full((batch,), 500.0)
    return {
        "text_encoder": (torch.zeros(batch, src.max_text_length, dtype=torch.int64),),
        "unet_full": (x, t, ctx),
        "unet_shallow": (
            x, t, ctx, torch.randn(batch, cc, *cached.shape[2:]),
            torch.ones(batch, cc), torch.zeros(batch, cc), torch.ones(batch, qc), torch.zeros(batch, qc),
        ),
        "vae_decoder": (torch.randn(batch, c, h, h),),
    }


def part_modules(src: DiffusionSource, branch: int) -> dict[str, torch.nn.Module]:
    return {
        "text_encoder": TextEncoder(src.text_encoder).eval(),
        "unet_full": UNetFull(src.unet, branch).eval(),
        "unet_shallow": UNetShallow(src.unet, branch).eval(),
        "vae_decoder": VaeDecoder(src.vae).eval(),
    }


def export_parts(src: DiffusionSource, folder: Path, branch: int) -> dict[str, Path]:
    """Write ``<part>.onnx`` for every part into ``folder``; returns part -> path."""
    mods = part_modules(src, branch)
    with torch.no_grad():
        examples = example_inputs(src, branch)
    out: dict[str, Path] = {}
    for name, mod in mods.items():
        ins, outs = PART_IO[name]
        path = folder / f"{name}.onnx"
        dyn = {n: {0: "batch"} for n in ins + outs}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                mod, examples[name], str(path), input_names=ins, output_names=outs,
                dynamic_axes=dyn, opset_version=OPSET, dynamo=False,
            )
        out[name] = path
    return out


def count_macs(src: DiffusionSource, branch: int) -> dict[str, int]:
    """Multiply-accumulates per sample of each part (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    mods = part_modules(src, branch)
    with torch.no_grad():
        examples = example_inputs(src, branch, batch=1)
    macs: dict[str, int] = {}
    for name, mod in mods.items():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            mod(*examples[name])
        macs[name] = int(counter.get_total_flops() // 2)
    return macs


def tensor_specs(name: str, src: DiffusionSource, branch: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest I/O specs (dim names for batch, ints elsewhere) of a part."""
    with torch.no_grad():
        ex = example_inputs(src, branch, batch=1)
        outs = part_modules(src, branch)[name](*ex[name])
    outs = outs if isinstance(outs, tuple) else (outs,)
    ins_n, outs_n = PART_IO[name]

    def spec(n: str, t: torch.Tensor) -> dict[str, Any]:
        return {"name": n, "dtype": str(t.numpy().dtype), "shape": ["batch", *t.shape[1:]]}

    return [spec(n, t) for n, t in zip(ins_n, ex[name])], [spec(n, t) for n, t in zip(outs_n, outs)]
