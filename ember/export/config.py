"""Decoder configs: parsed from a Hugging Face ``config.json`` or taken from the built-in table.

Unsupported architectures and config fields fail here, at compile time, with the field named.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
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
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field {name}={getattr(self, name)} must be a positive integer")
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


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    return cfg[key]


def _reject(cfg: dict[str, Any], key: str, ok, where: str, why: str) -> None:
    if key in cfg and not ok(cfg[key]):
        raise ConfigError(f"{where}: field {key}={cfg[key]!r} is not supported ({why})")


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> DecoderConfig:
    """Map a Hugging Face config dict to a DecoderConfig, rejecting what Ember cannot run."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: no 'model_type'; Ember supports gpt2 and {', '.join(_LLAMA_TYPES)}")
    if model_type == "gpt2":
        _reject(cfg, "scale_attn_by_inverse_layer_idx", lambda v: not v, where, "per-layer attention scaling")
        _reject(cfg, "add_cross_attention", lambda v: not v, where, "cross-attention")
        _reject(cfg, "activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), where,
                "only the tanh-approximated GELU of GPT-2 is exported")
        _reject(cfg, "scale_attn_weights", lambda v: bool(v), where, "unscaled attention")
        n_embd = int(_require(cfg, "n_embd", where))
        return DecoderConfig(
            family="gpt2",
            model_type=model_type,
            vocab_size=int(_require(cfg, "vocab_size", where)),
            hidden_size=n_embd,
            num_layers=int(_require(cfg, "n_layer", where)),
            num_heads=int(_require(cfg, "n_head", where)),
            num_kv_heads=int(_require(cfg, "n_head", where)),
            intermediate_size=int(cfg.get("n_inner") or 4 * n_embd),
            max_positions=int(_require(cfg, "n_positions", where)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            bos_token_id=_first_id(cfg.get("bos_token_id")),
            eos_token_id=_first_id(cfg.get("eos_token_id")),
        )
    if model_type in _LLAMA_TYPES:
        _reject(cfg, "hidden_act", lambda v: v == "silu", where, "only SiLU-gated MLPs (SwiGLU) are exported")
        _reject(cfg, "rope_scaling", lambda v: v is None or (isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default"),
                where, "RoPE scaling (linear/dynamic/yarn/llama3) is not implemented; use a config without it")
        _reject(cfg, "mlp_bias", lambda v: not v, where, "MLP biases")
        _reject(cfg, "pretraining_tp", lambda v: v in (None, 1), where, "pretraining_tp > 1 slicing")
        maxpos = int(_require(cfg, "max_position_embeddings", where))
        sw = cfg.get("sliding_window")
        use_sw = cfg.get("use_sliding_window", model_type == "mistral")
        if use_sw and sw is not None and int(sw) < maxpos:
            raise ConfigError(
                f"{where}: field sliding_window={sw} is not supported (sliding-window attention); "
                f"set it to null or >= max_position_embeddings={maxpos}"
            )
        hidden = int(_require(cfg, "hidden_size", where))
        heads = int(_require(cfg, "num_attention_heads", where))
        head_dim = cfg.get("head_dim")
        if head_dim is not None and int(head_dim) != hidden // heads:
            raise ConfigError(f"{where}: field head_dim={head_dim} != hidden_size/num_attention_heads is not supported")
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 layout
            rp = cfg["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                raise ConfigError(f"{where}: field rope_parameters.rope_type={rp.get('rope_type')!r} is not supported")
            theta = rp.get("rope_theta")
        attention_bias = bool(cfg.get("attention_bias", False))
        return DecoderConfig(
            family="llama",
            model_type=model_type,
            vocab_size=int(_require(cfg, "vocab_size", where)),
            hidden_size=hidden,
            num_layers=int(_require(cfg, "num_hidden_layers", where)),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(_require(cfg, "intermediate_size", where)),
            max_positions=maxpos,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(theta if theta is not None else 10000.0),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            bos_token_id=_first_id(cfg.get("bos_token_id")),
            eos_token_id=_first_id(cfg.get("eos_token_id")),
        )
    raise ConfigError(
        f"{where}: model_type {model_type!r} is not supported; Ember compiles gpt2 and llama-family "
        f"({', '.join(_LLAMA_TYPES)}) decoders"
    )


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
