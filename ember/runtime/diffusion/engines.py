"""ONNX Runtime sessions for the diffusion engine parts, checked against the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.compiler.manifest import EnginePart, resolve_member
from ember.errors import ArtifactError
from ember.runtime.session import make_session


class PartSession:
    """One engine part. ``run(feeds)`` -> outputs in the manifest's order (fresh arrays, caller owns).

    Q/DQ parts run with the ORT optimizers their manifest entry disables
    (``extra["ort_disabled_optimizers"]``): left on, CommonSubexpressionElimination merges the
    per-edge Q/DQ pairs of q/k/v and MatMulAddFusion rebuilds float Gemms, so those layers would
    dequantize their weights every call instead of running as int8 kernels.
    ``optimized_path`` writes ORT's optimized graph there (for inspection and tests).
    """

    def __init__(self, folder: Path, part: EnginePart, threads: int | None = None,
                 optimized_path: str | Path | None = None) -> None:
        if part.backend != "onnxruntime":
            raise ArtifactError(f"part {part.name!r} was built for {part.backend}; the diffusion runtime runs onnxruntime parts")
        self.disabled_optimizers = list(part.extra.get("ort_disabled_optimizers") or [])
        self.sess = make_session(resolve_member(folder, part.file, f"parts[{part.name}]"), threads,
                                 disabled_optimizers=self.disabled_optimizers,
                                 optimized_path=optimized_path)
        have = {i.name for i in self.sess.get_inputs()}
        want = {t.name for t in part.inputs}
        if have != want:
            raise ArtifactError(f"{folder / part.file}: graph inputs {sorted(have)} differ from the manifest's "
                                f"{sorted(want)}; recompile")
        self.name = part.name
        self.output_names = [t.name for t in part.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(self.output_names, feeds)
