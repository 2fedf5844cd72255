"""Runs a TensorRT plan of the step graph with device buffers, behind ``CudaStepSession``'s
interface (``run(ids, positions, past_lengths, new_lengths, kv) -> (logits, new_kv)``).

One execution context per optimization profile (decode: T = 1; prefill: T > 1), chosen per
call with ``profiles.select_profile``; all tensors are PyTorch CUDA tensors whose addresses
are handed to ``set_tensor_address``, and ``execute_async_v3`` runs on PyTorch's current
stream, so the KV pool's writes and the plan are ordered without host syncs. The plan's
build environment is checked against this machine before it is deserialized.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ember.compiler.backends.tensorrt import check_plan_compat, gpu_environment, require_tensorrt
from ember.compiler.profiles import ProfileSpec, select_profile
from ember.errors import ArtifactError


class TensorRTStepSession:
    def __init__(self, plan_path: str | os.PathLike, part, num_layers: int, device_index: int = 0):
        from ember.runtime.device_kv_pool import require_torch

        torch = require_torch()
        check_plan_compat(part.extra, gpu_environment(device_index), plan=Path(plan_path).name)
        trt = require_tensorrt()
        self.torch, self.trt, self.num_layers = torch, trt, num_layers
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.current_stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if part.extra.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {plan_path} (see its log above); recompile the folder")
        self.profiles = [ProfileSpec.from_dict(p) for p in part.extra["profiles"]]
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise ArtifactError(f"{plan_path} has {self.engine.num_optimization_profiles} optimization profiles but the "
                                f"manifest lists {len(self.profiles)}; recompile the folder")
        self.contexts = []
        for i in range(len(self.profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.input_names = [t.name for t in part.inputs]
        self.output_names = [t.name for t in part.outputs]
        self.out_dtypes = {t.name: t.dtype for t in part.outputs}

    def run(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray,
            kv: list) -> tuple[Any, list]:
        """As ``CudaStepSession.run``: host int64 small inputs, device KV views; device outputs."""
        from ember.runtime.device_kv_pool import torch_dtype

        torch = self.torch
        b, t = input_ids.shape
        p = int(kv[0].shape[2])
        ctx = self.contexts[select_profile(self.profiles, {"batch": b, "tokens": t, "past": p})]
        small = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
                 for a in (input_ids, positions, past_lengths, new_lengths)]
        for name, a in zip(self.input_names, list(small) + list(kv)):
            ctx.set_input_shape(name, tuple(a.shape))
            ctx.set_tensor_address(name, a.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            o = torch.empty(shape, dtype=torch_dtype(self.out_dtypes[name]), device=self.device)
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError("TensorRT execute_async_v3 failed (see its log above)")
        return outs[0], outs[1:]
