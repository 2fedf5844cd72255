"""One compiled decoder loaded once for every arm of a benchmark run.

Every arm runs on the same ONNX Runtime session (same weights, same threads, one copy of
the weights in memory): the fused engine, the sequential engine, one engine per request for
the concurrent-instances arm, and the batch runners of static/dynamic batching.
"""
from __future__ import annotations

import os
from pathlib import Path

from ember.engine_format.decoder_spec import kv_geometry, longrope_switch
from ember.engine_format.manifest import Manifest, read_manifest, verify_files
from ember.engine_format.roles import PAST_KEY
from ember.errors import ArtifactError
from ember.ort.decode_session import DecodeSession
from ember.ort.session import StepSession
from ember.runtime.decoder import DecoderEngine
from ember.runtime.engine_builder import SchedulerOptions, make_engine, make_scheduler
from ember.runtime.executor import LocalExecutor
from ember.runtime.kv_pool import KVPool


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
        self.geometry = kv_geometry(cfg)
        self.num_layers, self.num_kv_heads, self.head_dim = self.geometry[:3]
        self.kv_dtype = part.tensor(PAST_KEY, layer=0).dtype
        self.max_positions = int(cfg["max_positions"])
        self.vocab_size = int(cfg["vocab_size"])
        self.eos_token_id = cfg.get("eos_token_id")
        self.threads = threads
        self.rope_switch = longrope_switch(cfg, part, str(self.folder))
        self.session = StepSession(self.folder / part.file, self.num_layers, threads=threads)
        decode = self.manifest.find_part("decode")  # the fused decode part runs one-token steps where present
        self.decode = DecodeSession(self.folder / decode.file, self.num_layers, threads=threads) if decode else None

    def pool(self, slots: int) -> KVPool:
        return KVPool(self.num_layers, self.num_kv_heads, self.head_dim, slots=slots,
                      max_capacity=self.max_positions, dtype=self.kv_dtype, layer_rings=self.geometry.layer_rings)

    def executor(self, max_batch: int):
        """The executor an engine of ``max_batch`` slots runs on (the GPU harness overrides it)."""
        return LocalExecutor(self.session, self.pool(max_batch), decode=self.decode)

    def engine(self, max_batch: int, compaction: str = "min-move", prefill_chunk: int | None = None,
               max_queue: int = 1 << 20, admit_batch: int | None = None) -> DecoderEngine:
        """A DecoderEngine over the shared session, KV pool of ``max_batch`` full-length slots
        (``prefill_chunk``, ``admit_batch`` None: the runtime's defaults for ``self.device``)."""
        options = SchedulerOptions(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   compaction=compaction, admit_batch=admit_batch)
        sched = make_scheduler(options, max_positions=self.max_positions, geometry=self.geometry,
                               kv_dtype=self.kv_dtype, device=self.device, rope_switch=self.rope_switch)
        return make_engine(self.manifest, sched, self.executor(max_batch))
