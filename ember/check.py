"""``ember check FOLDER``: run each engine part on every backend present here and compare it
with its ONNX graph on ONNX Runtime's CPU provider, output by output.

Reference: the part's ONNX (for a TensorRT or TensorRT-RTX part, the graph it was built from,
``extra['source_onnx']``), or ``reference=`` a float ONNX of the same I/O (e.g. the FP32
export of an FP16 engine). Candidates, whichever are present: ONNX Runtime CUDA (for ONNX
parts, when onnxruntime-gpu and a GPU are here), TensorRT (for plans, when tensorrt is
importable), TensorRT-RTX (for its plans, when a GPU is here: a GPU outside the plan's
targets, or a missing library, is an error naming the fix), and ONNX Runtime CPU on the
part's own graph when it differs from the reference. Inputs follow the decoder step-graph
contract (a decode case and a prefill case, mixed past lengths, one padded row); other
graphs get random inputs with symbolic dims = 2.
The fused decode part (GroupQueryAttention, K/V in place) is compared with the step graph's
reference run on the same decode state (its new K/V placed at each row's past length).

An output passes when ``max|got - ref| / max|ref| <= tolerance`` (new K/V and the decode
part's K/V buffers compared on the valid positions only); logits also report top-1 agreement. Default tolerances by the
engine's dtype: fp32 1e-3, fp16 2e-2, quantized 1e-1; override per output name.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ember.engine_format.manifest import EnginePart, Manifest, read_manifest, verify_files
from ember.engine_format.roles import KV_CAPACITY, LOGITS, NEW_KEY, NEW_VALUE, PAST_KEY, PAST_VALUE
from ember.engine_format.tensorrt_part import is_plan
from ember.errors import ArtifactError

DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "quantized": 1e-1}
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class OutputCheck:
    part: str
    backend: str
    case: str
    output: str
    rel_error: float
    tolerance: float
    top1_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_error)) and self.rel_error <= self.tolerance


def step_cases(part: EnginePart, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Feeds for a decode and a prefill call of a step graph (or generic random feeds)."""
    rng = np.random.default_rng(seed)
    names = {t.name for t in part.inputs}
    if not {"input_ids", "positions", "past_lengths", "new_lengths"} <= names:
        return {"random": _generic_feeds(part, rng)}
    vocab = next((int(t.shape[1]) for t in part.outputs if t.name == "logits" and isinstance(t.shape[1], int)), 32)
    cases = {}
    for case, (b, t, p, past, new) in {"decode": (4, 1, 32, [0, 5, 32 - 1, 17], [1, 1, 1, 1]),
                                       "prefill": (2, 8, 32, [0, 11], [8, 5])}.items():
        dims = {"batch": b, "tokens": t, "past": p}
        feeds: dict[str, np.ndarray] = {}
        pl, nl = np.array(past, np.int64), np.array(new, np.int64)
        feeds["input_ids"] = rng.integers(0, vocab, (b, t)).astype(np.int64)
        feeds["positions"] = (pl[:, None] + np.arange(t)[None, :]).astype(np.int64)
        feeds["past_lengths"], feeds["new_lengths"] = pl, nl
        if "rope_long" in names:  # LongRoPE: rows with either factor set
            feeds["rope_long"] = np.arange(b, dtype=np.int64) % 2
        for spec in part.inputs:
            if spec.name not in feeds:
                shape = [dims.get(d, 2) if isinstance(d, str) else d for d in spec.shape]
                feeds[spec.name] = rng.standard_normal(shape).astype(_NP[spec.dtype])
        cases[case] = feeds
    return cases


def is_decode_part(part: EnginePart) -> bool:
    """The fused decode part (``export/gqa_decode.py``): K/V buffers updated in place."""
    return part.find_tensor(KV_CAPACITY) is not None


def decode_cases(part: EnginePart, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Feeds for the fused decode part: 4 rows at mixed past lengths (one at the buffer's end)."""
    rng = np.random.default_rng(seed)
    vocab = next((int(t.shape[1]) for t in part.outputs if t.name == "logits" and isinstance(t.shape[1], int)), 32)
    b, cap, past = 4, 32, np.array([0, 5, 32 - 1, 17], np.int32)
    feeds = {"input_ids": rng.integers(0, vocab, (b, 1)).astype(np.int64), "seqlens_k": past,
             "total_sequence_length": np.array(cap, np.int32)}
    for spec in part.inputs:
        if spec.name not in feeds:
            shape = [{"batch": b, "capacity": cap}.get(d, 2) if isinstance(d, str) else d for d in spec.shape]
            feeds[spec.name] = rng.standard_normal(shape).astype(_NP[spec.dtype])
    return {"decode": feeds}


def _step_as_decode(step_run: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """A step-graph runner seen through the fused decode part's contract: the new token at
    each row's past length, its K/V written into a copy of the past buffers."""

    def run(feeds: dict) -> dict:
        past = feeds["seqlens_k"].astype(np.int64)
        b = len(past)
        step = {"input_ids": feeds["input_ids"], "positions": past[:, None].copy(), "past_lengths": past,
                "new_lengths": np.ones(b, np.int64)}
        step.update({k: v for k, v in feeds.items() if k.startswith("past_")})
        out = step_run(step)
        res = {"logits": out["logits"]}
        for name, buf in feeds.items():
            if name.startswith("past_"):
                present = buf.astype(np.float32)
                present[np.arange(b), :, past, :] = out["new_" + name[len("past_"):]][:, :, 0, :]
                res["present_" + name[len("past_"):]] = present
        return res
    return run


def _generic_feeds(part: EnginePart, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in part.inputs:
        shape = [2 if isinstance(d, str) else d for d in spec.shape]
        dt = _NP.get(spec.dtype, np.float32)
        feeds[spec.name] = (rng.integers(0, 2, shape) if np.issubdtype(dt, np.integer) else rng.standard_normal(shape)).astype(dt)
    return feeds


def _cpu_runner(onnx_path: Path) -> Callable[[dict], dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: dict) -> dict:
        fixed = {k: (v.astype(np.float16) if types[k] == "tensor(float16)" else
                     v.astype(np.float32) if types[k] == "tensor(float)" else v) for k, v in feeds.items()}
        return dict(zip(names, sess.run(names, fixed)))
    return run


def _device_runner(session, part: EnginePart) -> Callable[[dict], dict]:
    """Run a device step session (ORT CUDA / TensorRT) on host feeds; outputs back on the host."""
    import torch

    kv_names = [t.name for t in part.kv_tensors(PAST_KEY, PAST_VALUE)]
    out_names = [part.tensor(LOGITS, output=True).name] + [t.name for t in part.kv_tensors(NEW_KEY, NEW_VALUE, output=True)]

    def run(feeds: dict) -> dict:
        kv = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(session.device) for n in kv_names]
        logits, new = session.run(feeds["input_ids"], feeds["positions"], feeds["past_lengths"], feeds["new_lengths"], kv,
                                  rope_long=feeds.get("rope_long"))
        torch.cuda.synchronize(session.device)
        return dict(zip(out_names, [logits.float().cpu().numpy()] + [x.float().cpu().numpy() for x in new]))
    return run


def _device_decode_runner(session, part: EnginePart) -> Callable[[dict], dict]:
    """Run a device fused decode session on host feeds; its in-place K/V buffers come back as presents."""
    import torch

    kv_names = [t.name for t in part.inputs if t.name.startswith("past_")]

    def run(feeds: dict) -> dict:
        kv = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(session.device) for n in kv_names]
        logits = session.run(feeds["input_ids"], feeds["seqlens_k"], kv)
        torch.cuda.synchronize(session.device)
        out = {"logits": logits.float().cpu().numpy()}
        out.update({"present_" + n[len("past_"):]: x.float().cpu().numpy() for n, x in zip(kv_names, kv)})
        return out
    return run


def candidate_runners(folder: Path, part: EnginePart, reference: Path) -> dict[str, Callable[[dict], dict]]:
    """Every backend present on this machine that can run ``part``."""
    runners: dict[str, Callable[[dict], dict]] = {}
    layers = sum(1 for t in part.inputs if t.name.startswith("past_key."))
    if is_plan(part):
        return _plan_runners(folder, part, layers)
    onnx_path = folder / part.file
    if onnx_path.resolve() != reference.resolve():
        runners["onnxruntime-cpu"] = _cpu_runner(onnx_path)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and layers:
        try:
            import torch

            if torch.cuda.is_available():
                from ember.runtime.cuda_session import CudaDecodeSession, CudaStepSession

                if is_decode_part(part):
                    runners["onnxruntime-cuda"] = _device_decode_runner(CudaDecodeSession(onnx_path, layers), part)
                else:
                    runners["onnxruntime-cuda"] = _device_runner(CudaStepSession(onnx_path, layers), part)
        except ImportError:
            pass
    return runners


def _plan_runners(folder: Path, part: EnginePart, layers: int) -> dict[str, Callable[[dict], dict]]:
    """A TensorRT plan where ``tensorrt`` is importable; a TensorRT-RTX plan where a GPU is
    visible. The session's own checks run first: a GPU the plan was not built for, another
    library release or a missing library is an error naming the fix, never a crash."""
    if part.backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return {}
    else:
        from ember.runtime.gpu_target import find_gpu

        if find_gpu(0) is None:
            return {}
    from ember.runtime.trt_session import TensorRTStepSession

    return {part.backend: _device_runner(TensorRTStepSession(folder / part.file, part, layers), part)}


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if ref.size == 0:
        return 0.0
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def _engine_dtype(manifest: Manifest, part: EnginePart) -> str:
    if manifest.quantization:
        return "quantized"
    return str(part.extra.get("dtype") or manifest.extra.get("dtype") or "fp32")


def check_folder(folder: str | os.PathLike, reference: str | os.PathLike | None = None,
                 tolerances: dict[str, float] | None = None, seed: int = 0) -> list[OutputCheck]:
    """Compare every part of ``folder`` on every backend present; returns one row per output."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    rows: list[OutputCheck] = []
    for part in manifest.parts:
        decode = is_decode_part(part)
        # the fused decode part is checked against the step graph's reference, through its contract
        ref_path = _reference_path(folder, manifest.part("step") if decode else part, reference)
        ref_run = _step_as_decode(_cpu_runner(ref_path)) if decode else _cpu_runner(ref_path)
        tol_default = DEFAULT_TOLERANCE.get(_engine_dtype(manifest, part), 1e-3)
        cases = decode_cases(part, seed) if decode else step_cases(part, seed)
        for backend, run in candidate_runners(folder, part, ref_path).items():
            for case, feeds in cases.items():
                ref, got = ref_run(feeds), run(feeds)
                for spec in part.outputs:
                    r, g = ref[spec.name], got[spec.name]
                    if spec.name.startswith("new_") and "new_lengths" in feeds:
                        n = int(feeds["new_lengths"].min())
                        r, g = r[..., :n, :], g[..., :n, :]
                    if spec.name.startswith("present_"):  # the live positions: the past and the new token
                        live = np.arange(r.shape[2])[None, :] <= feeds["seqlens_k"][:, None]  # [B, S]
                        r, g = r.transpose(0, 2, 1, 3)[live], g.transpose(0, 2, 1, 3)[live]
                    top1 = float((g.argmax(-1) == r.argmax(-1)).mean()) if spec.name == "logits" else None
                    tol = (tolerances or {}).get(spec.name, tol_default)
                    rows.append(OutputCheck(part.name, backend, case, spec.name, _rel(g, r), tol, top1))
    return rows


def _reference_path(folder: Path, part: EnginePart, reference: str | os.PathLike | None) -> Path:
    """``reference`` when given, else the part's ONNX (a TensorRT plan's source graph)."""
    if reference is not None:
        ref_path = Path(reference)
    elif is_plan(part):
        src = part.extra.get("source_onnx")
        if not src:
            raise ArtifactError(f"part {part.name!r} records no source ONNX; pass --reference FILE.onnx")
        ref_path = folder / src["file"]
    else:
        ref_path = folder / part.file
    if not ref_path.exists():
        raise ArtifactError(f"reference graph {ref_path} is missing; pass --reference FILE.onnx")
    return ref_path


def format_report(rows: list[OutputCheck]) -> str:
    if not rows:
        return "nothing compared: no backend to check here (needs onnxruntime-gpu + a GPU, TensorRT, or --reference)"
    lines = ["| part | backend | case | output | rel. error | tolerance | top-1 | ok |", "|---|---|---|---|---|---|---|---|"]
    worst: dict[tuple, OutputCheck] = {}
    for r in rows:  # per (part, backend, case): logits and the worst K/V output
        key = (r.part, r.backend, r.case, r.output if r.output == "logits" else "kv")
        if key not in worst or r.rel_error > worst[key].rel_error:
            worst[key] = r
    for r in worst.values():
        name = r.output if r.output == "logits" else f"{r.output} (worst K/V)"
        top1 = "" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        lines.append(f"| {r.part} | {r.backend} | {r.case} | {name} | {r.rel_error:.2e} | {r.tolerance:g} | {top1} | "
                     f"{'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def rows_to_json(rows: list[OutputCheck]) -> list[dict[str, Any]]:
    return [{**asdict(r), "ok": r.ok} for r in rows]
