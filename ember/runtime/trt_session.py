"""Runs a TensorRT or TensorRT-RTX plan of the step graph with device buffers, behind
``CudaStepSession``'s interface (``run(ids, positions, past_lengths, new_lengths, kv) -> (logits, new_kv)``).

One session, two libraries: the part's backend picks the module (``tensorrt`` or
``tensorrt_rtx_bindings``, whose Runtime / engine / execution-context API is the same) and
the checks made before the plan is read (``open_plan_library``): the classic plan's build
environment (``check_plan_compat``), or the TensorRT-RTX plan's targets and release
(``gpu_target.check_rtx_plan``). Where the library can judge a plan from its header
(``Runtime.get_engine_validity``), that verdict is read before deserializing too.

One execution context per optimization profile (decode: T = 1; prefill: T > 1), chosen per
call with ``profiles.select_profile``; all tensors are PyTorch CUDA tensors whose addresses
are handed to ``set_tensor_address``, and ``execute_async_v3`` runs on PyTorch's current
stream, so the KV pool's writes and the plan are ordered without host syncs.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ember.engine_format.profiles import select_profile
from ember.engine_format.roles import (LOGITS, NEW_KEY, NEW_LENGTHS, NEW_VALUE, PAST_KEY, PAST_LENGTHS, PAST_VALUE,
                                      POSITIONS, TOKEN_IDS)
from ember.engine_format.tensorrt_part import (PLAN_TITLES, check_plan_compat, gpu_environment, part_profiles,
                                             require_tensorrt)
from ember.errors import ArtifactError
from ember.ort.session import kv_input_names, small_step_inputs


def open_plan_library(part, plan_path: str | os.PathLike, device_index: int = 0):
    """The library module that runs ``part``'s plan, once every check that needs no plan bytes
    has passed (an ArtifactError / ConfigError / InputError naming the fix otherwise)."""
    if part.backend == "tensorrt-rtx":
        from ember.runtime.gpu_target import check_rtx_plan

        return check_rtx_plan(part, device_index)
    if part.backend != "tensorrt":
        raise ArtifactError(f"part {part.name!r} has backend {part.backend!r}, not a TensorRT plan; recompile the folder")
    check_plan_compat(part.extra, gpu_environment(device_index), plan=Path(plan_path).name)
    return require_tensorrt()


def check_engine_validity(trt, runtime, data: bytes, plan_path, title: str) -> None:
    """The library's own verdict on the plan's header (``get_engine_validity``, where it has it)."""
    if not (hasattr(runtime, "get_engine_validity") and hasattr(trt, "EngineValidity")):
        return
    validity, diagnostics = runtime.get_engine_validity(data)
    if validity != trt.EngineValidity.INVALID:
        return
    flags = getattr(trt, "EngineInvalidityDiagnostics", None)
    reasons = [n.lower() for n, v in (flags.__members__.items() if flags else ()) if int(diagnostics) & int(v)]
    raise ArtifactError(f"{title} says {plan_path} cannot run here ({', '.join(reasons) or 'no reason given'}; see "
                        f"its log above): rebuild the folder for this GPU and {title} release, or load it with "
                        f"backend='onnxruntime' (CLI: --backend onnxruntime)")


class TensorRTStepSession:
    """A ``DeviceSession`` (``executor_protocol.py``) over a TensorRT or TensorRT-RTX plan."""

    # ``run`` reads its ids from host arrays (``torch.from_numpy``): a chained step's ids are a
    # device tensor, so ``DeviceExecutor`` never chains over this session; every step's tokens
    # are read by the host before the next decode is launched.
    supports_chaining = False
    # TensorRT runs each profile's execution context as is; no CUDA graph capture here.
    cuda_graph_status = "off"

    def forget_graphs(self) -> None:
        """Nothing to drop: no graphs are captured (``cuda_graph_status`` is off)."""

    def __init__(self, plan_path: str | os.PathLike, part, num_layers: int, device_index: int = 0):
        from ember.runtime.device_kv_pool import require_torch

        trt = open_plan_library(part, plan_path, device_index)
        title = PLAN_TITLES[part.backend]
        torch = require_torch()
        self.torch, self.trt, self.num_layers, self.title = torch, trt, num_layers, title
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.current_stream(self.device)
        self.lock = threading.RLock()  # DeviceExecutor holds it around its device work
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if part.extra.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        data = Path(plan_path).read_bytes()
        check_engine_validity(trt, self.runtime, data, plan_path, title)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtifactError(f"{title} could not deserialize {plan_path} (see its log above); recompile the folder")
        self.profiles = part_profiles(part)
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise ArtifactError(f"{plan_path} has {self.engine.num_optimization_profiles} optimization profiles but the "
                                f"manifest lists {len(self.profiles)}; recompile the folder")
        self.contexts = []
        for i in range(len(self.profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
            self.contexts.append(ctx)
        # the order ``run`` passes them in: token ids, positions, past and new lengths, then K/V by layer
        small = [part.tensor(r).name for r in (TOKEN_IDS, POSITIONS, PAST_LENGTHS, NEW_LENGTHS)]
        self.input_names = small + [t.name for t in part.kv_tensors(PAST_KEY, PAST_VALUE)]
        self.output_names = [part.tensor(LOGITS, output=True).name] + [
            t.name for t in part.kv_tensors(NEW_KEY, NEW_VALUE, output=True)]
        self.out_dtypes = {t.name: t.dtype for t in part.outputs}

    def run(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray,
            kv: list, rope_long: np.ndarray | None = None) -> tuple[Any, list]:
        """As ``CudaStepSession.run``: host int64 small inputs, device KV views; device outputs."""
        from ember.runtime.device_kv_pool import torch_dtype

        torch = self.torch
        b, t = input_ids.shape
        p = max(int(a.shape[2]) for a in kv)  # sliding-window rings can be shorter than the other layers
        ctx = self.contexts[select_profile(self.profiles, {"batch": b, "tokens": t, "past": p})]
        small = {n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device) for n, a in
                 small_step_inputs(self.input_names, input_ids, positions, past_lengths, new_lengths, rope_long).items()}
        for name, a in list(small.items()) + list(zip(kv_input_names(self.input_names), kv)):
            ctx.set_input_shape(name, tuple(a.shape))
            ctx.set_tensor_address(name, a.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            o = torch.empty(shape, dtype=torch_dtype(self.out_dtypes[name]), device=self.device)
            ctx.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError(f"{self.title} execute_async_v3 failed (see its log above)")
        return outs[0], outs[1:]
