"""Random-weight Hugging Face LLaMA folders of a named shape (the peers benchmark's input)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ember.errors import ConfigError
from ember.export.config import BUILTIN, DecoderConfig, to_hf_config

SHAPES: dict[str, DecoderConfig] = {
    # TinyLlama-1.1B's shape (22 layers, hidden 2048, GQA 32/4 heads, vocab 32000)
    "tinyllama": BUILTIN["llama-1b"],
    # a smoke shape: every row size a multiple of 256, so llama.cpp's k-quants apply as on the real one
    "smoke": DecoderConfig(family="llama", model_type="llama", vocab_size=2048, hidden_size=256, num_layers=4,
                           num_heads=8, num_kv_heads=2, intermediate_size=768, max_positions=512, norm_eps=1e-5,
                           tie_word_embeddings=False, rope_theta=10000.0),
}


def save_random_llama(shape: str, folder: Path, seed: int = 0) -> Path:
    """Save a seeded random-weight ``LlamaForCausalLM`` of ``shape`` (safetensors + tokenizer) to ``folder``."""
    if shape not in SHAPES:
        raise ConfigError(f"--shape {shape!r} is not one of {', '.join(SHAPES)}")
    return save_random_llama_config(SHAPES[shape], folder, seed)


def save_random_llama_config(config: DecoderConfig, folder: Path, seed: int = 0) -> Path:
    """``save_random_llama`` for any LLaMA-family ``config`` (e.g. a built-in with more positions)."""
    import torch
    import transformers

    from ember.export.tokenizer_builtin import EOS_TOKEN, build_builtin_tokenizer

    if config.family != "llama":
        raise ConfigError(f"a random Hugging Face folder is written for LLaMA-family configs only, not "
                          f"{config.family!r}; pick a llama-* built-in")
    tok = build_builtin_tokenizer(config.vocab_size)
    eos = tok.token_to_id(EOS_TOKEN)
    cfg = replace(config, bos_token_id=eos, eos_token_id=eos)
    hf = {k: v for k, v in to_hf_config(cfg).items() if k != "model_type"}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()
    for p in model.parameters():  # N(0, 0.02) like a trained model's scale, not the init's
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN,
         "model_max_length": cfg.max_positions}, indent=1))
    return folder
