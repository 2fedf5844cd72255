"""What a family file declares, and the shared reading of rotary-decoder configs and weights.

``Family`` is the interface every consumer uses: ``from_hf`` (config.json -> DecoderConfig,
rejecting what Ember cannot run, field named), ``to_hf`` (the inverse, for reference models),
``step_model`` (the torch step module the exporters trace), the weight-name table
(``load_hf_weights`` and its inverse ``hf_state_dict``) and the tensors that pin down sizes
before any weight is loaded. ``RotaryFamily`` is the LLaMA-shaped default that most families
extend by overriding a few class attributes and ``extend``.
"""
from __future__ import annotations

from typing import Any

from ember.errors import ConfigError
from ember.models.description import DecoderConfig, RopeScaling
from ember.models.hf_fields import (bool_field, float_field, float_list_field, int_field, reject, show,
                                    token_id_field)

LLAMA_FIELD_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                     "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                     "intermediate_size": "intermediate_size", "max_positions": "max_position_embeddings"}


class Family:
    name: str = ""
    model_types: tuple[str, ...] = ()
    ARCH: dict[str, str] = {}  # defaults of DecoderConfig's architecture fields
    hf_field_names: dict[str, str] = LLAMA_FIELD_NAMES  # DecoderConfig size field -> config.json key
    weight_prefix = "model."  # the prefix a checkpoint's names may carry
    layer_prefix = "layers"  # layer i's tensors are f"{layer_prefix}.{i}.*" (after the prefix)
    size_tensors: tuple[tuple[str, str, int, int], ...] = ()  # (field, tensor, dim, divisor)
    kv_proj: str | None = None  # a tensor with num_kv_heads * head_dim rows

    def from_hf(self, cfg: dict[str, Any], where: str) -> DecoderConfig:
        raise NotImplementedError

    def to_hf(self, cfg: DecoderConfig) -> dict[str, Any]:
        raise NotImplementedError

    def step_model(self, cfg: DecoderConfig):
        raise NotImplementedError


class RotaryFamily(Family):
    """RMSNorm, rotary attention with GQA, gated MLP: LLaMA and the families built like it."""

    ARCH = {"positions": "rotary", "norm": "rms", "mlp": "swiglu"}
    hidden_act = ("hidden_act", ("silu",))  # the activation key and the values that mean SiLU
    size_tensors = (("vocab_size", "embed_tokens.weight", 0, 1), ("hidden_size", "embed_tokens.weight", 1, 1),
                    ("intermediate_size", "layers.0.mlp.gate_proj.weight", 0, 1))
    kv_proj = "layers.0.self_attn.k_proj.weight"
    # the step module's layer parameters -> their Hugging Face names (after "layers.{i}.")
    layer_names = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
                   "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                   "o_proj": "self_attn.o_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
                   "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    fused: dict[str, tuple[str, ...]] = {}  # a Hugging Face tensor -> the step parameters it is split into (rows)
    tie_default = False
    eps_default = 1e-6

    def from_hf(self, cfg: dict[str, Any], where: str) -> DecoderConfig:
        key, ok = self.hidden_act
        reject(cfg, key, lambda v: v in ok, where, f"only {self.ARCH['mlp']} MLPs are exported for {self.name}")
        reject(cfg, "mlp_bias", lambda v: not v, where, "MLP biases")
        reject(cfg, "pretraining_tp", lambda v: v in (None, 1), where, "pretraining_tp > 1 slicing")
        for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
            reject(cfg, moe, lambda v: not v, where, "mixture-of-experts layers")
        hidden = int_field(cfg, "hidden_size", where)
        heads = int_field(cfg, "num_attention_heads", where)
        kv_heads = int_field(cfg, "num_key_value_heads", where, default=heads)
        head_dim = int_field(cfg, "head_dim", where, default=None)
        if head_dim is None and hidden % heads:
            raise ConfigError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                              "set them to the model's values")
        if heads % kv_heads:
            raise ConfigError(f"{where}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}; "
                              "set them to the model's values")
        layers = int_field(cfg, "num_hidden_layers", where)
        maxpos = int_field(cfg, "max_position_embeddings", where)
        attention_bias = bool_field(cfg, "attention_bias", where, False)
        kw: dict[str, Any] = dict(
            family=self.name, model_type=cfg["model_type"], vocab_size=int_field(cfg, "vocab_size", where),
            hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            intermediate_size=int_field(cfg, "intermediate_size", where), max_positions=maxpos,
            head_dim=head_dim or hidden // heads, norm_eps=float_field(cfg, "rms_norm_eps", where, self.eps_default),
            tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, self.tie_default),
            qkv_bias=attention_bias, o_bias=attention_bias,
            bos_token_id=token_id_field(cfg, "bos_token_id", where), eos_token_id=token_id_field(cfg, "eos_token_id", where))
        rope = rope_parameters(cfg)
        kw["partial_rotary_factor"] = float_field(rope, "partial_rotary_factor", where, None) or float_field(
            cfg, "partial_rotary_factor", where, 1.0)
        kw["rope_theta"], kw["rope_scaling"] = parse_rope(rope, cfg, where, int(kw["head_dim"] * kw["partial_rotary_factor"]))
        self.extend(cfg, where, kw)
        return DecoderConfig(**kw)

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        """A family's own fields (``kw`` are DecoderConfig's arguments so far); LLaMA adds none."""

    def to_hf(self, cfg: DecoderConfig) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling is not None:
            rope.update(rope_scaling_to_hf(cfg.rope_scaling))
        out = {"model_type": self.name, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
               "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
               "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
               "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_positions,
               "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
               self.hidden_act[0]: self.hidden_act[1][0], "tie_word_embeddings": cfg.tie_word_embeddings,
               "attention_bias": cfg.o_bias, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        if cfg.layer_windows:
            out["sliding_window"] = max(cfg.layer_windows)
            out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
        return out

    def step_model(self, cfg: DecoderConfig):
        from ember.models.decoder import RotaryDecoderStep

        return RotaryDecoderStep(cfg)


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a config: transformers >= 5's ``rope_parameters`` or the older
    ``rope_scaling`` (+ top-level ``rope_theta``), as one dict."""
    rp = cfg.get("rope_parameters")
    rs = cfg.get("rope_scaling")
    for key, v in (("rope_parameters", rp), ("rope_scaling", rs)):
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"field {key}={show(v)} is not an object; set it to the model's value or null")
    out = dict(rp or {})
    out.update(rs or {})
    return out


def parse_rope(rope: dict[str, Any], cfg: dict[str, Any], where: str, rotary_dim: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None for plain RoPE); unsupported types fail naming the field."""
    theta = float_field(cfg, "rope_theta", where, None, positive=True) or float_field(
        rope, "rope_theta", f"{where} rope_parameters", 10000.0, positive=True)
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn", "longrope"):
        raise ConfigError(f"{where}: field rope_scaling.rope_type={kind!r} is not supported (Ember implements default, "
                          "linear, llama3, yarn and longrope; dynamic NTK scaling rescales cached keys as a sequence grows)")
    here = f"{where} rope_scaling"
    orig = int_field(rope, "original_max_position_embeddings", here, default=None) or int_field(
        cfg, "original_max_position_embeddings", where, default=None)
    if orig is None and kind != "linear":
        raise ConfigError(f"{here}: {kind} scaling needs original_max_position_embeddings; add the model's value")
    s: dict[str, Any] = {"type": kind, "original_max_positions": orig,
                         "factor": float_field(rope, "factor", here, None if kind != "longrope" else 1.0, positive=True)}
    if s["factor"] is None:
        raise ConfigError(f"{here}: {kind} scaling needs 'factor'; add the model's value")
    if kind == "llama3":
        s.update(low_freq_factor=float_field(rope, "low_freq_factor", here, 1.0, positive=True),
                 high_freq_factor=float_field(rope, "high_freq_factor", here, 4.0, positive=True))
        if s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ConfigError(f"{here}: high_freq_factor must be larger than low_freq_factor; set the model's values")
    if kind == "yarn":
        reject(rope, "mscale", lambda v: not v, here, "DeepSeek-style mscale")
        s.update(beta_fast=float_field(rope, "beta_fast", here, 32.0, positive=True) or 32.0,
                 beta_slow=float_field(rope, "beta_slow", here, 1.0, positive=True) or 1.0,
                 truncate=bool_field(rope, "truncate", here, True),
                 attention_factor=float_field(rope, "attention_factor", here, None, positive=True))
    if kind == "longrope":
        s.update(long_factor=float_list_field(rope, "long_factor", here, rotary_dim // 2),
                 short_factor=float_list_field(rope, "short_factor", here, rotary_dim // 2),
                 attention_factor=float_field(rope, "attention_factor", here, None, positive=True))
    return theta, RopeScaling(**s)


def rope_scaling_to_hf(s: RopeScaling) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": s.type, "factor": s.factor,
                           "original_max_position_embeddings": s.original_max_positions}
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
    if s.type == "longrope":
        out.update(long_factor=list(s.long_factor), short_factor=list(s.short_factor))
    if s.attention_factor is not None:
        out["attention_factor"] = s.attention_factor
    return out


def sliding_types(cfg: dict[str, Any], layers: int, use_key: str | None, first_sliding: int = 0) -> list[bool]:
    """Which layers use the sliding window when the config has no ``layer_types``: all of them
    (Mistral, Phi-3), or from ``max_window_layers`` on when ``use_key`` (``use_sliding_window``) is true (Qwen2)."""
    if use_key is not None and not cfg.get(use_key):
        return [False] * layers
    return [i >= first_sliding for i in range(layers)]


def windows_from_hf(cfg: dict[str, Any], where: str, kw: dict[str, Any], default: list[bool]) -> None:
    """Set ``kw["layer_windows"]`` from ``sliding_window`` and ``layer_types`` (or ``default``)."""
    window = int_field(cfg, "sliding_window", where, default=None)
    if window is None:
        return
    types = cfg.get("layer_types")
    if types is None:
        sliding = default
    elif not isinstance(types, list) or len(types) != kw["num_layers"] or not set(types) <= {
            "sliding_attention", "full_attention"}:
        raise ConfigError(f"{where}: field layer_types={show(types)} must list 'sliding_attention' or "
                          f"'full_attention' for each of the {kw['num_layers']} layers")
    else:
        sliding = [t == "sliding_attention" for t in types]
    kw["layer_windows"] = tuple(window if s else 0 for s in sliding)
