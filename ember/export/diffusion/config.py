"""Diffusion pipeline configs: the built-in SD-1.x-shaped tables and their validation.

A ``DiffusionConfig`` describes the four parts Ember compiles (CLIP-style text encoder,
UNet2DConditionModel, AutoencoderKL decoder, DDIM-family scheduler) and the image size.
Built-ins get seeded random weights (performance does not depend on the weights;
fidelity is measured against the same model's uncompiled output).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ember.errors import ConfigError
from ember.export.config import bool_field, float_field, int_field

# Block types the UNet split understands (SD-1.x's set); anything else fails at compile time.
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# SD-1.x's scheduler config (scaled-linear betas, leading spacing, offset 1).
SD1_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Sizes of a built-in pipeline. ``sample_size`` is the latent side (image side / vae_scale)."""

    name: str
    sample_size: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_head_dim: int
    norm_num_groups: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_text_length: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_num_groups: int
    latent_channels: int = 4
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD1_SCHEDULER))

    def __post_init__(self) -> None:
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
            self.block_out_channels
        ):
            raise ConfigError(f"{self.name}: down/up block types must have one entry per block_out_channels")
        for t in self.down_block_types:
            if t not in DOWN_BLOCKS:
                raise ConfigError(f"{self.name}: down block {t!r} is not supported (supported: {', '.join(DOWN_BLOCKS)})")
        for t in self.up_block_types:
            if t not in UP_BLOCKS:
                raise ConfigError(f"{self.name}: up block {t!r} is not supported (supported: {', '.join(UP_BLOCKS)})")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae_scale

    def unet_kwargs(self) -> dict[str, Any]:
        return dict(
            sample_size=self.sample_size,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            layers_per_block=self.layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )

    def vae_kwargs(self) -> dict[str, Any]:
        n = len(self.vae_block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.vae_block_out_channels,
            layers_per_block=self.vae_layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.vae_norm_num_groups,
            sample_size=self.image_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# SD-1.x's UNet block structure: 3 cross-attention down blocks + a plain one, the up path mirrored,
# 2 layers per block
_SD1_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
)

BUILTIN: dict[str, DiffusionConfig] = {
    # Tests: runs in well under a second per UNet call.
    "sd-tiny": DiffusionConfig(
        name="sd-tiny",
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        text_hidden_size=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        max_text_length=16,
        vae_block_out_channels=(8, 16),
        vae_layers_per_block=1,
        vae_norm_num_groups=8,
    ),
    # Benchmarks: SD-1.x's block structure (3 cross-attention down blocks + a plain one,
    # mirrored up path, 2 layers per block, 77-token text) at reduced width and a 256 px image.
    "sd-small": DiffusionConfig(
        name="sd-small",
        sample_size=32,
        block_out_channels=(64, 128, 256, 256),
        **_SD1_BLOCKS,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
        text_hidden_size=128,
        text_layers=2,
        text_heads=4,
        text_intermediate=256,
        max_text_length=77,
        vae_block_out_channels=(16, 32, 32, 32),
        vae_layers_per_block=1,
        vae_norm_num_groups=16,
    ),
    # GPU benchmarks: Stable Diffusion 1.5's shapes (860M-parameter UNet, CLIP ViT-L/14 text encoder,
    # the 4-block VAE, 512 px images) with seeded random weights.
    "sd-15-shape": DiffusionConfig(
        name="sd-15-shape",
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        **_SD1_BLOCKS,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        text_hidden_size=768,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        max_text_length=77,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_norm_num_groups=32,
    ),
}


def builtin_config(name: str) -> DiffusionConfig:
    if name not in BUILTIN:
        raise ConfigError(f"unknown built-in diffusion config {name!r} (built-ins: {', '.join(BUILTIN)})")
    return BUILTIN[name]


# --- a diffusers folder's part configs: types and ranges, before any module is built -------------

# The config fields of each part that must be whole numbers >= 1.
_PART_INTS = {
    "unet": ("sample_size", "in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"),
    "vae": ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"),
    "scheduler": ("num_train_timesteps",),
}
# Fields that count repeated modules: each must be at most the number of tensors in the part's weights.
PART_COUNTS = {"unet": ("layers_per_block",), "vae": ("layers_per_block",), "text_encoder": ("num_hidden_layers",)}


def check_part_config(part: str, cfg: dict[str, Any], where: str) -> None:
    """Fail, naming the field and the fix, on a part config whose sizes are not usable numbers."""
    for key in _PART_INTS[part]:
        int_field(cfg, key, where)
    if part in ("unet", "vae"):
        channels = cfg.get("block_out_channels")
        if not isinstance(channels, list) or not channels:
            raise ConfigError(f"{where}: field block_out_channels must be a non-empty list of whole numbers; "
                              "restore the model's original config.json")
        groups = cfg["norm_num_groups"]
        for i in range(len(channels)):
            c = int_field({f"block_out_channels[{i}]": channels[i]}, f"block_out_channels[{i}]", where)
            if c % groups:
                raise ConfigError(f"{where}: block_out_channels[{i}]={c} is not divisible by norm_num_groups={groups}; "
                                  "set them to the model's values")
        float_field(cfg, "scaling_factor", where, None, positive=True)
    if part == "unet":
        heads = cfg.get("attention_head_dim")
        for h in heads if isinstance(heads, list) else [heads]:
            int_field({"attention_head_dim": h}, "attention_head_dim", where, default=None)
        for key in ("down_block_types", "up_block_types"):
            types = cfg.get(key)
            if not isinstance(types, list) or len(types) != len(cfg["block_out_channels"]):
                raise ConfigError(f"{where}: field {key} must be a list with one block type per block_out_channels "
                                  "entry; restore the model's original config.json")
        bool_field(cfg, "center_input_sample", where, False)
    if part == "text_encoder" and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"{where}: hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads="
                          f"{cfg['num_attention_heads']}; set them to the model's values")
    if part == "scheduler":
        for key in ("beta_start", "beta_end"):
            float_field(cfg, key, where, None, positive=True)
