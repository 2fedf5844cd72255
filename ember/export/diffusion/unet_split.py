"""The UNet as two graphs around a cache branch (DeepCache / CacheQuant).

Branch ``b`` (0 = shallowest, CacheQuant's choice) caches the hidden state entering the
last ``b + 1`` layers (resnet [+ attention]) of the final up block:

- ``UNetFull``: the whole UNet; returns the noise prediction and that cached feature.
- ``UNetShallow``: time embedding, ``conv_in``, the first ``b`` layers of down block 0
  (they produce the skip inputs the tail needs), the tail of the final up block and the
  output head; takes the cached feature plus per-sample correction rows as inputs.

Correction inputs (decoupled error correction, docs/design.md §5.3), one row per sample:
``cache_scale``/``cache_bias`` [B, C_cache]: ``h <- scale * h + bias`` on the cached feature;
``quant_scale``/``quant_bias`` [B, C_out]: ``y <- scale * y + bias`` on the output of the
first tail resnet's ``conv1`` (the conv that consumes the cached channels). Identity rows
(ones, zeros) give the uncorrected graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.errors import ConfigError


def _has_xattn(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _layers(block: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    attns = list(block.attentions) if _has_xattn(block) else [None] * len(block.resnets)
    return list(zip(block.resnets, attns))


def check_branch(unet: Any, branch: int) -> None:
    """The final up block must consume conv_in's output and down block 0's layer outputs."""
    lpb = len(unet.down_blocks[0].resnets)
    tail = len(unet.up_blocks[-1].resnets)
    if tail != lpb + 1:
        raise ConfigError(
            f"final up block has {tail} layers but down block 0 has {lpb}; the cache split needs layers_per_block + 1"
        )
    if not 0 <= branch <= lpb:
        raise ConfigError(f"cache branch {branch} is out of range for this UNet: choose 0 (shallowest) .. {lpb}")


def time_embedding(unet: Any, timestep: torch.Tensor) -> torch.Tensor:
    """timestep [B] float -> embedding [B, E] (as UNet2DConditionModel.forward)."""
    t_emb = unet.time_proj(timestep).to(torch.float32)
    return unet.time_embedding(t_emb)


def _layer(resnet: nn.Module, attn: nn.Module | None, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    h = resnet(h, emb)
    if attn is not None:
        h = attn(h, encoder_hidden_states=ctx, return_dict=False)[0]
    return h


def _head(unet: Any, h: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _resnet_with_conv1_affine(resnet: nn.Module, x: torch.Tensor, emb: torch.Tensor, qs: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """diffusers ResnetBlock2D.forward (default options) with ``conv1(x) * qs + qb``."""
    h = resnet.nonlinearity(resnet.norm1(x))
    h = resnet.conv1(h) * qs[:, :, None, None] + qb[:, :, None, None]
    t = resnet.time_emb_proj(resnet.nonlinearity(emb))[:, :, None, None]
    h = resnet.nonlinearity(resnet.norm2(h + t))
    h = resnet.conv2(resnet.dropout(h))
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x)
    return (x + h) / resnet.output_scale_factor


def _check_resnet(resnet: nn.Module) -> None:
    if resnet.upsample or resnet.downsample or resnet.time_embedding_norm != "default" or resnet.skip_time_act:
        raise ConfigError("the cache branch's first resnet uses options the split does not implement (up/down/scale-shift)")


class UNetFull(nn.Module):
    """(sample [B,C,h,w], timestep [B], encoder_hidden_states [B,S,D]) -> (noise [B,C,h,w], cached [B,Cc,h,w])."""

    def __init__(self, unet: Any, branch: int = 0) -> None:
        super().__init__()
        check_branch(unet, branch)
        self.unet, self.branch = unet, branch

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        u, ctx = self.unet, encoder_hidden_states
        emb = time_embedding(u, timestep)
        h = u.conv_in(sample)
        res: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks:
            if _has_xattn(block):
                h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=ctx)
            else:
                h, r = block(hidden_states=h, temb=emb)
            res += r
        h = u.mid_block(h, emb, encoder_hidden_states=ctx)
        for block in u.up_blocks[:-1]:
            n = len(block.resnets)
            skips, res = res[-n:], res[:-n]
            h = block(h, skips, emb, ctx) if _has_xattn(block) else block(h, skips, emb)
        layers = _layers(u.up_blocks[-1])
        start = len(layers) - 1 - self.branch
        cached = h
        for j, (resnet, attn) in enumerate(layers):
            if j == start:
                cached = h
            h = torch.cat([h, res[-1]], dim=1)
            res = res[:-1]
            h = _layer(resnet, attn, h, emb, ctx)
        return _head(u, h), cached


class UNetShallow(nn.Module):
    """(sample, timestep, encoder_hidden_states, cached, cache_scale, cache_bias, quant_scale, quant_bias) -> noise."""

    def __init__(self, unet: Any, branch: int = 0) -> None:
        super().__init__()
        check_branch(unet, branch)
        self.unet, self.branch = unet, branch
        layers = _layers(unet.up_blocks[-1])
        self.tail = layers[len(layers) - 1 - branch :]
        _check_resnet(self.tail[0][0])

    @property
    def cache_channels(self) -> int:
        return int(self.tail[0][0].in_channels) - self._skip_channels()

    def _skip_channels(self) -> int:
        u = self.unet
        if self.branch == 0:
            return int(u.conv_in.out_channels)
        return int(u.down_blocks[0].resnets[self.branch - 1].out_channels)

    @property
    def quant_channels(self) -> int:
        return int(self.tail[0][0].conv1.out_channels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cached: torch.Tensor,
        cache_scale: torch.Tensor,
        cache_bias: torch.Tensor,
        quant_scale: torch.Tensor,
        quant_bias: torch.Tensor,
    ) -> torch.Tensor:
        u, ctx = self.unet, encoder_hidden_states
        emb = time_embedding(u, timestep)
        h = u.conv_in(sample)
        res = [h]
        for resnet, attn in _layers(u.down_blocks[0])[: self.branch]:
            h = _layer(resnet, attn, h, emb, ctx)
            res.append(h)
        h = cached * cache_scale[:, :, None, None] + cache_bias[:, :, None, None]
        for j, (resnet, attn) in enumerate(self.tail):
            h = torch.cat([h, res.pop()], dim=1)
            if j == 0:
                h = _resnet_with_conv1_affine(resnet, h, emb, quant_scale, quant_bias)
                if attn is not None:
                    h = attn(h, encoder_hidden_states=ctx, return_dict=False)[0]
            else:
                h = _layer(resnet, attn, h, emb, ctx)
        return _head(u, h)


class TextEncoder(nn.Module):
    """input_ids [B,S] int64 -> last_hidden_state [B,S,D]."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """latents [B,C,h,w] (unscaled sampler output) -> image [B,3,H,W] in [-1, 1] (not clamped)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale, return_dict=False)[0]
