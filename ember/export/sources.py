"""Model sources: a local Hugging Face folder or a built-in config with seeded random weights.

``resolve_decoder_source`` returns a ready torch step model, its config and its tokenizer,
or fails with a ConfigError that names the folder/field and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ember.errors import ConfigError
from ember.export.config import BUILTIN, DecoderConfig, config_from_hf
from ember.export.tokenizer_builtin import EOS_TOKEN, build_builtin_tokenizer


@dataclass
class DecoderSource:
    name: str
    config: DecoderConfig
    model: torch.nn.Module  # a GPT2Step / LlamaStep in eval mode, float32
    tokenizer: Any | None  # tokenizers.Tokenizer
    origin: str  # "builtin" | folder path
    seed: int | None = None
    chat_template: str | None = None  # Jinja chat template from the model folder, if any


def step_model_class(family: str):
    from ember.export.gpt2 import GPT2Step
    from ember.export.llama import LlamaStep

    return {"gpt2": GPT2Step, "llama": LlamaStep}[family]


def random_init_(model: torch.nn.Module, seed: int) -> None:
    """GPT-2-style init (normal std 0.02, norms at 1, biases 0), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def is_builtin(source: str) -> bool:
    return source in BUILTIN


def resolve_decoder_source(source: str, seed: int = 0) -> DecoderSource:
    if is_builtin(source):
        tok = build_builtin_tokenizer(BUILTIN[source].vocab_size)
        eos = tok.token_to_id(EOS_TOKEN)
        cfg = replace(BUILTIN[source], bos_token_id=eos, eos_token_id=eos)
        model = step_model_class(cfg.family)(cfg).eval()
        random_init_(model, seed)
        return DecoderSource(source, cfg, model, tok, "builtin", seed)
    folder = Path(source)
    if not folder.exists():
        names = ", ".join(BUILTIN)
        raise ConfigError(
            f"model source {source!r} is neither a folder nor a built-in config; pass a local Hugging Face "
            f"model folder (config.json + weights) or one of: {names}"
        )
    if not folder.is_dir():
        raise ConfigError(f"model source {source!r} is a file; pass the model's folder (with config.json)")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path} is missing: a Hugging Face model folder needs config.json")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e})") from e
    cfg = config_from_hf(hf_cfg, where=str(cfg_path))
    model = step_model_class(cfg.family)(cfg).eval()
    sd = load_weights(folder)
    try:
        model.load_hf_state_dict(sd)
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{folder}: weights do not fit the {cfg.family} config: {e}") from e
    model.float()
    tok = load_hf_tokenizer(folder)
    return DecoderSource(folder.name, cfg, model, tok, str(folder.resolve()), chat_template=load_chat_template(folder))


def load_chat_template(folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja, or tokenizer_config.json's "chat_template"."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg} is not valid JSON ({e})") from e
        if isinstance(t, list):  # named templates: take the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors from *.safetensors (preferred) or pytorch_model*.bin, as float32."""
    files = sorted(folder.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            try:
                sd.update(load_file(str(f)))
            except Exception as e:  # safetensors raises its own error types
                raise ConfigError(f"{f} could not be read ({e}); re-save the weights") from e
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise ConfigError(f"{folder} has no weights: expected *.safetensors or pytorch_model*.bin")
        for f in bins:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {k: v.float() for k, v in sd.items()}


def load_hf_tokenizer(folder: Path):
    """A ``tokenizers.Tokenizer`` from tokenizer.json, vocab.json+merges.txt, or via transformers."""
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        from tokenizers import decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    if any(folder.glob("tokenizer*")):
        try:  # e.g. sentencepiece tokenizer.model: convert once, at compile time
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
            return fast.backend_tokenizer
        except Exception as e:
            raise ConfigError(f"{folder}: tokenizer files could not be converted ({e})") from e
    return None  # token-id-only engine: generate() then takes lists of ids
