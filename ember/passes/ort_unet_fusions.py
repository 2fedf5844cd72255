"""ONNX Runtime's CUDA UNet fusions on an exported UNet, then FP16: the route of ORT's own Stable
Diffusion demo (``onnxruntime.transformers.optimizer``, ``model_type='unet'``).

The fusions write contrib ops with CUDA kernels only: ``NhwcConv`` (channels-last convolutions),
``GroupNorm`` / ``SkipGroupNorm`` (in place of the exported Reshape -> InstanceNormalization ->
Reshape -> Mul -> Add) and ``BiasSplitGelu`` (GEGLU), besides ``BiasAdd`` and
``SkipLayerNormalization``. ORT's CPU provider cannot load such a graph, so a folder built with
them runs on ``cuda:N`` only (its parts say ``extra["cuda_only"]``), and its numerics are checked on
the device (benchmarks/gpu_diffusion.py compares its image with the plain FP16 engine's).

Three workarounds, each for a failure seen on torch's export (ORT 1.32):
- ORT's attention fusion cannot read the head count of torch's SDPA export: ``mha_fusion`` fuses
  the attention first and ORT's stays off.
- ORT's optimizer fails on an FP16 graph, so it runs on the FP32 graph and ORT's own FP16 converter
  (which knows the contrib ops' types) follows.
- That converter's shape inference fails on ``NhwcConv`` when the spatial dims are numbers (it
  reads a shape the value-info does not have): the inputs' spatial dims are made symbolic for the
  conversion and restored after.
The timestep embedding stays FP32: every node feeding a ``Sin``/``Cos`` (FP16 spacing is 0.5 at
t = 999, so the angles would be off by up to 0.25 rad).
"""
from __future__ import annotations

import onnx

from ember.errors import ConfigError

CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu")


def ort_unet_fusions_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The FP32 ``model`` (attention already fused) rewritten by ORT's UNet fusions and converted to
    FP16 (graph inputs and outputs too); returns the new model and the count of each contrib op."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:  # the onnxruntime wheel ships them; a stripped install may not
        raise ConfigError(f"ORT UNet fusions need onnxruntime.transformers ({e}); reinstall onnxruntime(-gpu)") from e
    options = FusionOptions("unet")
    options.enable_attention = False  # passes/mha_fusion.py did it
    optimized = optimize_model(model, model_type="unet", num_heads=0, hidden_size=0, opt_level=0, use_gpu=True,
                               optimization_options=options)
    graph = optimized.model.graph
    del graph.value_info[:]
    spatial = _symbolic_spatial_dims(graph)
    optimized.convert_float_to_float16(keep_io_types=False, node_block_list=sorted(_feeding_sin_cos(graph)))
    graph = optimized.model.graph
    for v in graph.input:
        for d, value in zip(v.type.tensor_type.shape.dim[2:], spatial.get(v.name, ())):
            d.dim_value = value
    del graph.value_info[:]
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return optimized.model, counts


def _symbolic_spatial_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Give every 4-D input symbolic spatial dims; returns the numbers they had."""
    saved = {}
    for v in graph.input:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            saved[v.name] = [d.dim_value for d in dims[2:]]
            for k, d in enumerate(dims[2:]):
                d.dim_param = f"{v.name}_spatial{k}"
    return saved


def _feeding_sin_cos(graph: onnx.GraphProto) -> set[str]:
    """Names of the Sin/Cos nodes and of every node they read from (the timestep embedding's angles);
    unnamed nodes get names (ORT's converter blocks nodes by name)."""
    for i, n in enumerate(graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}_unnamed"
    producer = {o: n for n in graph.node for o in n.output}
    keep: set[str] = set()
    stack = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return keep
