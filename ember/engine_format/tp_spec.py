"""A tensor-parallel folder's parts (``ember compile --tp N``): one chain of segment graphs per rank.

Each part's ``extra`` names its ``rank`` (0..N-1), its position in the rank's chain
(``segment``) and what it computes (``segment_name``: ``embed``, ``attn.<layer>``,
``mlp.<layer>``, ``head``); the runtime sums the segments' partial outputs across ranks
between them. A folder is tensor-parallel when any part has a rank.
"""
from __future__ import annotations

from ember.engine_format.manifest import EnginePart, Manifest
from ember.errors import ArtifactError


def is_tensor_parallel(manifest: Manifest) -> bool:
    return any(p.extra.get("rank") is not None for p in manifest.parts)


def tp_size(manifest: Manifest) -> int:
    ranks = {p.extra.get("rank") for p in manifest.parts}
    if None in ranks or ranks != set(range(len(ranks))):
        raise ArtifactError("manifest mixes tensor-parallel rank parts with other parts, or misses a rank; recompile "
                            "with `ember compile SOURCE --tp N`")
    return len(ranks)


def rank_parts(manifest: Manifest, rank: int) -> list[EnginePart]:
    parts = sorted((p for p in manifest.parts if p.extra.get("rank") == rank), key=lambda p: p.extra["segment"])
    if not parts:
        raise ArtifactError(f"manifest has no parts for tensor-parallel rank {rank}; recompile the folder")
    return parts
