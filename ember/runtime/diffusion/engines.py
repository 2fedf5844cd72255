"""ONNX Runtime sessions for the diffusion engine parts, checked against the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ember.compiler.manifest import EnginePart
from ember.errors import ArtifactError
from ember.runtime.session import default_threads


class PartSession:
    """One engine part. ``run(feeds)`` -> outputs in the manifest's order (fresh arrays, caller owns)."""

    def __init__(self, folder: Path, part: EnginePart, threads: int | None = None) -> None:
        if part.backend != "onnxruntime":
            raise ArtifactError(f"part {part.name!r} was built for {part.backend}; the diffusion runtime runs onnxruntime parts")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        path = folder / part.file
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's own exception types
            raise ArtifactError(f"{path} could not be loaded by ONNX Runtime ({e}); recompile the folder") from e
        have = {i.name for i in self.sess.get_inputs()}
        want = {t.name for t in part.inputs}
        if have != want:
            raise ArtifactError(f"{path}: graph inputs {sorted(have)} differ from the manifest's {sorted(want)}; recompile")
        self.name = part.name
        self.output_names = [t.name for t in part.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(self.output_names, feeds)
