"""Gemma 3 (text): q/k-normed GQA with ``(1 + w)`` RMSNorms, norms on the attention and MLP
outputs too (sandwich), a tanh-GELU gated MLP, embeddings scaled by sqrt(hidden_size), the
score scale ``query_pre_attn_scalar ** -0.5``, final logit soft-capping, and a pattern of
sliding-window layers (``layer_types``, or every ``sliding_window_pattern``-th layer full)
whose RoPE has its own base (``rope_local_base_freq``); rope scaling applies to full layers.

``attn_logit_softcapping`` is read but not applied, as in transformers' Gemma 3.
Weight names: Hugging Face's ``post_attention_layernorm`` is the attention-output norm here
(``attn_out_norm``) and ``pre_feedforward_layernorm`` the norm before the MLP.
"""
from __future__ import annotations

import math
from typing import Any

from ember.errors import ConfigError
from ember.models.family import RotaryFamily, parse_rope, windows_from_hf
from ember.models.hf_fields import float_field, int_field, reject


class Gemma3Text(RotaryFamily):
    name = "gemma3_text"
    model_types = ("gemma3_text",)
    ARCH = {"positions": "rotary", "norm": "rms_one_plus", "mlp": "geglu"}
    hidden_act = ("hidden_activation", ("gelu_pytorch_tanh", "gelu_tanh"))
    tie_default = True
    layer_names = {**RotaryFamily.layer_names, "attn_out_norm": "post_attention_layernorm",
                   "post_attention_layernorm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        reject(cfg, "use_bidirectional_attention", lambda v: not v, where, "bidirectional attention")
        kw.update(qk_norm=True, sandwich_norm=True, embed_scale=math.sqrt(kw["hidden_size"]),
                  attn_scale=float_field(cfg, "query_pre_attn_scalar", where, 256.0, positive=True) ** -0.5,
                  final_softcap=float_field(cfg, "final_logit_softcapping", where, None, positive=True))
        rp = cfg.get("rope_parameters") or {}
        nested = isinstance(rp, dict) and "full_attention" in rp
        full = dict(rp.get("full_attention") or {}) if nested else {**rp, **(cfg.get("rope_scaling") or {})}
        local = dict(rp.get("sliding_attention") or {}) if nested else {}
        full.setdefault("rope_theta", 1_000_000.0)
        kw["rope_theta"], kw["rope_scaling"] = parse_rope(full, cfg, where, kw["head_dim"])
        local_theta, local_scaling = parse_rope({"rope_theta": 10_000.0, **local},
                                                {"rope_theta": cfg.get("rope_local_base_freq")}, where, kw["head_dim"])
        if local_scaling is not None:
            raise ConfigError(f"{where}: field rope_parameters.sliding_attention.rope_type={local_scaling.type!r} is not "
                              "supported (sliding layers use plain RoPE at their own base)")
        kw["local_rope_theta"] = local_theta
        pattern = int_field(cfg, "sliding_window_pattern", where, default=6)
        windows_from_hf(cfg, where, kw, [bool((i + 1) % pattern) for i in range(kw["num_layers"])])

    def to_hf(self, cfg):
        out = super().to_hf(cfg)
        out.pop(self.hidden_act[0])
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.attn_scale ** -2,
                   final_logit_softcapping=cfg.final_softcap, pad_token_id=0,
                   rope_parameters={"full_attention": out["rope_parameters"],
                                    "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}})
        out.pop("rope_theta")
        return out


FAMILY = Gemma3Text()
