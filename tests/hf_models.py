"""Helpers that build small random Hugging Face decoders and save them as local folders."""
from __future__ import annotations

from pathlib import Path

import torch

from ember.export.config import DecoderConfig, to_hf_config
from ember.export.tokenizer_builtin import build_builtin_tokenizer


def hf_model_for(cfg: DecoderConfig, hf: dict | None = None):
    """A random-weight transformers causal LM of ``cfg``'s family, from its config dict (the family's ``to_hf``)."""
    import transformers

    hf = hf if hf is not None else {k: v for k, v in to_hf_config(cfg).items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(to_hf_config(cfg)["model_type"], **hf)
    return transformers.AutoModelForCausalLM.from_config(config)


def save_hf_model(cfg: DecoderConfig, folder: Path, seed: int = 0, extra: dict | None = None):
    """Random-init the transformers model for ``cfg``; save it (+ tokenizer.json) to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    hf = {k: v for k, v in to_hf_config(cfg).items() if k != "model_type"}
    hf.update(extra or {})
    model = hf_model_for(cfg, hf)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_builtin_tokenizer(cfg.vocab_size).save(str(folder / "tokenizer.json"))
    return model
