"""Write a GGUF file for llama.cpp from a Hugging Face LLaMA folder, with the ``gguf`` package.

llama.cpp's own ``convert_hf_to_gguf.py`` ships only in its source tree, not in a PyPI wheel, so
this writes the LLaMA layout directly: F32 tensors under llama.cpp's names, Q/K rows permuted
from Hugging Face's half-split RoPE to llama.cpp's interleaved one. The vocabulary is placeholder
text of the right size (the benchmark feeds token ids to every arm).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ember.errors import ConfigError


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """``convert_hf_to_gguf``'s ``permute``: per head, rows [a0..a(d/2-1), b0..] -> [a0, b0, a1, b1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors weights; save the model with safe_serialization=True")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def placeholder_vocab(vocab_size: int, eos_id: int) -> tuple[list[str], list[int]]:
    """Unique token texts and types for a SentencePiece-style vocabulary of ``vocab_size``
    (the 256 byte tokens llama.cpp looks up, eos as a control token)."""
    import gguf

    if vocab_size < 260:
        raise ConfigError(f"vocab_size {vocab_size} is below the 260 tokens a GGUF SentencePiece vocabulary needs")
    tokens, types = [], []
    byte = 0
    for i in range(vocab_size):
        if i == eos_id:
            tokens.append("</s>"), types.append(gguf.TokenType.CONTROL)
        elif byte < 256:
            tokens.append(f"<0x{byte:02X}>"), types.append(gguf.TokenType.BYTE)
            byte += 1
        else:
            tokens.append(f"\u2581t{i}"), types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_llama_gguf(folder: Path, out: Path) -> Path:
    """``folder``'s LLaMA weights as an F32 GGUF file at ``out``."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{folder}/config.json: model_type {cfg.get('model_type')!r}; the GGUF writer takes llama")
    nh, nkv, layers = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // nh
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = cfg.get("eos_token_id") or 0
    sd = _weights(folder)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(folder.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types = placeholder_vocab(cfg["vocab_size"], eos)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])  # tied embeddings
    names = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
             "output.weight": lm_head}
    for i in range(layers):
        p = f"model.layers.{i}."
        names.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute_rope_rows(sd[p + "self_attn.q_proj.weight"], nh),
            f"blk.{i}.attn_k.weight": permute_rope_rows(sd[p + "self_attn.k_proj.weight"], nkv),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        })
    for name, t in names.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
