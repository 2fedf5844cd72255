"""The fused decode part (``export/gqa_decode.py``) on ONNX Runtime's CPU provider.

The graph updates the K/V in place: each layer's ``past_*`` and ``present_*`` are bound to
the same pool view (a zero-copy ``OrtValue`` over the numpy array), so one call reads the
slot range's cache and appends every row's new token at its past length. Only the logits
are returned; nothing else is copied.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ember.ort.session import make_session


def decode_positions_ok(positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray) -> bool:
    """The fused decode graph places each row's token at its past length: a one-token call
    whose kept rows have positions == past lengths (always so in Ember's engine loop)."""
    if positions.shape[1] != 1:
        return False
    keep = new_lengths > 0
    return bool(np.array_equal(positions[keep, 0], past_lengths[keep]))


class DecodeSession:
    writes_kv_in_place = True

    def __init__(self, onnx_path: str | os.PathLike, num_layers: int, threads: int | None = None):
        self.sess = make_session(onnx_path, threads)
        self.num_layers = num_layers

    def run(self, input_ids: np.ndarray, past_lengths: np.ndarray, kv: list[np.ndarray]) -> np.ndarray:
        """input_ids int64 [B,1]; past_lengths [B]; kv 2L contiguous pool views [B,Hkv,S,D],
        updated in place (row b's new K/V land at position past_lengths[b]). Returns logits [B,V]."""
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.ascontiguousarray(past_lengths, dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(kv[0].shape[2], np.int32))
        io.bind_output("logits", "cpu")
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])
                io.bind_ortvalue_input(f"past_{kind}.{i}", buf)
                io.bind_ortvalue_output(f"present_{kind}.{i}", buf)
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()
