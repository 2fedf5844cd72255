"""The engine folder format: what the compiler writes and the runtime reads.

Both sides depend on this package and never on each other (``tests/test_layering.py``):

- ``manifest``: the manifest's schema (``Manifest``, ``EnginePart``, ``TensorSpec``), reading
  and validating a folder, and the gate every member file goes through;
- ``io_specs``: an ONNX graph's inputs and outputs as manifest ``TensorSpec`` records;
- ``decoder_spec``: a decoder's ``model.config`` checked, and its KV cache geometry;
- ``profiles``: optimization profiles of engines with dynamic shapes (TensorRT);
- ``tensorrt_part``: what a TensorRT / TensorRT-RTX plan part records, and whether it runs here;
- ``tp_spec``: the per-rank segment parts of a tensor-parallel folder;
- ``writer``: where a compile may write its folder, and the atomic writer.

No module here imports torch, TensorRT or the runtime's sessions.
"""
