"""Pass: block-wise weight-only quantization into ``com.microsoft.MatMulNBits`` (ONNX Runtime).

Every MatMul whose second input is a constant 2-D weight [K, N] becomes one MatMulNBits node:
the weight is stored as ``bits``-bit integers in blocks of ``block_size`` consecutive K values,
each block with its own float scale (and, unless ``symmetric``, a zero point). Activations stay
float; ``accuracy_level`` tells the kernel how to compute (4 = quantize the activation to int8
per block and use int8 dot products, the fastest form on AVX2/AVX-512 VNNI CPUs; 0 = dequantize
to float). The quantizer is ONNX Runtime's own (``onnxruntime.quantization.matmul_nbits_quantizer``):

* ``rtn``: round to nearest per block (``DefaultWeightOnlyQuantConfig``, ONNX Runtime's C++ kernel);
* ``hqq``: Half-Quadratic Quantization (``HQQWeightOnlyQuantConfig``; torch, no data), 4 bits;
* ``gptq``: GPTQ from the calibration feeds (``GPTQWeightOnlyQuantConfig``), 4 bits.

Constant-weight Gemms (GPT-2's Linears) are first rewritten as MatMul + Add (``quant_gemm``).
The LM head (the Gemm or MatMul writing ``logits``) and the embedding Gather stay float unless
``quantize_lm_head``. Mixed schemes (``site_bits``, ``--quantize-sites``): each weight's site
(attention or mlp, recorded in the graph by ``export/matmul_sites.py``) chooses its width, 4, 8 or
float; block size, zero points and accuracy level stay shared, and 8-bit weights are always rounded
to nearest. ``NBitsReport.matmuls`` records what each weight MatMul got, and its site.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ember.errors import ConfigError
from ember.export.external_data import tensor_nbytes
from ember.passes.quant_gemm import gemm_to_matmul

BLOCK_SIZES = (32, 64, 128)
METHODS = ("rtn", "hqq", "gptq")
BITS = (4, 8)
SCHEMES = {4: "int4", 8: "int8-weights", None: "float"}  # bits -> the --quantize / --quantize-sites name
MIXED_SITES = ("attention", "mlp")  # the sites --quantize-sites sets (the LM head: --quantize-lm-head)
# MatMulNBits accuracy_level per ONNX Runtime provider: CPU 4 (int8 compute; measured faster than
# 0 at batch 1 and 16 on AVX2, docs/quantization.md); CUDA ignores it (FP16 compute).
ACCURACY_LEVEL = {"CPUExecutionProvider": 4, "CUDAExecutionProvider": 0}


@dataclass(frozen=True)
class NBitsOptions:
    bits: int = 4  # 4 (int4) | 8 (int8-weights)
    block_size: int = 32
    method: str = "rtn"  # rtn | hqq | gptq: how 4-bit weights are rounded (8-bit ones: rtn)
    symmetric: bool = False  # no zero points (slightly faster, less accurate at 4 bits)
    accuracy_level: int = ACCURACY_LEVEL["CPUExecutionProvider"]
    quantize_lm_head: bool = False
    lm_head_output: str = "logits"
    # bits per site (attention, mlp; export/matmul_sites.py) in place of ``bits``; None keeps the site float
    site_bits: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"MatMulNBits bits={self.bits} is not one of {', '.join(map(str, BITS))}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.method not in METHODS:
            raise ConfigError(f"--int4-method {self.method!r} is not one of {', '.join(METHODS)}")
        for site, bits in self.site_bits.items():
            if site not in MIXED_SITES or bits not in (*BITS, None):
                raise ConfigError(f"--quantize-sites {site}={bits}: sites are {', '.join(MIXED_SITES)}, bits "
                                  f"{', '.join(map(str, BITS))} or None (float)")
        if self.method != "rtn" and 4 not in self.all_bits:
            raise ConfigError(f"--int4-method {self.method} quantizes to 4 bits only; 8-bit weights use rtn")
        if self.method == "gptq" and self.site_bits:
            raise ConfigError("--int4-method gptq quantizes the whole graph at one width; not with --quantize-sites "
                              "(use --int4-method rtn or hqq)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"MatMulNBits accuracy_level={self.accuracy_level} is not one of 0-4")

    @property
    def scheme(self) -> str:
        return f"int{self.bits}"

    @property
    def all_bits(self) -> set[int]:
        """The widths the weights get (each site's, and the LM head's where it is quantized)."""
        widths = {self.bits_for(site) for site in MIXED_SITES} | ({self.bits} if self.quantize_lm_head else set())
        return {b for b in widths if b is not None}

    def bits_for(self, site: str) -> int | None:
        """The width of a weight of ``site`` (attention, mlp); None: kept float."""
        return self.site_bits.get(site, self.bits)

    def method_for(self, bits: int) -> str:
        """How a ``bits``-wide weight is rounded: ``method`` at 4 bits, round-to-nearest at 8."""
        return self.method if bits == 4 else "rtn"


@dataclass
class NBitsReport:
    options: NBitsOptions
    matmuls: list[dict[str, Any]] = field(default_factory=list)  # one per constant-weight MatMul/Gemm
    weight_bytes_float: int = 0  # bytes of the float weights that were quantized
    weight_bytes_quantized: int = 0  # their packed weights + scales + zero points

    def summary(self) -> str:
        return summarize_matmuls(self.matmuls)

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        record = {"scheme": o.scheme, "format": "MatMulNBits", "bits": o.bits, "block_size": o.block_size,
                  "method": o.method, "symmetric": o.symmetric, "accuracy_level": o.accuracy_level,
                  "quantize_lm_head": o.quantize_lm_head,
                  "quantized_nodes": sum(m["bits"] is not None for m in self.matmuls),
                  "weight_bytes_float": self.weight_bytes_float, "weight_bytes_quantized": self.weight_bytes_quantized,
                  "weight_compression": round(self.weight_bytes_float / max(self.weight_bytes_quantized, 1), 3),
                  "summary": self.summary(), "matmuls": self.matmuls}
        if o.site_bits:
            record["sites"] = {site: SCHEMES[o.bits_for(site)] for site in MIXED_SITES}
        return record


FLOAT_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}


def summarize_matmuls(matmuls: Sequence[dict[str, Any]]) -> str:
    """One line: which form each weight MatMul got, and at which sites, e.g.
    ``int4 b32 rtn: 14 MatMuls (mlp); int8 b32 rtn: 8 MatMuls (attention); fp32: lm_head``. Weights left
    float are named by their type (``dtype``; records written before it say ``float``)."""
    groups: dict[str, list[str | None]] = {}  # form -> the site of each of its MatMuls
    for m in matmuls:
        site = m.get("site") or m.get("role")  # "role": records before sites, lm_head or None
        if m.get("bits") is None:
            form = m.get("dtype", "float")
        else:
            form = f"int{m['bits']} b{m['block_size']} {m['method']}{' sym' if m.get('symmetric') else ''}"
        groups.setdefault(form, []).append(site)
    return "; ".join(f"{form}: {_describe_sites(sites)}" for form, sites in groups.items()) or "no weight MatMuls"


def _describe_sites(sites: list[str | None]) -> str:
    """``14 MatMuls (mlp)``, ``lm_head``, ``8 MatMuls (attention), lm_head``, ``3 MatMuls`` (no sites recorded)."""
    body = [s for s in sites if s != "lm_head"]
    parts = []
    if body:
        known = [s for s in ("attention", "mlp") if s in body]
        untagged = sum(s is None for s in body)
        where = known + ([f"{untagged} of unknown site"] if untagged and known else [])
        parts.append(f"{len(body)} MatMul{'s' * (len(body) != 1)}" + (f" ({', '.join(where)})" if where else ""))
    if len(body) < len(sites):
        parts.append("lm_head")
    return ", ".join(parts)


class _FeedReader:
    """ONNX Runtime CalibrationDataReader over a list of feed dicts (GPTQ deep-copies it)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.at = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= len(self.feeds):
            return None
        self.at += 1
        return self.feeds[self.at - 1]

    def __iter__(self):
        return iter(self.feeds)


def gptq_compensates() -> bool:
    """Whether ONNX Runtime's GPTQ differs from round-to-nearest on a small correlated problem.

    onnxruntime 1.32's ``neural_compressor.weight_only.gptq`` propagates each column's error
    through ``Hinv[i:, i]`` of an upper-triangular factor (zeros below the diagonal), so no error
    is fed forward and its weights equal RTN's bit for bit (docs/quantization.md)."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    x = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64))
    h = 2 * x.T @ x / len(x)
    args = {"num_bits": 4, "group_size": 32, "scheme": "asym", "blocksize": 128, "percdamp": 0.01,
            "actorder": False, "mse": False, "perchannel": True}
    q = gptq(w.copy(), h.copy(), **args)
    rtn = gptq(w.copy(), np.eye(64), **args)  # identity Hessian: GPTQ is round-to-nearest
    return not np.allclose(q, rtn, atol=1e-6)


def require_working_gptq() -> None:
    if not gptq_compensates():
        raise ConfigError("--int4-method gptq: this ONNX Runtime's GPTQ returns the round-to-nearest weights (its "
                          "error feedback reads the wrong triangle of the inverse Hessian); use --int4-method rtn or hqq")


def _weight_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def quantize_matmul_nbits(model: onnx.ModelProto, options: NBitsOptions, calib_feeds: Sequence[dict[str, np.ndarray]] = (),
                          base_dir=None, cache: NBitsCache | None = None) -> tuple[onnx.ModelProto, NBitsReport]:
    """Return a new model whose weight MatMuls are MatMulNBits (``model`` is not modified).

    RTN and HQQ quantize one weight at a time (ONNX Runtime's quantizer on a one-MatMul graph), reading
    weights kept in external files from ``base_dir``: a multi-GiB graph is never in memory as a whole,
    and the result holds only the packed weights plus references to the weights left float. GPTQ needs
    the whole graph and the calibration feeds. ``cache`` (RTN and HQQ): an ``NBitsCache`` that records
    each weight's result, or gives back one recorded for the same float weight in another graph."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    except ModuleNotFoundError as e:  # it imports onnx_ir
        raise ConfigError(f"block-wise quantization needs ONNX Runtime's quantizer, which needs {e.name}: "
                          f"pip install {e.name}") from None
    if options.method == "gptq":
        if not calib_feeds:
            raise ConfigError("--int4-method gptq needs calibration feeds (prompts); use --int4-method rtn or hqq")
        require_working_gptq()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    lm_head = next((n.name for n in out.graph.node if options.lm_head_output in n.output
                    and n.op_type in ("MatMul", "Gemm")), None)
    sites, widths = _plan(out, options, lm_head)
    keep = tuple(name for name, bits in widths.items() if bits is None)
    gemm_to_matmul(out, keep=keep, base_dir=base_dir)
    inits = {i.name: i for i in out.graph.initializer}
    weights = {n.name: _shape_only(inits[n.input[1]]) for n in _weight_nodes(out)}
    if not any(n.op_type == "MatMul" and n.name in weights and n.name not in keep for n in out.graph.node):
        raise ConfigError("no MatMul with a constant 2-D weight to quantize in this graph; compile without --quantize")
    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        if options.method == "gptq":
            from ember.export.external_data import load_all

            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_FeedReader(calib_feeds))
            quantizer = mnq.MatMulNBitsQuantizer(load_all(out, base_dir), bits=options.bits,
                                                 block_size=options.block_size, is_symmetric=options.symmetric,
                                                 nodes_to_exclude=list(keep), algo_config=algo)
            quantizer.process()
            result = quantizer.model.model
        else:
            result = _quantize_each_weight(out, options, widths, base_dir, mnq, cache)
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    _drop_unread_initializers(result)
    return result, _finish(result, options, weights, sites, keep)


def _plan(model: onnx.ModelProto, options: NBitsOptions, lm_head: str | None
          ) -> tuple[dict[str, str | None], dict[str, int | None]]:
    """Each weight node's site (``export/matmul_sites.read_sites``; the LM head by the output it writes)
    and width (None: kept float). With ``site_bits``, a node of unknown site is an error, not a guess."""
    from ember.export.matmul_sites import read_sites

    recorded = read_sites(model)
    sites, widths = {}, {}
    for node in _weight_nodes(model):
        site = "lm_head" if node.name == lm_head else recorded.get(node.name)
        sites[node.name] = site
        if site == "lm_head":
            widths[node.name] = options.bits if options.quantize_lm_head else None
        elif site is None and options.site_bits:
            raise ConfigError(f"--quantize-sites: weight {node.op_type} {node.name!r} has no recorded site (attention "
                              f"or mlp) in this graph (ember.matmul_sites: {len(recorded)} nodes), so its width is "
                              f"unknown; compile without --quantize-sites")
        else:
            widths[node.name] = options.bits if site is None else options.bits_for(site)
    return sites, widths


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (e.g. the LM head's float table once ``gemm_to_matmul`` gave its
    MatMul a [K, N] copy that was then quantized): an engine should not carry dead float weights."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for t in [t for t in model.graph.initializer if t.name not in read]:
        model.graph.initializer.remove(t)


def _shape_only(t: onnx.TensorProto) -> onnx.TensorProto:
    """Name, type and shape of a weight, without its data (what the report needs)."""
    return onnx.TensorProto(name=t.name, dims=list(t.dims), data_type=t.data_type)


def _quantize_each_weight(model: onnx.ModelProto, options: NBitsOptions, widths: dict[str, int | None], base_dir, mnq,
                          cache: NBitsCache | None = None) -> onnx.ModelProto:
    """Replace each constant-weight MatMul by ONNX Runtime's MatMulNBits for it at its width (``widths``;
    None: left float), in place; each weight is read, quantized on a one-MatMul graph and dropped before
    the next is read (the float initializers left unread go in ``_drop_unread_initializers``)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done: dict[tuple[str, int], tuple[onnx.NodeProto, list[onnx.TensorProto]]] = {}  # (weight, bits) -> node, tensors
    targets = [n for n in _weight_nodes(model) if n.op_type == "MatMul" and widths.get(n.name) is not None]
    for node in targets:
        key = (node.input[1], widths[node.name])
        if key not in done:
            done[key] = _quantize_one(node, inits[key[0]], options, key[1], mnq, base_dir, cache)
            g.initializer.extend(done[key][1])
        q = onnx.NodeProto()
        q.CopyFrom(done[key][0])
        q.input[0], q.output[0], q.name = node.input[0], node.output[0], node.name + f"_Q{key[1]}"
        at = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(at, q)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def one_matmul_model(node: onnx.NodeProto, weight: onnx.TensorProto, base_dir=None, data: bytes | None = None
                     ) -> onnx.ModelProto:
    """A model of this one MatMul ``x @ weight``, ``weight`` inline (read from ``base_dir`` where it is
    external, or ``data``: its bytes, read already). The weight's bytes are copied once, into the model's
    initializer: building the graph with ``helper.make_graph(initializer=...)`` and ``make_model`` would
    copy them twice more."""
    from ember.export.external_data import inline_tensor

    k, n = weight.dims
    graph = helper.make_graph([helper.make_node("MatMul", ["x", weight.name], ["y"], name=node.name)], "one_matmul",
                              [helper.make_tensor_value_info("x", weight.data_type, ["rows", k])],
                              [helper.make_tensor_value_info("y", weight.data_type, ["rows", n])])
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    w = one.graph.initializer.add()
    w.CopyFrom(weight)  # an external weight: its name, type, shape and file reference
    inline_tensor(w, base_dir, data)
    return one


def _quantize_one(node: onnx.NodeProto, weight: onnx.TensorProto, options: NBitsOptions, bits: int, mnq,
                  base_dir=None, cache: NBitsCache | None = None) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """ONNX Runtime's quantizer on a graph of this one MatMul, at ``bits``: its MatMulNBits node and tensors
    (``cache``'s, where it holds them for these float bytes and options)."""
    data = content = None
    if cache is not None:
        from ember.export.external_data import raw_bytes

        data = raw_bytes(weight, base_dir)  # read once: hashed, then (not cached) the one-MatMul graph's
        content = cache.key(data, weight, options, bits)
        hit = cache.get(content, weight.name)
        if hit is not None:
            return hit
    one = one_matmul_model(node, weight, base_dir, data)
    if options.method_for(bits) == "rtn":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=options.block_size, is_symmetric=options.symmetric, bits=bits)
    else:
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=bits)
    quantizer = mnq.MatMulNBitsQuantizer(one, bits=bits, block_size=options.block_size,
                                         is_symmetric=options.symmetric, algo_config=algo)
    quantizer.process()
    result = quantizer.model.model.graph
    nodes = [m for m in result.node if m.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(result.node) != 1:
        raise ConfigError(f"ONNX Runtime's quantizer turned MatMul {node.name!r} into "
                          f"{[m.op_type for m in result.node]}, not one MatMulNBits; compile without --quantize")
    tensors = [t for t in result.initializer if t.name != weight.name]
    if cache is not None:
        cache.put(content, weight.name, nodes[0], tensors)
    return nodes[0], tensors


class NBitsCache:
    """``_quantize_one``'s results by float weight content, to quantize a weight once per compile where two
    graphs hold it (issue 18: a fused int4 compile's step graph and decode part share their o, gate, up and
    down weights, ~88 % of the bytes; the decode part's query weights carry the folded attention scale).

    The first graph records each weight's MatMulNBits node and the names of its tensors (``put``); once
    that graph is saved, ``attach`` points the cache at its file, and ``get`` reads the tensors recorded
    for a weight of the same bytes, shape, type, width, method, block size and zero points back from it,
    named for the new weight as ONNX Runtime's quantizer names them: the same node and tensors, byte for
    byte, that quantizing it again gives. Nothing is recorded after ``attach``, and nothing is held in
    memory but names and the attached graph's structure."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[onnx.NodeProto, str, list[str]]] = {}  # key -> node, weight, tensor names
        self.hits = 0
        self._tensors: dict[str, onnx.TensorProto] | None = None  # the attached graph's initializers
        self._dir = None

    @staticmethod
    def key(data: bytes, weight: onnx.TensorProto, options: NBitsOptions, bits: int) -> tuple:
        """What decides ``_quantize_one``'s result for ``weight``, whose bytes are ``data`` (by SHA-256)."""
        import hashlib

        return (hashlib.sha256(data).hexdigest(), tuple(weight.dims), weight.data_type, bits,
                options.method_for(bits), options.block_size, options.symmetric)

    def put(self, key: tuple, weight_name: str, node: onnx.NodeProto, tensors: Sequence[onnx.TensorProto]) -> None:
        if self._tensors is None and key not in self.entries and all(t.name.startswith(weight_name) for t in tensors):
            template = onnx.NodeProto()
            template.CopyFrom(node)
            self.entries[key] = (template, weight_name, [t.name for t in tensors])

    def attach(self, graph_path) -> None:
        """Read recorded tensors from the saved graph ``graph_path`` (its external data beside it) from now on."""
        from pathlib import Path

        graph = onnx.load(str(graph_path), load_external_data=False)
        self._tensors = {t.name: t for t in graph.graph.initializer}
        self._dir = Path(graph_path).parent

    def get(self, key: tuple, weight_name: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]] | None:
        """The node and tensors recorded for ``key``, renamed for ``weight_name``; None: not recorded, or
        no graph attached that holds them."""
        from ember.export.external_data import load_tensor

        entry = self.entries.get(key)
        if entry is None or self._tensors is None:
            return None
        template, old, names = entry
        if not all(n in self._tensors for n in names):
            return None
        rename = {n: weight_name + n[len(old):] for n in names}
        tensors = []
        for n in names:
            t = load_tensor(self._tensors[n], self._dir)  # an external one: a copy, its bytes read in
            if t is self._tensors[n]:
                t = onnx.TensorProto()
                t.CopyFrom(self._tensors[n])
            t.ClearField("data_location")  # as the quantizer made it: raw bytes, no location field
            t.name = rename[n]
            tensors.append(t)
        node = onnx.NodeProto()
        node.CopyFrom(template)
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
        self.hits += 1
        return node, tensors


def _finish(model: onnx.ModelProto, options: NBitsOptions, weights: dict[str, onnx.TensorProto],
            sites: dict[str, str | None], keep: Sequence[str]) -> NBitsReport:
    """Set accuracy_level on every MatMulNBits node; record what each weight MatMul got, and its site."""
    report = NBitsReport(options)
    inits = {i.name: i for i in model.graph.initializer}
    nbits = {}
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in n.attribute}
        if "accuracy_level" in attrs:
            attrs["accuracy_level"].i = options.accuracy_level
        elif options.accuracy_level:
            n.attribute.append(helper.make_attribute("accuracy_level", options.accuracy_level))
        source = re.sub(r"_Q\d+$", "", n.name)
        nbits[source] = {k: helper.get_attribute_value(v) for k, v in attrs.items()}
        report.weight_bytes_quantized += sum(tensor_nbytes(inits[i]) for i in n.input[1:] if i in inits)
    for name, w in weights.items():
        site = sites.get(name)
        if name in nbits:
            a = nbits[name]
            report.weight_bytes_float += tensor_nbytes(w)
            report.matmuls.append({"node": name, "site": site, "bits": int(a["bits"]), "block_size": int(a["block_size"]),
                                   "method": options.method_for(int(a["bits"])), "symmetric": options.symmetric,
                                   "accuracy_level": options.accuracy_level})
            continue
        if name not in keep:
            reason = "not quantized by ONNX Runtime"
        elif site == "lm_head":
            reason = "kept float (--quantize-lm-head quantizes it)"
        else:
            reason = f"kept float (--quantize-sites {site}=float)"
        report.matmuls.append({"node": name, "site": site, "bits": None, "dtype": FLOAT_NAMES.get(w.data_type, "float"),
                               "reason": reason})
    return report
