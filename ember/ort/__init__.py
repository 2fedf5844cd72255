"""ONNX Runtime sessions over an engine folder's graphs, shared by the runtime (its CPU
executors) and the compile-time checks (``export.gqa_decode``): ``session`` (Ember's session
options and the step-graph session), ``decode_session`` (the fused decode part, K/V in place)."""
