"""A decoder folder's model description as the runtime reads it: ``model.config`` checked
field by field, and the KV cache geometry derived from it."""
from __future__ import annotations

from typing import Any, NamedTuple

from ember.engine_format.kv_ring import held
from ember.engine_format.manifest import MANIFEST_NAME
from ember.engine_format.roles import ROPE_LONG
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
    _check_kv_rings(cfg, where)
    eos = cfg.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise ArtifactError(f"{where}: model.config.eos_token_id is {eos!r}, not a token id; recompile the folder")
    return cfg


def _check_kv_rings(cfg: dict[str, Any], where: str) -> None:
    """``kv_rings`` (absent or empty: no rings) is one whole number per layer, 0 or at least the layer's window."""
    rings, windows = cfg.get("kv_rings"), cfg.get("layer_windows")
    if rings is None or rings == []:
        return
    if not isinstance(rings, list) or len(rings) != cfg["num_layers"] or not isinstance(windows, list) or \
            len(windows) != cfg["num_layers"]:
        raise ArtifactError(f"{where}: model.config.kv_rings / layer_windows must list one entry per layer "
                            f"({cfg['num_layers']}); recompile the folder")
    for i, (ring, window) in enumerate(zip(rings, windows)):
        whole = isinstance(ring, int) and not isinstance(ring, bool) and ring >= 0
        if not whole or (ring and not (isinstance(window, int) and 0 < window <= ring)):  # a ring holds its window
            raise ArtifactError(f"{where}: model.config.kv_rings[{i}] is {ring!r} for a layer with window {window!r}; "
                                "it must be 0 or a whole number >= the window: recompile the folder")


class KVGeometry(NamedTuple):
    """The KV cache's shape per layer, [slots, num_kv_heads, positions, head_dim], from the decoder description.

    ``layer_rings``: per layer, the positions a sliding-window layer keeps (its ring, ``engine_format/kv_ring.py``;
    0 = every position); empty when no layer has one (full-attention models, folders compiled before rings)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_rings: tuple[int, ...] = ()

    def ring(self, layer: int) -> int:
        return self.layer_rings[layer] if self.layer_rings else 0

    def slot_bytes(self, positions: int, itemsize: int) -> int:
        """Bytes of one slot laid out for ``positions`` positions (a window layer holds at most its ring)."""
        per_position = 2 * self.num_kv_heads * self.head_dim * itemsize
        return per_position * sum(held(positions, self.ring(l)) for l in range(self.num_layers))

    def positions_within(self, slot_budget: int, itemsize: int, limit: int) -> int:
        """The most positions (<= ``limit``) a slot can be laid out for in ``slot_budget`` bytes."""
        if self.slot_bytes(limit, itemsize) <= slot_budget:
            return limit
        lo, hi = 0, limit  # slot_bytes(lo) <= budget < slot_bytes(hi); it grows with positions
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.slot_bytes(mid, itemsize) <= slot_budget else (lo, mid)
        return lo


def kv_geometry(cfg: dict[str, Any]) -> KVGeometry:
    """The one place the runtime reads geometry from a (checked) ``model.config``: ``head_dim`` is
    the recorded one (Qwen3 and Gemma 3 set it apart from hidden_size / num_heads), ``kv_rings`` the
    ring of each sliding-window layer the step graph was built for (absent: every layer full)."""
    return KVGeometry(cfg["num_layers"], cfg["num_kv_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"],
                      tuple(cfg.get("kv_rings") or ()))


def longrope_switch(cfg: dict[str, Any], part, where: str = MANIFEST_NAME) -> int | None:
    """LongRoPE's switch length (``original_max_position_embeddings``) of a decoder whose step graph
    takes the per-row ``rope_long`` input, for the scheduler's recompute (``runtime/scheduler.py``);
    None for other models. A LongRoPE folder compiled before that input existed rotated each position
    by itself: it is refused (recompile)."""
    scaling = cfg.get("rope_scaling")
    longrope = isinstance(scaling, dict) and scaling.get("type") == "longrope"
    takes_input = any(t.role == ROPE_LONG for t in part.inputs)
    if longrope != takes_input:
        raise ArtifactError(f"{where}: model.config {'has' if longrope else 'has no'} LongRoPE scaling but the step "
                            f"graph {'lacks' if longrope else 'takes'} the rope_long input; recompile the folder "
                            f"with this Ember")
    if not longrope:
        return None
    switch = scaling.get("original_max_positions")
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
        raise ArtifactError(f"{where}: model.config.rope_scaling.original_max_positions is {switch!r}, not a positive "
                            "integer; recompile the folder")
    return switch
