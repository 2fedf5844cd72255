"""ONNX Runtime CPU session over the decoder step graph (the contract of docs/design.md §3.1).

``StepSession.run`` takes numpy arrays; contiguous inputs (the KV pool's slot-range views)
are read in place by ONNX Runtime. Outputs are fresh arrays owned by the caller.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ember.errors import ArtifactError


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def session_options(threads: int | None = None, optimized_path: str | os.PathLike | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """Ember's ONNX Runtime settings: all graph optimizations, sequential, ``threads`` intra-op
    threads. ``optimized_path``: also write ORT's optimized graph there; ``profile_prefix``:
    record ORT's per-node profile (benchmarks/profile_step.py)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(onnx_path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None,
                 disabled_optimizers: list[str] | None = None,
                 optimized_path: str | os.PathLike | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session with ``session_options`` (CPU provider unless ``providers``)."""
    so = session_options(threads, optimized_path)
    try:
        kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
        return ort.InferenceSession(str(onnx_path), so, providers=providers or ["CPUExecutionProvider"], **kwargs)
    except Exception as e:  # ORT's own exception types
        raise ArtifactError(f"{Path(onnx_path)} could not be loaded by ONNX Runtime ({e}); recompile the folder") from e


def small_step_inputs(input_names, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                      new_lengths: np.ndarray, rope_long: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The step graph's inputs other than the K/V, by name, for a graph with ``input_names``
    (every step session feeds through here). ``rope_long`` (int64 [B], a LongRoPE graph only):
    1 = the row's tokens take the long factors; None = every row short (sequences within
    original_max_position_embeddings). Arrays of the caller pass through unchanged (a GPU
    session may hand in device tensors for the ids)."""
    feeds = {"input_ids": input_ids, "positions": positions, "past_lengths": past_lengths, "new_lengths": new_lengths}
    if "rope_long" in input_names:
        feeds["rope_long"] = (np.zeros(len(new_lengths), np.int64) if rope_long is None
                              else np.ascontiguousarray(rope_long, dtype=np.int64))
    return feeds


def kv_input_names(input_names) -> list[str]:
    """The K/V inputs ``past_key.i``/``past_value.i`` of a step graph, in graph order."""
    return [n for n in input_names if n.startswith(("past_key.", "past_value."))]


class StepSession:
    def __init__(self, onnx_path: str | os.PathLike, num_layers: int, threads: int | None = None,
                 providers: list[str] | None = None, disabled_optimizers: list[str] | None = None):
        self.sess = make_session(onnx_path, threads, providers, disabled_optimizers)
        self.num_layers = num_layers
        self.kv_names = []
        for i in range(num_layers):
            self.kv_names += [f"past_key.{i}", f"past_value.{i}"]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray,
            kv: list[np.ndarray], rope_long: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids/positions int64 [B,T]; lengths int64 [B]; kv 2L arrays [B,Hkv,P,D];
        ``rope_long`` int64 [B] for a LongRoPE graph (``small_step_inputs``).

        Returns logits [B,V] (float32) and the new tokens' K/V, 2L arrays [B,Hkv,T,D].
        """
        feeds = small_step_inputs(self.input_names, input_ids, positions, past_lengths, new_lengths, rope_long)
        feeds.update(zip(self.kv_names, kv))
        out = self.sess.run(self.output_names, feeds)
        logits = out[0] if out[0].dtype == np.float32 else out[0].astype(np.float32)
        return logits, out[1:]
