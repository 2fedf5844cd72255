"""ONNX Runtime sessions for the diffusion engine parts, checked against the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.engine_format.manifest import EnginePart
from ember.engine_format.tensorrt_part import PLAN_TITLES, is_plan
from ember.errors import ArtifactError, InputError
from ember.ort.session import make_session
from ember.runtime.backend_choice import onnx_graph, runs_plan


class PartSession:
    """One engine part. ``run(feeds)`` -> outputs in the manifest's order (fresh arrays, caller owns).

    Q/DQ parts run with the ORT optimizers their manifest entry disables
    (``extra["ort_disabled_optimizers"]``): left on, CommonSubexpressionElimination merges the
    per-edge Q/DQ pairs of q/k/v and MatMulAddFusion rebuilds float Gemms, so those layers would
    dequantize their weights every call instead of running as int8 kernels.
    ``optimized_path`` writes ORT's optimized graph there (for inspection and tests).
    A TensorRT / TensorRT-RTX part runs its plan's source ONNX graph with ``backend='onnxruntime'``
    (the diffusion runtime runs ONNX Runtime only; without it such a part is refused). This is the
    host path's session; ``device_engines.DevicePartSession`` is the device path's.
    """

    def __init__(self, folder: Path, part: EnginePart, threads: int | None = None,
                 optimized_path: str | Path | None = None, backend: str | None = None) -> None:
        if runs_plan(part, backend):
            raise InputError(f"{folder}: part {part.name!r} is a {PLAN_TITLES[part.backend]} plan ({part.file}), and "
                             f"Ember's diffusion runtime runs ONNX Runtime only: load the folder with "
                             f"backend='onnxruntime' (CLI: --backend onnxruntime) to run the plan's source ONNX graph")
        if part.backend != "onnxruntime" and not is_plan(part):
            raise ArtifactError(f"part {part.name!r} was built for {part.backend}; the diffusion runtime runs "
                                f"onnxruntime parts -- recompile the folder")
        self.disabled_optimizers = list(part.extra.get("ort_disabled_optimizers") or [])
        self.sess = make_session(onnx_graph(folder, part), threads,
                                 disabled_optimizers=self.disabled_optimizers,
                                 optimized_path=optimized_path)
        have = {i.name for i in self.sess.get_inputs()}
        want = {t.name for t in part.inputs}
        if have != want:
            raise ArtifactError(f"{folder / part.file}: graph inputs {sorted(have)} differ from the manifest's "
                                f"{sorted(want)}; recompile")
        self.name = part.name
        self.output_names = [t.name for t in part.outputs]
        self.input_dtypes = {i.name: ORT_NUMPY[i.type] for i in self.sess.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds are cast to the graph's input types (an FP16 engine takes the loop's float32)."""
        return self.sess.run(self.output_names, {k: np.asarray(v, self.input_dtypes[k]) for k, v in feeds.items()})

    run_host = run  # host arrays in and out (the device path's ``DevicePartSession.run_host``)


ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
