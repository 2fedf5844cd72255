"""CUDA graphs for the paged step graph's calls (issue 19), in one ONNX Runtime session: the
weights stay one copy on the device.

A decode-only call (every row feeds one token) runs through a graph captured once per
``GraphBucket``: rows rounded up to a power of two, a KV-length bound (a power of two of at
least ``MIN_KV_BOUND`` tokens). So does a small prefill or mixed call (at most
``PREFILL_GRAPH_MAX_ROWS`` rows and ``PREFILL_GRAPH_MAX_TOKENS`` tokens: batch-1 time to first
token is otherwise the host's launch of every kernel), in a bucket that adds a padding row and
rounds the packed tokens up to ``PREFILL_TOKEN_BUCKETS``. Everything a replay reads is fixed at
capture: the bound device addresses, the shapes, and ``attention_metadata`` (host memory, read
when the graph is captured, never again). So each call is padded to its bucket (``pad_feeds``)
and copied into static device buffers that every graph binds (one copy per call,
``feed_staging``), and the bounds the graph was captured with -- [most new tokens of a row,
kv_bound] -- hold for every row it serves (PagedAttention's contract: the bounds are
replay-wide upper bounds; the kernel re-reads each row's lengths from device memory). Padding
rows start at position 0 of the session's scratch block (the executor's extra block past the
scheduler's, ``scratch_blocks``): they write only there, and their logits are dropped.
Bucketing the KV bound keeps the decode kernel's split count close to the live length's (ORT
sizes its split-KV launch from the bound) while the graphs stay few.

Larger calls launch normally (ONNX Runtime's ``gpu_graph_id`` -1: never captured), in the same
session, through one binding whose pools stay bound. ``PagedSession`` holds this control flow
over a ``PagedRunner`` -- ONNX Runtime's IOBinding on the GPU (``cuda_paged.OrtPagedRunner``), a
fake that replays what it captured on the CPU tests -- so the CPU tier checks the padding, the
static buffers and the capture/replay order against the numpy reference of the operator.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ember.engine_format.paged_feeds import HOST_BOUNDS
from ember.errors import InputError
from ember.runtime.feed_staging import FeedStaging, layout

MIN_KV_BOUND = 256  # the smallest KV-length bucket, tokens: shorter contexts share one graph per row count
# Small prefill (and mixed) calls are captured too: the host launch of a plain call costs more than
# its kernels (llama-1b, H100, one 128-token prompt: 2.9 ms on the host for 1.8 ms on the device).
# Bounded so the graphs stay few: at most PREFILL_GRAPH_MAX_ROWS sequences (a padding row is added)
# and PREFILL_GRAPH_MAX_TOKENS packed tokens, rounded up to PREFILL_TOKEN_BUCKETS.
PREFILL_GRAPH_MAX_ROWS = 3
PREFILL_TOKEN_BUCKETS = (16, 32, 64, 96, 128, 192, 256)
PREFILL_GRAPH_MAX_TOKENS = PREFILL_TOKEN_BUCKETS[-1]


@dataclass(frozen=True)
class GraphBucket:
    """The static shape of a captured call: ``rows`` sequences packing ``tokens`` new tokens (None:
    one per row, a decode call), each holding at most ``kv_bound`` tokens (a multiple of
    ``block_size``) after its new ones."""

    rows: int
    kv_bound: int
    block_size: int
    tokens: int | None = None

    def __post_init__(self):
        if self.rows < 1 or self.block_size < 1 or self.kv_bound < self.block_size or self.kv_bound % self.block_size:
            raise ValueError(f"graph bucket {self}: rows >= 1 and kv_bound a positive multiple of block_size")
        if self.tokens is not None and not self.rows < self.tokens <= self.kv_bound:
            raise ValueError(f"graph bucket {self}: a prefill bucket packs more tokens than rows, at most kv_bound")

    @property
    def table_width(self) -> int:
        """Block-table columns: enough blocks for ``kv_bound`` tokens."""
        return self.kv_bound // self.block_size

    @property
    def token_count(self) -> int:
        return self.rows if self.tokens is None else self.tokens

    @property
    def bounds(self) -> np.ndarray:
        """``attention_metadata`` of every replay: [most new tokens of a row, most tokens of a row]."""
        return np.array([1 if self.tokens is None else self.tokens, self.kv_bound], np.int32)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kv_bound(max_total: int, block_size: int, max_blocks: int, min_kv_bound: int) -> int | None:
    """``max_total`` rounded up to a power of two of at least ``min_kv_bound``, then to whole blocks,
    at most ``max_blocks`` of them; None past that."""
    cap = max_blocks * block_size
    if max_total > cap:
        return None
    return min(cap, -(-max(min_kv_bound, _pow2_at_least(max_total)) // block_size) * block_size)


def decode_bucket(rows: int, max_total: int, block_size: int, max_blocks: int,
                  min_kv_bound: int = MIN_KV_BOUND) -> GraphBucket | None:
    """The bucket of a decode call of ``rows`` sequences whose longest holds ``max_total`` tokens
    after its new one: both rounded up to a power of two (KV to at least ``min_kv_bound``), the
    KV bound then to whole blocks and to at most ``max_blocks`` of them (the block tables'
    width). None when ``max_total`` exceeds that."""
    kv = _kv_bound(max_total, block_size, max_blocks, min_kv_bound)
    return None if kv is None else GraphBucket(_pow2_at_least(rows), kv, block_size)


def prefill_bucket(rows: int, tokens: int, max_total: int, block_size: int, max_blocks: int,
                   min_kv_bound: int = MIN_KV_BOUND) -> GraphBucket | None:
    """The bucket of a call of ``rows`` sequences packing ``tokens`` new tokens (some row more than
    one), the longest holding ``max_total`` after them: one padding row at least (rows + 1, to a
    power of two), the tokens plus one per padding row rounded up to ``PREFILL_TOKEN_BUCKETS``, the
    KV bound as a decode call's and at least the tokens (a padding row may hold all but one).
    None for a call past ``PREFILL_GRAPH_MAX_ROWS`` or ``PREFILL_GRAPH_MAX_TOKENS``: a plain launch."""
    if rows > PREFILL_GRAPH_MAX_ROWS:
        return None
    padded_rows = _pow2_at_least(rows + 1)
    need = tokens + padded_rows - rows
    size = next((t for t in PREFILL_TOKEN_BUCKETS if t >= need), None)
    if size is None:
        return None
    kv = _kv_bound(max(max_total, size), block_size, max_blocks, min_kv_bound)
    return None if kv is None else GraphBucket(padded_rows, kv, block_size, tokens=size)


def is_decode_only(feeds: dict[str, np.ndarray]) -> bool:
    """Every row of the packed call (``paged_feeds.pack_rows``) feeds exactly one token."""
    return len(feeds["input_ids"]) == len(feeds["past_seqlens"])


def graph_bucket(feeds: dict[str, np.ndarray], block_size: int, max_blocks: int,
                 min_kv_bound: int = MIN_KV_BOUND) -> GraphBucket | None:
    """The bucket a packed call (``pack_rows``) replays in, or None: a plain launch."""
    rows, tokens = len(feeds["past_seqlens"]), len(feeds["input_ids"])
    cu = feeds["cumulative_sequence_length"]
    max_total = int((feeds["past_seqlens"].astype(np.int64) + np.diff(cu)).max())
    if is_decode_only(feeds):
        return decode_bucket(rows, max_total, block_size, max_blocks, min_kv_bound)
    return prefill_bucket(rows, tokens, max_total, block_size, max_blocks, min_kv_bound)


def pad_feeds(feeds: dict[str, np.ndarray], bucket: GraphBucket, scratch_block: int) -> dict[str, np.ndarray]:
    """A call's packed inputs (``pack_rows``) at ``bucket``'s shapes. The rows past the call's are
    padding on ``scratch_block`` from position 0: one token each, the first of them taking every
    token the bucket has left over (a prefill bucket); they write only there and their logits are
    dropped. Block tables are cut or padded (-1, unmapped) to ``bucket.table_width`` columns;
    ``attention_metadata`` is the bucket's bounds. ValueError when the call does not fit."""
    b, n = len(feeds["past_seqlens"]), len(feeds["input_ids"])
    past = feeds["past_seqlens"].astype(np.int64)
    new = np.diff(feeds["cumulative_sequence_length"]).astype(np.int64)
    rows, width, size = bucket.rows, bucket.table_width, bucket.token_count
    spare = size - n - (rows - b - 1)  # the first padding row's tokens
    if ((bucket.tokens is None) != (n == b) or b > rows or spare < (1 if rows > b else 0)
            or (past + new).max() > bucket.kv_bound or new.max() > bucket.bounds[0]):
        raise ValueError(f"a call of {b} rows, {n} tokens, longest {int((past + new).max())}, does not fit {bucket}")
    ids = np.zeros(size, np.int64)
    ids[:n] = feeds["input_ids"]
    padded_past = np.zeros(rows, np.int32)
    padded_past[:b] = past
    counts = np.ones(rows, np.int64)
    counts[:b] = new
    if rows > b:
        counts[b] = spare
    table = np.full((rows, width), -1, np.int32)
    cols = min(width, feeds["block_table"].shape[1])
    table[:b, :cols] = feeds["block_table"][:, :cols]
    table[b:, :-(-int(counts[b:].max(initial=1)) // bucket.block_size)] = scratch_block
    return {"input_ids": ids, "cumulative_sequence_length": np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
            "past_seqlens": padded_past, "block_table": table, HOST_BOUNDS: bucket.bounds}


class PagedRunner(Protocol):
    """What ``PagedSession`` needs from ONNX Runtime (``cuda_paged.OrtPagedRunner``) or a CPU fake."""

    graphs: bool  # the session was made with CUDA graphs enabled

    def ordered(self) -> contextlib.AbstractContextManager:
        """Device work in the body runs after the caller's so far, and before the caller's later work."""
        ...

    def bind(self, device_feeds: dict[str, Any], host_feeds: dict[str, np.ndarray], pools: dict[str, Any],
             logits: Any) -> Any:
        """A binding of the device tensors, the host arrays, each pool as its ``*_cache`` and
        ``*_cache_out`` and ``logits`` [B, V] float32 as the output."""
        ...

    def rebind(self, binding: Any, device_feeds: dict[str, Any], host_feeds: dict[str, np.ndarray],
               logits: Any) -> None:
        """``binding`` (from ``bind``) with new feeds and logits; its pools stay bound."""
        ...

    def run(self, binding: Any, graph_id: int | None) -> None:
        """Run ``binding``; ``graph_id`` None: a plain launch (never captured); an int: capture on
        its first run, replay the captured graph afterwards (the binding's addresses then)."""
        ...

    def without_graphs(self) -> PagedRunner:
        """A runner over a session made without CUDA graphs (after a capture failed)."""
        ...


class PagedSession:
    """A ``cuda_paged.PagedGraphSession`` over a ``PagedRunner``: decode-only calls replay CUDA
    graphs (``cuda_graph_status`` "on"), the others launch plainly.

    ``max_rows`` / ``max_blocks``: the largest call (the scheduler's ``max_batch``) and block
    table (``max_seq_len`` / block size) it serves; the logits buffer [rows, V] float32 and the
    decode graphs' static inputs are sized for them once, at the first call, and every call
    returns a view of that buffer, valid until the next call (the executor's ``PendingGreedy``
    reads it first, on the caller's stream, which the next call waits for).
    ``cuda_graph_status``: "on", "off" (not asked) or "unavailable: <why>"."""

    def __init__(self, runner: PagedRunner, vocab: int, device: Any, max_rows: int, max_blocks: int,
                 host_bounds: bool, cuda_graph_status: str, min_kv_bound: int = MIN_KV_BOUND):
        import torch

        self.torch, self.runner, self.vocab, self.device = torch, runner, vocab, device
        self.host_bounds = host_bounds
        self.max_rows, self.max_blocks, self.min_kv_bound = max_rows, max_blocks, min_kv_bound
        self.cuda_graph_status = cuda_graph_status
        if cuda_graph_status == "on" and not host_bounds:
            self.cuda_graph_status = ("unavailable: the paged graph takes no attention_metadata, so the kernel reads "
                                      "the lengths back from the device (no capture); recompile the folder")
        self.lock = threading.RLock()
        self._logits = None
        self._static: FeedStaging | None = None  # the decode graphs' inputs, at fixed offsets
        self._static_offsets: dict[str, int] = {}
        self._plain_staging: FeedStaging | None = None  # a plain launch's inputs, back to back
        self._plain_binding: tuple[tuple, Any] | None = None  # (pools' addresses and shape, binding)
        self._bucket_views: dict[GraphBucket, dict[str, Any]] = {}
        self._pools_seen: tuple[dict, tuple] | None = None
        self._graphs: dict[tuple, tuple[Any, int]] = {}  # (bucket, pools' addresses and shape) -> (binding, graph id)
        self._graph_ids = 0  # ONNX Runtime keeps every graph it captured: an id is never used twice
        self.counters = {"cuda_graph_captures_total": 0, "cuda_graph_replays_total": 0, "paged_plain_calls_total": 0,
                         "cuda_graph_padding_rows_total": 0, "cuda_graph_prefill_calls_total": 0,
                         "paged_chained_calls_total": 0}

    @property
    def scratch_blocks(self) -> int:
        """Blocks the executor adds past the scheduler's at the end of each pool: the padding rows' (graphs only)."""
        return 1 if self.cuda_graph_status == "on" else 0

    def run(self, feeds: dict[str, np.ndarray], pools: dict[str, Any], device_ids=None):
        """One call (``PagedGraphSession.run``): logits [B, V] float32, a view of the session's buffer.
        ``device_ids``: a device tensor of ``feeds``' input ids (a chained decode call: the ids in
        ``feeds`` are placeholders), copied in on the device behind the host's feeds."""
        rows = len(feeds["past_seqlens"])
        if rows > self.max_rows:
            raise InputError(f"a paged call of {rows} rows; this session serves at most {self.max_rows} (max_batch)")
        self.counters["paged_chained_calls_total"] += device_ids is not None
        with self.lock, self.runner.ordered():
            if self.cuda_graph_status == "on":
                bucket = graph_bucket(feeds, _block_size(pools), self.max_blocks, self.min_kv_bound)
                if bucket is not None:
                    return self._replay(feeds, pools, bucket, device_ids)[:rows]
            return self._run_plain(feeds, pools, device_ids)

    @property
    def _static_rows(self) -> int:
        """Rows of the largest bucket: a decode call of ``max_rows``, or a prefill call and its padding row."""
        return max(_pow2_at_least(self.max_rows), _pow2_at_least(min(self.max_rows, PREFILL_GRAPH_MAX_ROWS) + 1))

    @property
    def buffer_bytes(self) -> int:
        """Device bytes of the logits buffer and (with graphs) the decode graphs' static inputs."""
        static = self._static_specs() if self.cuda_graph_status == "on" else {}
        return self._static_rows * self.vocab * 4 + sum(n * dtype.itemsize for n, dtype in static.values())

    def logits_buffer(self):
        """[rows, V] float32: every call's output, a view of it (sized once)."""
        if self._logits is None:
            self._logits = self.torch.empty((self._static_rows, self.vocab), dtype=self.torch.float32,
                                            device=self.device)
        return self._logits

    def _run_plain(self, feeds: dict[str, np.ndarray], pools: dict[str, Any], device_ids=None):
        """A plain launch: the feeds in one copy, one binding reused while the pools stay (only
        the feeds and logits are rebound: binding every pool again costs more host time than
        the copy)."""
        if self._plain_staging is None:
            self._plain_staging = FeedStaging(self.torch, self.device)
        device = self._plain_staging.put({n: a for n, a in feeds.items() if n != HOST_BOUNDS})
        if device_ids is not None:
            device["input_ids"][:len(device_ids)].copy_(device_ids)
        host = {HOST_BOUNDS: feeds[HOST_BOUNDS]} if HOST_BOUNDS in feeds else {}
        logits = self.logits_buffer()[:len(feeds["past_seqlens"])]
        key = self._pools_key(pools)
        if self._plain_binding is not None and self._plain_binding[0] == key:
            binding = self._plain_binding[1]
            self.runner.rebind(binding, device, host, logits)
        else:
            binding = self.runner.bind(device, host, pools, logits)
            self._plain_binding = (key, binding)
        self.runner.run(binding, None)
        self.counters["paged_plain_calls_total"] += 1
        return logits

    def _static_specs(self) -> dict[str, tuple[int, Any]]:
        """The graphs' static inputs: name -> (elements, torch dtype), for the largest bucket."""
        torch, r = self.torch, self._static_rows
        return {"input_ids": (max(r, PREFILL_GRAPH_MAX_TOKENS), torch.int64), "cumulative_sequence_length": (r + 1, torch.int32),
                "past_seqlens": (r, torch.int32), "block_table": (r * self.max_blocks, torch.int32)}

    def _static_inputs(self) -> FeedStaging:
        """One device buffer every decode graph binds views of (their starts never move), and
        its pinned host mirror: each replay's inputs move in one copy."""
        if self._static is None:
            specs = {name: n * np.dtype(str(dtype).removeprefix("torch.")).itemsize
                     for name, (n, dtype) in self._static_specs().items()}
            self._static_offsets, total = layout(specs)
            self._static = FeedStaging(self.torch, self.device, total)
        return self._static

    def _views(self, bucket: GraphBucket) -> dict[str, Any]:
        """Views of the static inputs at ``bucket``'s shapes (made once per bucket)."""
        views = self._bucket_views.get(bucket)
        if views is None:
            s, at, r = self._static_inputs(), self._static_offsets, bucket.rows
            views = self._bucket_views[bucket] = {
                "input_ids": s.view(at["input_ids"], np.int64, (bucket.token_count,)),
                "cumulative_sequence_length": s.view(at["cumulative_sequence_length"], np.int32, (r + 1,)),
                "past_seqlens": s.view(at["past_seqlens"], np.int32, (r,)),
                "block_table": s.view(at["block_table"], np.int32, (r, bucket.table_width))}
        return views

    def _pools_key(self, pools: dict[str, Any]) -> tuple:
        """What a binding of ``pools`` depends on (their addresses and shape), computed once per pools dict."""
        if self._pools_seen is None or self._pools_seen[0] is not pools:
            self._pools_seen = (pools, _pools_key(pools))
        return self._pools_seen[1]

    def _replay(self, feeds: dict[str, np.ndarray], pools: dict[str, Any], bucket: GraphBucket, device_ids=None):
        padded = pad_feeds(feeds, bucket, scratch_block=_num_blocks(pools) - 1)
        views = self._views(bucket)
        # copied in (one copy, on the session's stream) before the replay reads them
        self._static_inputs().put_fixed({n: padded[n] for n in views}, self._static_offsets)
        if device_ids is not None:
            views["input_ids"][:len(device_ids)].copy_(device_ids)
        logits = self.logits_buffer()[:bucket.rows]
        key = (bucket, *self._pools_key(pools))
        self.counters["cuda_graph_padding_rows_total"] += bucket.rows - len(feeds["past_seqlens"])
        self.counters["cuda_graph_prefill_calls_total"] += bucket.tokens is not None
        if key in self._graphs:
            binding, graph_id = self._graphs[key]
            self.runner.run(binding, graph_id)
            self.counters["cuda_graph_replays_total"] += 1
            return logits
        self._graph_ids += 1  # from 1: 0 is ONNX Runtime's id for a run that names none; -1 never captures
        graph_id = self._graph_ids
        binding = self.runner.bind(views, {HOST_BOUNDS: padded[HOST_BOUNDS]}, pools, logits)
        try:
            self.runner.run(binding, graph_id)
        except Exception as e:  # noqa: BLE001 -- ORT refused to capture: plain launches from now on
            what = (f"decode bucket {bucket.rows} x {bucket.kv_bound}" if bucket.tokens is None else
                    f"prefill bucket {bucket.rows} rows x {bucket.tokens} tokens x {bucket.kv_bound}")
            self.cuda_graph_status = f"unavailable: capturing {what} " \
                                     f"failed ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})"
            self._graphs.clear()
            self._plain_binding = None
            del binding  # it holds the graph-enabled session, which goes before the plain one loads
            self.runner = self.runner.without_graphs()
            with self.runner.ordered():  # the new session's stream, joined to the caller's as the old one was
                return self._run_plain(feeds, pools, device_ids)
        self._graphs[key] = (binding, graph_id)
        self.counters["cuda_graph_captures_total"] += 1
        return logits

    def forget_graphs(self) -> None:
        """Stop replaying the captured graphs (their pools are gone); later calls capture anew, under new ids."""
        self._graphs.clear()
        self._plain_binding = self._pools_seen = None

    def stats(self) -> dict[str, Any]:
        return {"cuda_graph_status": self.cuda_graph_status, **self.counters}


def _pools_key(pools: dict[str, Any]) -> tuple:
    """What a binding of ``pools`` depends on: their addresses and shape."""
    return tuple(int(t.data_ptr()) for t in pools.values()), tuple(next(iter(pools.values())).shape)


def _block_size(pools: dict[str, Any]) -> int:
    return int(next(iter(pools.values())).shape[1])


def _num_blocks(pools: dict[str, Any]) -> int:
    return int(next(iter(pools.values())).shape[0])
