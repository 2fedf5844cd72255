"""Helpers that build small random Hugging Face decoders and save them as local folders."""
from __future__ import annotations

from pathlib import Path

import torch

from ember.export.config import DecoderConfig, to_hf_config
from ember.export.tokenizer_builtin import build_builtin_tokenizer


def save_hf_model(cfg: DecoderConfig, folder: Path, seed: int = 0, extra: dict | None = None):
    """Random-init the transformers model for ``cfg``; save it (+ tokenizer.json) to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    hf = {k: v for k, v in to_hf_config(cfg).items() if k != "model_type"}
    hf.update(extra or {})
    if cfg.family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_builtin_tokenizer(cfg.vocab_size).save(str(folder / "tokenizer.json"))
    return model
