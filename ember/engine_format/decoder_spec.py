"""A decoder folder's model description as the runtime reads it: ``model.config`` checked
field by field, and the KV cache geometry derived from it."""
from __future__ import annotations

from typing import Any, NamedTuple

from ember.engine_format.manifest import MANIFEST_NAME
from ember.errors import ArtifactError

_DECODER_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_positions")


def check_decoder_config(model: Any, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest's ``model.config`` of a decoder, checked field by field before the runtime
    sizes anything from it; one ArtifactError naming the field per problem."""
    cfg = model.get("config") if isinstance(model, dict) else None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{where}: model.config is missing or not an object; recompile the folder")
    for name in _DECODER_SIZES:
        if name not in cfg:
            raise ArtifactError(f"{where}: model.config has no {name!r}; recompile the folder with `ember compile`")
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ArtifactError(f"{where}: model.config.{name} is {v!r}, not an integer; recompile the folder")
        if v < 1:
            raise ArtifactError(f"{where}: model.config.{name} is {v}; it must be at least 1 -- recompile the folder")
    head_dim = cfg.get("head_dim") or 0  # 0 / absent (older folders): hidden_size // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 0:
        raise ArtifactError(f"{where}: model.config.head_dim is {head_dim!r}, not a positive integer; recompile the folder")
    if not head_dim and cfg["hidden_size"] % cfg["num_heads"]:
        raise ArtifactError(f"{where}: model.config.hidden_size {cfg['hidden_size']} is not a multiple of num_heads "
                            f"{cfg['num_heads']}; recompile the folder")
    if cfg["num_heads"] % cfg["num_kv_heads"]:
        raise ArtifactError(f"{where}: model.config.num_heads {cfg['num_heads']} is not a multiple of num_kv_heads "
                            f"{cfg['num_kv_heads']}; recompile the folder")
    eos = cfg.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise ArtifactError(f"{where}: model.config.eos_token_id is {eos!r}, not a token id; recompile the folder")
    return cfg


class KVGeometry(NamedTuple):
    """The KV cache's shape per layer, [slots, num_kv_heads, positions, head_dim], from the decoder description."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def kv_geometry(cfg: dict[str, Any]) -> KVGeometry:
    """The one place the runtime reads geometry from a (checked) ``model.config``: ``head_dim`` is
    the recorded one (Qwen3 and Gemma 3 set it apart from hidden_size / num_heads)."""
    return KVGeometry(cfg["num_layers"], cfg["num_kv_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"])
