"""Decoder configs: parsed from a Hugging Face ``config.json`` or taken from the built-in table.

Unsupported architectures and config fields fail here, at compile time, with the field named.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.errors import ConfigError

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class DecoderConfig:
    family: str  # "gpt2" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float = 10000.0  # llama only
    qkv_bias: bool = False  # llama family: q/k/v projections have a bias (Qwen2, attention_bias)
    o_bias: bool = False  # llama family: output projection has a bias (attention_bias)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = ""  # the source's model_type, for the record

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not supported (supported: {', '.join(FAMILIES)})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config field {name}={_show(v)} must be a positive whole number")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not divisible by num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DecoderConfig":
        return DecoderConfig(**d)


# --- Hugging Face config.json -------------------------------------------------------------

_LLAMA_TYPES = ("llama", "mistral", "qwen2")

# Each DecoderConfig size field and the config.json key it comes from, per family (errors name the key).
HF_FIELD_NAMES: dict[str, dict[str, str]] = {
    "gpt2": {"vocab_size": "vocab_size", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
             "num_kv_heads": "n_head", "intermediate_size": "n_inner", "max_positions": "n_positions"},
    "llama": {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
              "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
              "intermediate_size": "intermediate_size", "max_positions": "max_position_embeddings"},
}

_REQUIRED = object()


def _show(v: Any) -> str:
    """A value as JSON, cut short: error messages stay one readable line."""
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_kind(v: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def int_field(cfg: dict[str, Any], key: str, where: str, minimum: int = 1, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` as a whole number >= ``minimum``; null/absent gives ``default`` (or an error if required)."""
    v = cfg.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: required field {key!r} is missing; add it with the model's value "
                              f"(a whole number >= {minimum})")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: field {key}={_show(v)} is not a whole number; "
                          f"write the model's value as a JSON integer >= {minimum}")
    if v < minimum:
        raise ConfigError(f"{where}: field {key}={v} must be >= {minimum}; set it to the model's value")
    return v


def float_field(cfg: dict[str, Any], key: str, where: str, default: float | None,
                 positive: bool = False) -> float | None:
    """``cfg[key]`` as a finite number (> 0 if ``positive``, else >= 0); null/absent gives ``default``."""
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: field {key}={_show(v)} is {_json_kind(v)}, not a number; "
                          "write the model's value as a JSON number")
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"{where}: field {key}={v} must be a finite number {'>' if positive else '>='} 0; "
                          "set it to the model's value")
    return float(v)


def bool_field(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: field {key}={_show(v)} is {_json_kind(v)}, not a boolean; write true or false")
    return v


def _token_id_field(cfg: dict[str, Any], key: str, where: str) -> int | None:
    """A token id, or the first of a list of ids (generation configs list several EOS ids)."""
    v = cfg.get(key)
    if isinstance(v, list):
        v = {key: v[0]} if v else {}
        return int_field(v, key, where, minimum=0, default=None)
    return int_field(cfg, key, where, minimum=0, default=None)


def _reject(cfg: dict[str, Any], key: str, ok, where: str, why: str) -> None:
    if key in cfg and not ok(cfg[key]):
        raise ConfigError(f"{where}: field {key}={cfg[key]!r} is not supported ({why})")


def _check_heads(family: str, hidden: int, heads: int, kv_heads: int, where: str) -> None:
    names = HF_FIELD_NAMES[family]
    if hidden % heads:
        raise ConfigError(f"{where}: {names['hidden_size']}={hidden} is not divisible by {names['num_heads']}={heads}; "
                          "set them to the model's values")
    if heads % kv_heads:
        raise ConfigError(f"{where}: {names['num_heads']}={heads} is not divisible by {names['num_kv_heads']}={kv_heads}; "
                          "set them to the model's values")


def config_from_hf(cfg: Any, where: str = "config.json") -> DecoderConfig:
    """Map a Hugging Face config dict to a DecoderConfig, rejecting what Ember cannot run.

    Every field is type- and range-checked here, so a malformed config.json fails with the
    field named instead of deep inside the model build."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} holds {_json_kind(cfg)}, not a JSON object; a Hugging Face config.json is "
                          "an object such as {\"model_type\": \"llama\", ...}: restore the model's original file")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: no 'model_type'; Ember supports gpt2 and {', '.join(_LLAMA_TYPES)}")
    if model_type == "gpt2":
        return _gpt2_from_hf(cfg, where)
    if model_type in _LLAMA_TYPES:
        return _llama_from_hf(cfg, where)
    raise ConfigError(
        f"{where}: model_type {model_type!r} is not supported; Ember compiles gpt2 and llama-family "
        f"({', '.join(_LLAMA_TYPES)}) decoders"
    )


def _gpt2_from_hf(cfg: dict[str, Any], where: str) -> DecoderConfig:
    _reject(cfg, "scale_attn_by_inverse_layer_idx", lambda v: not v, where, "per-layer attention scaling")
    _reject(cfg, "add_cross_attention", lambda v: not v, where, "cross-attention")
    _reject(cfg, "activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), where,
            "only the tanh-approximated GELU of GPT-2 is exported")
    _reject(cfg, "scale_attn_weights", lambda v: bool(v), where, "unscaled attention")
    n_embd = int_field(cfg, "n_embd", where)
    vocab = int_field(cfg, "vocab_size", where)
    layers = int_field(cfg, "n_layer", where)
    heads = int_field(cfg, "n_head", where)
    inner = int_field(cfg, "n_inner", where, default=4 * n_embd)
    positions = int_field(cfg, "n_positions", where)
    _check_heads("gpt2", n_embd, heads, heads, where)
    return DecoderConfig(
        family="gpt2", model_type="gpt2", vocab_size=vocab, hidden_size=n_embd, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, intermediate_size=inner, max_positions=positions,
        norm_eps=float_field(cfg, "layer_norm_epsilon", where, 1e-5),
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, True),
        bos_token_id=_token_id_field(cfg, "bos_token_id", where),
        eos_token_id=_token_id_field(cfg, "eos_token_id", where),
    )


def _llama_from_hf(cfg: dict[str, Any], where: str) -> DecoderConfig:
    model_type = cfg["model_type"]
    _reject(cfg, "hidden_act", lambda v: v == "silu", where, "only SiLU-gated MLPs (SwiGLU) are exported")
    _reject(cfg, "rope_scaling", lambda v: v is None or (isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default"),
            where, "RoPE scaling (linear/dynamic/yarn/llama3) is not implemented; use a config without it")
    _reject(cfg, "mlp_bias", lambda v: not v, where, "MLP biases")
    _reject(cfg, "pretraining_tp", lambda v: v in (None, 1), where, "pretraining_tp > 1 slicing")
    maxpos = int_field(cfg, "max_position_embeddings", where)
    sw = int_field(cfg, "sliding_window", where, default=None)
    use_sw = bool_field(cfg, "use_sliding_window", where, model_type == "mistral")
    if use_sw and sw is not None and sw < maxpos:
        raise ConfigError(
            f"{where}: field sliding_window={sw} is not supported (sliding-window attention); "
            f"set it to null or >= max_position_embeddings={maxpos}"
        )
    hidden = int_field(cfg, "hidden_size", where)
    heads = int_field(cfg, "num_attention_heads", where)
    kv_heads = int_field(cfg, "num_key_value_heads", where, default=heads)
    vocab = int_field(cfg, "vocab_size", where)
    layers = int_field(cfg, "num_hidden_layers", where)
    inter = int_field(cfg, "intermediate_size", where)
    _check_heads("llama", hidden, heads, kv_heads, where)
    head_dim = int_field(cfg, "head_dim", where, default=None)
    if head_dim is not None and head_dim != hidden // heads:
        raise ConfigError(f"{where}: field head_dim={head_dim} differs from hidden_size/num_attention_heads="
                          f"{hidden // heads}, which Ember does not support; check hidden_size and num_attention_heads")
    if (hidden // heads) % 2:
        raise ConfigError(f"{where}: hidden_size/num_attention_heads={hidden // heads} is odd; rotary embeddings "
                          "need an even head size: set the model's values")
    theta = float_field(cfg, "rope_theta", where, None, positive=True)
    rp = cfg.get("rope_parameters")
    if theta is None and isinstance(rp, dict):  # transformers >= 5 layout
        if rp.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: field rope_parameters.rope_type={rp.get('rope_type')!r} is not supported")
        theta = float_field(rp, "rope_theta", f"{where} rope_parameters", None, positive=True)
    attention_bias = bool_field(cfg, "attention_bias", where, False)
    return DecoderConfig(
        family="llama", model_type=model_type, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, intermediate_size=inter, max_positions=maxpos,
        norm_eps=float_field(cfg, "rms_norm_eps", where, 1e-6),
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, False),
        rope_theta=theta if theta is not None else 10000.0,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        bos_token_id=_token_id_field(cfg, "bos_token_id", where),
        eos_token_id=_token_id_field(cfg, "eos_token_id", where),
    )


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; not UTF-8, not JSON, or not an object -> ConfigError naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); restore the model's original {what}") from e
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}); check the file and its permissions") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"restore the model's original {what}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds {_json_kind(data)}, not a JSON object; restore the model's original {what}")
    return data


# --- built-in configs (seeded random weights) ---------------------------------------------

BUILTIN: dict[str, DecoderConfig] = {
    "gpt2-tiny": DecoderConfig(
        family="gpt2", model_type="gpt2", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=4, intermediate_size=256, max_positions=256, norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "gpt2-124m": DecoderConfig(
        family="gpt2", model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        num_kv_heads=12, intermediate_size=3072, max_positions=1024, norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama-tiny": DecoderConfig(
        family="llama", model_type="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=176, max_positions=256, norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    # TinyLlama-1.1B's shape: 22 layers, GQA 32 query / 4 key-value heads.
    "llama-1b": DecoderConfig(
        family="llama", model_type="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
        num_kv_heads=4, intermediate_size=5632, max_positions=2048, norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


def to_hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """The equivalent Hugging Face config dict (used to build reference models in tests)."""
    if cfg.family == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size, "n_positions": cfg.max_positions,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        }
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.o_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
