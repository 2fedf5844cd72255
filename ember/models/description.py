"""The typed decoder description: everything a consumer needs to build or run a family's model.

One ``DecoderConfig`` is made by a family file from a Hugging Face ``config.json`` (or taken
from the built-in table), recorded in the manifest (``model.config``), and read back by the
runtime. The step graph, the fused decode part, the tensor-parallel shards, the benchmark's
reference arm and the tests all build from it: none of them asks which family it is.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ember.errors import ConfigError

POSITIONS = ("learned", "rotary")  # GPT-2's position table, or rotary embeddings
NORMS = ("layer", "rms", "rms_one_plus")  # LayerNorm, RMSNorm * w, Gemma's RMSNorm * (1 + w)
MLPS = ("gelu", "swiglu", "geglu")  # GPT-2's fc-GELU-proj; gated SiLU; gated tanh-GELU
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
RING_ALIGN = 16  # a sliding-window layer's KV ring: its window rounded up to a multiple of this


def ring_size(window: int) -> int:
    """The positions a layer with sliding window ``window`` keeps in the KV pool (0: no window, no ring)."""
    return -(-window // RING_ALIGN) * RING_ALIGN if window else 0


@dataclass(frozen=True)
class RopeScaling:
    """A rotary scaling rule (``rope_scaling`` / ``rope_parameters`` of the config), see ember/models/rope.py."""

    type: str = "default"
    factor: float = 1.0
    original_max_positions: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    attention_factor: float | None = None  # yarn / longrope: cos/sin multiplier (None: derived from factor)
    long_factor: tuple[float, ...] = ()  # longrope
    short_factor: tuple[float, ...] = ()  # longrope

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.type!r} is not one of {', '.join(ROPE_TYPES)}")
        object.__setattr__(self, "long_factor", tuple(self.long_factor))
        object.__setattr__(self, "short_factor", tuple(self.short_factor))


@dataclass(frozen=True)
class DecoderConfig:
    family: str  # the registry key of the family file (ember/models/<family>.py)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float = 10000.0  # rotary base of full-attention layers
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2, attention_bias)
    o_bias: bool = False  # the output projection has a bias (attention_bias)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = ""  # the source's model_type, for the record
    # --- architecture (None: the family's default, ember/models/<family>.py ARCH) ---
    positions: str | None = None
    norm: str | None = None
    mlp: str | None = None
    head_dim: int = 0  # 0: hidden_size // num_heads
    qk_norm: bool = False  # RMSNorm of each query/key head before the rotary embedding (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # norms on the attention and MLP outputs too (Gemma 3)
    rope_scaling: RopeScaling | None = None  # applies to full-attention layers
    partial_rotary_factor: float = 1.0  # the fraction of head_dim that is rotated (Phi-3)
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window (keys within the last w positions), 0 = full
    local_rope_theta: float | None = None  # rotary base of sliding-window layers (Gemma 3), None: rope_theta
    attn_scale: float | None = None  # score scale, None: 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    # per layer: the positions a sliding-window layer keeps in the KV pool, a ring (ember/engine_format/kv_ring.py);
    # 0 = every position. None: ``ring_size`` of each window; () = no rings (folders compiled before them)
    kv_rings: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        from ember.models.registry import family

        fam = family(self.family)  # ConfigError naming the supported families
        for name, value in fam.ARCH.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, allowed in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config field {name}={_show(v)} must be a positive whole number")
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not divisible by num_key_value_heads={self.num_kv_heads}"
            )
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        windows = tuple(int(w) for w in self.layer_windows)
        if windows and len(windows) != self.num_layers:
            raise ConfigError(f"layer_windows has {len(windows)} entries for {self.num_layers} layers")
        object.__setattr__(self, "layer_windows", windows if any(windows) else ())
        self._set_kv_rings()
        if self.positions == "rotary" and self.rotary_dim % 2:
            raise ConfigError(f"the rotary part of the head ({self.rotary_dim} of head_dim {self.head_dim}) is odd; "
                              "rotary embeddings need an even size: set the model's values")

    def _set_kv_rings(self) -> None:
        if self.kv_rings is None:  # a ring as long as the longest sequence saves nothing: none
            rings = [ring_size(self.window(i)) for i in range(self.num_layers)]
            object.__setattr__(self, "kv_rings", tuple(r if r < self.max_positions else 0 for r in rings))
        rings = tuple(int(r) for r in self.kv_rings)
        if rings and len(rings) != self.num_layers:
            raise ConfigError(f"kv_rings has {len(rings)} entries for {self.num_layers} layers")
        for i, ring in enumerate(rings):
            if ring and not 0 < self.window(i) <= ring:
                raise ConfigError(f"kv_rings[{i}]={ring} must be 0 or at least layer {i}'s sliding window "
                                  f"({self.window(i)}; 0 = none)")
        object.__setattr__(self, "kv_rings", rings if any(rings) else ())

    # --- derived geometry: the one place consumers read it from ---
    def kv_ring(self, layer: int) -> int:
        """The positions layer ``layer`` keeps in the KV pool when it is a ring (0: every position)."""
        return self.kv_rings[layer] if self.kv_rings else 0

    @property
    def kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def score_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def longrope_switch(self) -> int | None:
        """LongRoPE's ``original_max_position_embeddings``: a sequence longer than this is rotated
        with the long factors (every token of it, as transformers does), else with the short ones;
        None for other models. The step graph then takes a ``rope_long`` input (docs/models.md)."""
        s = self.rope_scaling
        return s.original_max_positions if s is not None and s.type == "longrope" else None

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (0: full attention, also for a window that covers every position)."""
        w = self.layer_windows[layer] if self.layer_windows else 0
        return 0 if w >= self.max_positions else w

    @property
    def has_windows(self) -> bool:
        return any(self.window(i) for i in range(self.num_layers))

    def rope_kind(self, layer: int) -> str:
        """``"local"`` for sliding-window layers with their own rotary base, else ``"global"``."""
        return "local" if self.local_rope_theta is not None and self.layer_windows and self.layer_windows[layer] else "global"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DecoderConfig":
        """From a manifest's ``model.config`` (older manifests lack the architecture fields: family defaults,
        and ``kv_rings``: no rings, the layout their step graphs were built for)."""
        known = {f.name for f in fields(DecoderConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model.config has unknown fields {unknown}; recompile the folder with this Ember")
        return DecoderConfig(**{"kv_rings": (), **d})

    # --- what the fused decode part and tensor parallelism cannot express (None: they can) ---
    def fused_decode_refusal(self) -> str | None:
        """Why ONNX Runtime's fused decode operators (export/gqa_decode.py) cannot run this model, or None."""
        reasons = self._special_features()
        if self.rope_scaling is not None and self.rope_scaling.type == "longrope":
            reasons.append("LongRoPE scaling (rope_scaling.type longrope) switches tables by sequence length")
        elif self.rope_scaling is not None and self.rope_scaling.type == "yarn":
            reasons.append("YaRN attention factor (rope_scaling.type yarn)")
        return "; ".join(reasons) or None

    def paged_refusal(self) -> str | None:
        """Why the PagedAttention step graph (export/paged_step.py) cannot run this model, or None.
        The operator itself applies sliding windows, soft-capping and the score scale; the graph
        applies q/k norms before it."""
        paged_has = ("q/k normalisation (q_norm/k_norm)", "sliding-window attention (sliding_window)",
                     "a custom attention scale (query_pre_attn_scalar)", "attention logit soft-capping")
        reasons = [r for r in self._special_features() if r not in paged_has]
        if self.rope_scaling is not None and self.rope_scaling.type in ("yarn", "longrope"):
            reasons.append(f"rope_scaling.type {self.rope_scaling.type}")
        return "; ".join(reasons) or None

    def tp_refusal(self) -> str | None:
        """Why the tensor-parallel segments (export/tp.py) cannot shard this model, or None."""
        # q/k norms are per head (replicated on every rank) and window masks per rank's heads: TP has both
        tp_has = ("q/k normalisation (q_norm/k_norm)", "sliding-window attention (sliding_window)")
        reasons = [r for r in self._special_features() if r not in tp_has]
        if self.rope_scaling is not None and self.rope_scaling.type in ("yarn", "longrope"):
            reasons.append(f"rope_scaling.type {self.rope_scaling.type}")
        return "; ".join(reasons) or None

    def _special_features(self) -> list[str]:
        checks = (
            (self.qk_norm, "q/k normalisation (q_norm/k_norm)"),
            (self.sandwich_norm, "norms on the attention and MLP outputs"),
            (self.norm == "rms_one_plus", "(1 + w) RMSNorm"),
            (self.mlp == "geglu", "GELU-gated MLP"),
            (self.has_windows, "sliding-window attention (sliding_window)"),
            (self.local_rope_theta is not None, "per-layer rotary bases"),
            (self.partial_rotary_factor != 1.0, f"partial rotary (partial_rotary_factor={self.partial_rotary_factor})"),
            (self.attn_scale is not None, "a custom attention scale (query_pre_attn_scalar)"),
            (self.attn_softcap is not None, "attention logit soft-capping"),
            (self.final_softcap is not None, "final logit soft-capping"),
            (self.embed_scale != 1.0, "scaled embeddings"),
        )
        return [why for bad, why in checks if bad]


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
