"""One compiled decoder loaded once for every arm of a benchmark run.

Every arm runs on the same ONNX Runtime session (same weights, same threads, one copy of
the weights in memory): the fused engine, the sequential engine, one engine per request for
the concurrent-instances arm, and the batch runners of static/dynamic batching.
"""
from __future__ import annotations

import os
from pathlib import Path

from ember.compiler.manifest import Manifest, kv_geometry, read_manifest, verify_files
from ember.errors import ArtifactError
from ember.runtime.decoder import DecoderEngine
from ember.runtime.executor import LocalExecutor
from ember.runtime.kv_pool import KVPool
from ember.runtime.loader import longrope_switch
from ember.runtime.scheduler import FusionScheduler, default_admit_batch, default_prefill_chunk
from ember.runtime.decode_session import DecodeSession
from ember.runtime.session import StepSession


class BenchModel:
    """A decoder folder's shared step session plus factories for engines and KV pools."""

    device = "cpu"  # the GPU harness's subclass runs on "cuda"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest: Manifest = read_manifest(self.folder)
        if self.manifest.kind != "decoder":
            raise ArtifactError(f"{self.folder} holds a {self.manifest.kind} engine; `ember bench serve` needs a decoder")
        verify_files(self.folder, self.manifest, check_hashes=False)
        cfg = self.manifest.model["config"]
        self.config = cfg
        part = self.manifest.part("step")
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(cfg)
        self.kv_dtype = next(t.dtype for t in part.inputs if t.name == "past_key.0")
        self.max_positions = int(cfg["max_positions"])
        self.vocab_size = int(cfg["vocab_size"])
        self.eos_token_id = cfg.get("eos_token_id")
        self.threads = threads
        self.rope_switch = longrope_switch(cfg, part, self.folder)
        self.session = StepSession(self.folder / part.file, self.num_layers, threads=threads)
        decode = self.manifest.find_part("decode")  # the fused decode part runs one-token steps where present
        self.decode = DecodeSession(self.folder / decode.file, self.num_layers, threads=threads) if decode else None

    def pool(self, slots: int) -> KVPool:
        return KVPool(self.num_layers, self.num_kv_heads, self.head_dim, slots=slots,
                      max_capacity=self.max_positions, dtype=self.kv_dtype)

    def executor(self, max_batch: int):
        """The executor an engine of ``max_batch`` slots runs on (the GPU harness overrides it)."""
        return LocalExecutor(self.session, self.pool(max_batch), decode=self.decode)

    def engine(self, max_batch: int, compaction: str = "min-move", prefill_chunk: int | None = None,
               max_queue: int = 1 << 20, admit_batch: int | None = None) -> DecoderEngine:
        """A DecoderEngine over the shared session, KV pool of ``max_batch`` full-length slots
        (``prefill_chunk``, ``admit_batch`` None: the runtime's defaults for ``self.device``)."""
        sched = FusionScheduler(max_batch=max_batch, kv_capacity_tokens=max_batch * self.max_positions,
                                max_seq_len=self.max_positions,
                                prefill_chunk=prefill_chunk or default_prefill_chunk(self.device),
                                admit_batch=admit_batch or default_admit_batch(self.device),
                                max_queue=max_queue, compaction=compaction, rope_switch=self.rope_switch)
        return DecoderEngine(self.executor(max_batch), sched, tokenizer=None,
                             eos_token_id=self.eos_token_id, max_positions=self.max_positions,
                             config=self.config, manifest=self.manifest)
