"""Diffusion model sources: a built-in config with seeded random weights, or a local
diffusers SD-1.x folder (``model_index.json`` + unet/ text_encoder/ vae/ scheduler/ tokenizer/).

``load_source`` returns torch modules (export time only) plus the tokenizer (a
``tokenizers.Tokenizer`` padded/truncated to the text length, the form the runtime loads).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ember.errors import ConfigError
from ember.export.config import read_json_object
from ember.export.diffusion.config import (
    DOWN_BLOCKS, MID_BLOCKS, PART_COUNTS, UP_BLOCKS, DiffusionConfig, builtin_config, check_part_config,
)
from ember.export.weights import check_parameter_count, one_line, read_weight_index

PARTS = ("unet", "text_encoder", "vae", "scheduler", "tokenizer")
SUPPORTED_PREDICTION = ("epsilon",)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class DiffusionSource:
    """Everything compile needs. ``sample_size`` is the latent side; image side = sample_size * vae_scale."""

    name: str
    unet: Any  # diffusers.UNet2DConditionModel (eval, fp32)
    text_encoder: Any  # transformers.CLIPTextModel
    vae: Any  # diffusers.AutoencoderKL
    scheduler_config: dict[str, Any]
    tokenizer: Any  # tokenizers.Tokenizer with padding + truncation to max_text_length
    max_text_length: int
    pad_token_id: int
    sample_size: int
    vae_scale: int
    vae_scaling_factor: float
    config: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae_scale

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def byte_level_tokenizer(max_length: int) -> Any:
    """A CLIP-shaped byte-level tokenizer (256 byte symbols + BOS/EOS, no merges) for built-ins."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return _pad_and_truncate(tok, max_length, vocab[EOS])


def _pad_and_truncate(tok: Any, max_length: int, pad_id: int) -> Any:
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or EOS)
    return tok


def build_builtin(cfg: DiffusionConfig, seed: int = 0) -> DiffusionSource:
    """Instantiate the diffusers/transformers modules of ``cfg`` with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = byte_level_tokenizer(cfg.max_text_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg.unet_kwargs()).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=cfg.text_hidden_size,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_text_length,
            bos_token_id=tok.token_to_id(BOS),
            eos_token_id=tok.token_to_id(EOS),
            pad_token_id=tok.token_to_id(EOS),
            projection_dim=cfg.cross_attention_dim,
        )
    ).eval()
    vae = AutoencoderKL(**cfg.vae_kwargs()).eval()
    return DiffusionSource(
        name=cfg.name,
        unet=unet,
        text_encoder=text,
        vae=vae,
        scheduler_config={"_class_name": "DDIMScheduler", **cfg.scheduler},
        tokenizer=tok,
        max_text_length=cfg.max_text_length,
        pad_token_id=tok.token_to_id(EOS),
        sample_size=cfg.sample_size,
        vae_scale=cfg.vae_scale,
        vae_scaling_factor=float(vae.config.scaling_factor),
        config=cfg.to_dict(),
    )


def load_source(source: str | Path, seed: int = 0) -> DiffusionSource:
    """A built-in name (``sd-tiny``, ``sd-small``, ``sd-15-shape``) or a local diffusers SD-1.x folder."""
    path = Path(source)
    if path.is_dir():
        return load_folder(path)
    if str(source).startswith("sd-"):
        return build_builtin(builtin_config(str(source)), seed=seed)
    raise ConfigError(
        f"diffusion source {str(source)!r} is neither a folder with model_index.json nor a built-in "
        "name (sd-tiny, sd-small, sd-15-shape); pass a local diffusers pipeline folder (save_pretrained output)"
    )


def load_folder(folder: Path) -> DiffusionSource:
    """Load a diffusers StableDiffusionPipeline folder; missing or unsupported parts are named."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if not (folder / "model_index.json").exists():
        raise ConfigError(f"{folder} has no model_index.json; pass a diffusers pipeline folder (pipe.save_pretrained(...))")
    read_json_object(folder / "model_index.json", "model_index.json")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise ConfigError(
            f"{folder} lacks pipeline part(s) {', '.join(missing)}; an SD-1.x folder needs "
            f"{', '.join(p + '/' for p in PARTS)} (save the full StableDiffusionPipeline)"
        )
    configs = {part: _part_config(folder, part) for part in ("unet", "text_encoder", "vae")}
    check_unet_config(configs["unet"], folder / "unet")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise ConfigError(f"{sched_file} is missing; the scheduler folder needs its scheduler_config.json")
    sched = read_json_object(sched_file, "scheduler_config.json")
    check_part_config("scheduler", sched, str(sched_file))
    if sched.get("prediction_type", "epsilon") not in SUPPORTED_PREDICTION:
        raise ConfigError(f"{sched_file}: prediction_type {sched.get('prediction_type')!r} is not supported (epsilon only)")
    builders = {"unet": UNet2DConditionModel.from_config, "vae": AutoencoderKL.from_config,
                "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))}
    for part, build in builders.items():
        check_part_weights(folder / part, part, configs[part], build)
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    max_len = int(text.config.max_position_embeddings)
    tok, pad_id = _folder_tokenizer(folder / "tokenizer", max_len)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return DiffusionSource(
        name=folder.name,
        unet=unet,
        text_encoder=text,
        vae=vae,
        scheduler_config=sched,
        tokenizer=tok,
        max_text_length=max_len,
        pad_token_id=pad_id,
        sample_size=int(unet.config.sample_size),
        vae_scale=vae_scale,
        vae_scaling_factor=float(vae.config.scaling_factor),
        config=json.loads(json.dumps({"source": str(folder), "unet": dict(unet.config), "vae_scale": vae_scale}, default=str)),
    )


def _part_config(folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} is missing; save the full pipeline (pipe.save_pretrained(...))")
    cfg = read_json_object(path, "config.json")
    check_part_config(part, cfg, str(path))
    return cfg


def check_part_weights(part_dir: Path, part: str, cfg: dict[str, Any], build: Callable[[dict], Any]) -> None:
    """Check a part's config against its weight files' shapes before the real module is allocated.

    Repeat counts are bounded by the number of tensors first (so the module can be built on the
    meta device quickly), then every parameter the config implies must fit the weights."""
    import torch

    where = str(part_dir / "config.json")
    index = read_weight_index(part_dir)
    counts = {key: cfg[key] for key in PART_COUNTS[part]}
    if "block_out_channels" in cfg:
        counts["len(block_out_channels)"] = len(cfg["block_out_channels"])
    for key, value in counts.items():
        if value > len(index.shapes):
            raise ConfigError(f"{where}: {key}={value} but the weights ({index.files[0].name}) hold only "
                              f"{len(index.shapes)} tensors; set it to the model's value")
    try:
        with torch.device("meta"):
            module = build(cfg)
    except Exception as e:  # noqa: BLE001 - diffusers/transformers raise many types for odd configs
        raise ConfigError(f"{where}: the {part} config cannot be built ({one_line(e)}); "
                          "restore the model's original config.json") from e
    for name, param in module.named_parameters():
        shape = index.shapes.get(name)
        if shape is not None and tuple(param.shape) != shape:
            raise ConfigError(f"{where}: the config gives {name} the shape {list(param.shape)} but the weights hold "
                              f"{list(shape)}; use the config.json that belongs to these weights")
    check_parameter_count(sum(p.numel() for p in module.parameters()), index, where)


def check_unet_config(cfg: dict[str, Any], where: Path | str) -> None:
    """Fail at compile time on UNet features the split does not implement."""
    for t in cfg.get("down_block_types", []):
        if t not in DOWN_BLOCKS:
            raise ConfigError(f"{where}: down block {t!r} is not supported (supported: {', '.join(DOWN_BLOCKS)})")
    for t in cfg.get("up_block_types", []):
        if t not in UP_BLOCKS:
            raise ConfigError(f"{where}: up block {t!r} is not supported (supported: {', '.join(UP_BLOCKS)})")
    mid = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid not in MID_BLOCKS:
        raise ConfigError(f"{where}: mid block {mid!r} is not supported (supported: {', '.join(MID_BLOCKS)})")
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_embed_act", "time_cond_proj_dim"):
        if cfg.get(key) is not None:
            raise ConfigError(f"{where}: UNet option {key}={cfg[key]!r} is not supported (SD-1.x UNets have none)")
    if cfg.get("center_input_sample"):
        raise ConfigError(f"{where}: center_input_sample=True is not supported")


def _folder_tokenizer(folder: Path, max_len: int) -> tuple[Any, int]:
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        pad = read_json_object(cfg_file, "tokenizer_config.json").get("pad_token") if cfg_file.exists() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
    else:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - any failure means the folder is unusable
            raise ConfigError(f"{folder}: cannot read the tokenizer ({e}); it needs vocab.json + merges.txt or tokenizer.json") from e
        tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        pad = hf.pad_token
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
        pad_id = tok.token_to_id(EOS)
    if pad_id is None:
        raise ConfigError(f"{folder}: tokenizer has no pad token and no {EOS}; set pad_token in tokenizer_config.json")
    tok.no_padding()
    tok.no_truncation()
    return _pad_and_truncate(tok, max_len, pad_id), pad_id


def save_pipeline_folder(src: DiffusionSource, folder: str | Path) -> Path:
    """Write ``src`` as a diffusers StableDiffusionPipeline folder (DDIM scheduler, fast tokenizer).

    Used to make local test sources from built-ins and to hand the same weights to diffusers.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(src.tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    pad = tok.id_to_token(src.pad_token_id)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=pad,
                                     model_max_length=src.max_text_length)
    pipe = StableDiffusionPipeline(
        vae=src.vae, text_encoder=src.text_encoder, tokenizer=hf_tok, unet=src.unet,
        scheduler=DDIMScheduler.from_config({k: v for k, v in src.scheduler_config.items() if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
