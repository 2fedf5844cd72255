"""One rank's share of a tensor-parallel step: its segment sessions chained by all-reduces.

``ShardSession.run`` has ``StepSession.run``'s signature, so a rank's KV shard is driven by
the ordinary ``LocalExecutor`` (same pool writes, same slot moves as TP=1). The segment
order and names come from the manifest (``EnginePart.extra``: rank, segment, segment_name).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ember.engine_format.decoder_spec import kv_geometry
from ember.engine_format.manifest import Manifest
from ember.engine_format.roles import PAST_KEY
from ember.engine_format.tp_spec import rank_parts
from ember.errors import ArtifactError
from ember.ort.session import session_options
from ember.runtime.executor import LocalExecutor
from ember.runtime.kv_pool import KVPool
from ember.runtime.tp.comm import Comm


def _session(path: Path, threads: int, device: str) -> ort.InferenceSession:
    so = session_options(threads)
    if device.startswith("cuda"):
        dev = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": dev}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # ORT's own exception types
        raise ArtifactError(f"{path} could not be loaded by ONNX Runtime ({e}); recompile the folder") from e


class ShardSession:
    """Runs rank ``comm.rank``'s segments; partials are summed across ranks between them."""

    def __init__(self, folder: Path, manifest: Manifest, rank: int, threads: int, device: str = "cpu"):
        self.comm: Comm | None = None  # set once every rank has loaded (the process groups need all of them)
        self.vocab_size = int(manifest.model["config"]["vocab_size"])
        self.parts = rank_parts(manifest, rank)
        self.segments = []
        for p in self.parts:
            s = _session(Path(folder) / p.file, threads, device)
            self.segments.append((p.extra["segment_name"], s, [i.name for i in s.get_inputs()],
                                  [o.name for o in s.get_outputs()]))
        kv = self.parts[1].tensor(PAST_KEY, layer=0)
        self.kv_heads, self.head_dim, self.kv_dtype = int(kv.shape[1]), int(kv.shape[3]), kv.dtype
        self.num_layers = sum(1 for p in self.parts if p.extra["segment_name"].startswith("attn."))
        self.layer_rings = kv_geometry(manifest.model["config"]).layer_rings  # the segments' window rings

    def run(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray,
            kv: list[np.ndarray]) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """Same contract as ``StepSession.run``; logits [B,V] on rank 0, None elsewhere."""
        feeds = {"input_ids": input_ids, "positions": positions, "past_lengths": past_lengths,
                 "new_lengths": new_lengths}
        for i in range(self.num_layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = kv[2 * i], kv[2 * i + 1]
        new_kv: list[np.ndarray] = []
        logits = None
        for name, sess, inputs, outputs in self.segments:
            out = sess.run(outputs, {n: feeds[n] for n in inputs})  # hidden arrives in the graphs' dtype
            if name == "head":
                shards = self.comm.gather_to_first(out[0])
                if shards is not None:
                    logits = np.concatenate(shards, axis=-1)[:, : self.vocab_size].astype(np.float32, copy=False)
            else:
                feeds["hidden"] = self.comm.all_reduce(out[0])
                new_kv += out[1:]
        return logits, new_kv


def shard_executor(folder: Path, manifest: Manifest, rank: int, world: int, *, max_batch: int, max_seq_len: int,
                   threads: int | None, device: str) -> LocalExecutor:
    """This rank's executor: its segment chain over its own KV shard (``kv_heads`` per rank).

    Its session's ``comm`` is attached by the caller once the process groups exist."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // world)
    session = ShardSession(folder, manifest, rank, threads, device)
    pool = KVPool(session.num_layers, session.kv_heads, session.head_dim, slots=max_batch, max_capacity=max_seq_len,
                  dtype=session.kv_dtype, layer_rings=session.layer_rings)
    return LocalExecutor(session, pool)
