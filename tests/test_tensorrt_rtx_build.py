"""TensorRT-RTX plans built on a CPU machine (--backend tensorrt-rtx): manifest parts, the
targets read back from the plan header, the support table of docs/gpu.md, and the errors.

The library builds without a GPU, so this file runs in the CPU tier (CI installs the
``tensorrt-rtx`` extra). Tests that need the library skip, saying so, where it is missing;
the option and error tests run everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto, helper

from ember.compiler.backends.tensorrt import TensorRTOptions, build_plan_part, check_plan_options
from ember.compiler.backends.tensorrt_rtx import DEFAULT_TARGETS, FP8_TARGETS, parse_targets, plan_header
from ember.engine_format import manifest as mf
from ember.engine_format.io_specs import io_specs
from ember.engine_format.tensorrt_part import RTX_TARGETS as TARGETS
from ember.errors import ConfigError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed (pip install 'ember[tensorrt-rtx]'); "
                                                   "CI installs it")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
SMALL = {"max_batch": 4, "prefill_tokens": 32}  # small profiles keep the builds short
PRECISIONS = {"fp32": {}, "fp16": {"dtype": "fp16"}, "int8": {"quantize": "int8"}, "fp8": {"quantize": "fp8"},
              "int8-weights": {"quantize": "int8-weights"}}
MODELS = ("gpt2-tiny", "llama-tiny")


# ---------------------------------------------------------------- options and errors (no library needed)

def test_targets_accept_every_spelling_and_sort():
    assert parse_targets("sm80, SM_120,8.6,121,sm86") == ("8.0", "8.6", "12.0", "12.1")
    assert parse_targets(["75"]) == ("7.5",)
    assert TensorRTOptions(targets=["sm89", "sm120"]).targets == ("8.9", "12.0")
    assert set(DEFAULT_TARGETS) | {"7.5"} == set(TARGETS) and set(FP8_TARGETS) < set(DEFAULT_TARGETS)


@pytest.mark.parametrize("bad", ["sm90", "9.0", "foo", "sm100", ""])
def test_bad_target_names_valid_ones_and_the_hopper_way_out(bad):
    with pytest.raises(ConfigError) as e:
        parse_targets(bad)
    msg = str(e.value)
    assert "\n" not in msg
    if bad:
        assert repr(bad) in msg and "valid targets: sm75" in msg and "sm121 (GB10" in msg
        assert "no Hopper (sm90) target" in msg and "backend='onnxruntime'" in msg
    else:
        assert "--trt-targets is empty" in msg


def test_bad_target_fails_before_the_export(tmp_path, capsys):
    from ember.cli import main
    from ember.compiler.compile import CompileOptions

    with pytest.raises(ConfigError, match="'sm90' is Hopper"):
        CompileOptions(backend="tensorrt-rtx", extra={"targets": ["sm90"]})
    out = tmp_path / "plan"
    assert main(["compile", "gpt2-tiny", "--backend", "tensorrt-rtx", "--trt-targets", "sm80,foo", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'foo' is not a TensorRT-RTX target" in err and "sm89 (RTX 40" in err
    assert not out.exists()


def test_options_belong_to_one_library():
    with pytest.raises(ConfigError, match="timing_cache does not apply to --backend tensorrt-rtx.*no-op"):
        check_plan_options("tensorrt-rtx", {"timing_cache": "/tmp/x"})
    with pytest.raises(ConfigError, match="version_compatible does not apply to --backend tensorrt-rtx"):
        check_plan_options("tensorrt-rtx", {"version_compatible": True})
    with pytest.raises(ConfigError, match="targets does not apply to --backend tensorrt:.*tensorrt-rtx"):
        check_plan_options("tensorrt", {"targets": ["sm86"]})
    with pytest.raises(ConfigError, match="need --backend tensorrt or --backend tensorrt-rtx"):
        check_plan_options("onnxruntime", {"max_batch": 4})
    check_plan_options("tensorrt-rtx", {"targets": "sm86", "max_batch": 4, "builder_optimization_level": 2})
    rec = TensorRTOptions(targets=["sm86"]).record("tensorrt-rtx")
    assert rec["targets"] == ["8.6"] and "timing_cache" not in rec and "version_compatible" not in rec


def test_cli_trt_flags_need_a_tensorrt_backend(tmp_path, capsys):
    from ember.cli import main

    assert main(["compile", "gpt2-tiny", "--trt-targets", "sm86", "--trt-max-batch", "4", "-o", str(tmp_path / "o")]) == 2
    assert "TensorRT options (--trt-max-batch, --trt-targets) need --backend tensorrt or --backend tensorrt-rtx" \
        in capsys.readouterr().err


def test_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # import fails as if not installed
    path = _tiny_graph(tmp_path, "Relu")
    with pytest.raises(ConfigError, match=r"TensorRT-RTX is not installed: pip install 'ember\[tensorrt-rtx\]'"):
        build_plan_part(tmp_path, "tiny", path, *io_specs(onnx.load(str(path))), _rtx(extra=_batch_profile()))


def test_plan_header_refuses_what_is_not_a_plan():
    assert plan_header(b"") is None
    assert plan_header(b"\0" * 64) is None
    fake = bytearray(64)
    fake[0:4] = fake[28:32] = b"vtrt"
    fake[24:28] = bytes([1, 7, 1, 116])
    fake[32] = 0b000110  # 8.0 and 8.6
    assert plan_header(bytes(fake)) == {"version": "1.7.1.116", "targets": ["8.0", "8.6"]}
    fake[33] = 1  # a bit no target has
    assert plan_header(bytes(fake)) is None


# ---------------------------------------------------------------- plans built with the library

def _rtx(dtype="fp32", quantize=None, extra=None):
    return SimpleNamespace(backend="tensorrt-rtx", dtype=dtype, quantize=quantize, extra=dict(extra or {}))


def _batch_profile(**extra):
    return {"profiles": [{"name": "batch", "dims": {"batch": [1, 2, 4]}}], **extra}


def _tiny_graph(folder: Path, op: str, domain: str = "") -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu0"), helper.make_node(op, ["h"], ["y"], name="last", domain=domain)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = folder / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _compile(root: Path, model: str, precision: str, **extra) -> Path:
    from ember.compiler.compile import CompileOptions, compile_decoder

    out = root / f"{model}-{precision}"
    compile_decoder(model, out, CompileOptions(backend="tensorrt-rtx", validate=False, quiet=True,
                                               extra={**SMALL, **extra}, **PRECISIONS[precision]))
    return out


@pytest.fixture(scope="module")
def decoder_plans(tmp_path_factory):
    """(model, precision) -> folder built with the default targets, or the ConfigError; built once."""
    pytest.importorskip("torch")
    root, built = tmp_path_factory.mktemp("rtx"), {}

    def get(model: str, precision: str):
        if (model, precision) not in built:
            try:
                built[model, precision] = _compile(root, model, precision)
            except ConfigError as e:
                built[model, precision] = e
        return built[model, precision]

    return get


def _check_plan_folder(folder: Path, library_version: str) -> mf.Manifest:
    """What every plan folder must satisfy: the part records, the header, the exact file set."""
    m = mf.read_manifest(folder)
    mf.verify_files(folder, m)
    for p in m.parts:
        assert p.backend == "tensorrt-rtx" and p.file == f"{p.name}.plan"
        e = p.extra
        assert e["library"] == "tensorrt-rtx" and e["tensorrt_rtx"] == library_version
        data = (folder / p.file).read_bytes()
        assert e["engine_bytes"] == p.size == len(data) == (folder / p.file).stat().st_size
        assert plan_header(data) == {"version": library_version, "targets": e["targets"]}
        src = folder / e["source_onnx"]["file"]
        assert e["source_onnx"] == {"file": f"{p.name}.onnx", "sha256": mf.sha256_file(src), "size": src.stat().st_size}
        assert io_specs(onnx.load(str(src), load_external_data=False)) == (p.inputs, p.outputs)
        assert p.external_data == ([mf.file_record(folder, src.name + ".data")] if Path(f"{src}.data").exists() else [])
    named = {mem.file for mem in mf.manifest_members(m)} | {mf.MANIFEST_NAME}
    assert {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()} == named
    return m


@needs_rtx
@pytest.mark.parametrize("model,precision", [("gpt2-tiny", "fp16"), ("llama-tiny", "fp16"), ("llama-tiny", "int8")])
def test_decoder_plan_and_its_manifest(decoder_plans, model, precision):
    import tensorrt_rtx_bindings as trt

    folder = decoder_plans(model, precision)
    assert not isinstance(folder, Exception), folder
    m = _check_plan_folder(folder, trt.__version__)
    (step,) = m.parts
    e = step.extra
    assert e["targets"] == ["8.0", "8.6", "8.9", "12.0", "12.1"] and e["options"]["targets"] is None  # the default
    assert (e["dtype"], e["quantize"]) == (PRECISIONS[precision].get("dtype", "fp32"), PRECISIONS[precision].get("quantize"))
    cap = m.model["config"]["max_positions"]
    assert e["profiles"] == [
        {"name": "decode", "dims": {"batch": [1, 2, 4], "tokens": [1, 1, 1], "past": [1, min(cap, 512), cap]}},
        {"name": "prefill", "dims": {"batch": [1, 1, 4], "tokens": [2, 8, 32], "past": [1, min(cap, 512), cap]}},
    ]
    graph = onnx.load(str(folder / "step.onnx"), load_external_data=False)
    kinds = {n.op_type for n in graph.graph.node}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= kinds and e["ort_disabled_optimizers"]
        assert m.quantization["scheme"] == "int8"
    else:
        assert "QuantizeLinear" not in kinds and "ort_disabled_optimizers" not in e
    assert any(t.data_type == TensorProto.FLOAT16 for t in graph.graph.initializer) == (precision == "fp16")
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    assert runtime.engine_header_size == 64  # what plan_header reads; deserializing needs a GPU


@needs_rtx
def test_cli_builds_for_the_targets_given(tmp_path, capsys):
    pytest.importorskip("torch")
    from ember.cli import main

    out = tmp_path / "gpt2-rtx"
    assert main(["compile", "gpt2-tiny", "--backend", "tensorrt-rtx", "--dtype", "fp16", "--trt-targets", "sm120,sm86",
                 "--trt-max-batch", "2", "--builder-optimization-level", "1", "--no-validate", "--quiet",
                 "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    e = m["parts"][0]["extra"]
    assert e["targets"] == ["8.6", "12.0"] and e["options"]["targets"] == ["8.6", "12.0"]
    assert e["options"]["builder_optimization_level"] == 1 and e["profiles"][0]["dims"]["batch"] == [1, 1, 2]
    assert plan_header((out / "step.plan").read_bytes())["targets"] == ["8.6", "12.0"]
    assert main(["inspect", str(out)]) == 0  # says where the plan runs
    assert "runs on sm86, sm120 (elsewhere: --backend onnxruntime)" in capsys.readouterr().out


def _support_table() -> dict[tuple[str, str], dict[str, str]]:
    """docs/gpu.md's TensorRT-RTX table: (model, precision) -> {target: "yes" | "no: why"}."""
    text = DOCS.read_text()
    header = "| model | precision | " + " | ".join(TARGETS) + " |"
    assert header in text, f"docs/gpu.md lost the support table header {header!r}"
    rows = {}
    for line in text[text.index(header):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        model, precision, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[model, precision] = dict(zip(TARGETS, cells))
    return rows


def test_support_table_covers_every_model_and_precision():
    table = _support_table()
    assert set(table) == {(m, p) for m in MODELS for p in PRECISIONS}
    assert all(c == "yes" or c.startswith("no: ") for row in table.values() for c in row.values())


FAILURE_WORDS = {"no: FP8 needs 8.9+": "FP8 needs compute capability 8.9 or newer",
                 "no: no FP32 GEMM on Turing": "Turing (sm75) has no FP32 GEMM"}


@needs_rtx
@pytest.mark.parametrize("model,precision", [(m, p) for m in MODELS for p in PRECISIONS])
def test_support_table_is_what_builds(decoder_plans, tmp_path, model, precision):
    """Every cell of the row: the "yes" targets build together (the header names them all), and
    each "no" target alone fails with the error the cell gives as its reason."""
    row = _support_table()[model, precision]
    yes = tuple(cc for cc, cell in row.items() if cell == "yes")
    folder = decoder_plans(model, precision)
    assert not isinstance(folder, Exception), f"the default targets failed: {folder}"
    built = json.loads((folder / "manifest.json").read_text())["parts"][0]["extra"]["targets"]
    assert set(built) <= set(yes), f"{model} {precision} built for {built}, but the table says yes only for {yes}"
    step = folder / "step.onnx"
    inputs, outputs = io_specs(onnx.load(str(step), load_external_data=False))
    opts = PRECISIONS[precision]
    max_past = json.loads((folder / "manifest.json").read_text())["model"]["config"]["max_positions"]

    def build(targets):
        work = tmp_path / "_".join(targets)
        work.mkdir()
        shutil.copy(step, work / "step.onnx")
        return build_plan_part(work, "step", work / "step.onnx", inputs, outputs,
                               _rtx(opts.get("dtype", "fp32"), opts.get("quantize"), {**SMALL, "targets": list(targets)}),
                               max_past=max_past)

    if tuple(built) != yes:
        part = build(yes)
        assert plan_header((tmp_path / "_".join(yes) / "step.plan").read_bytes())["targets"] == list(yes)
        assert part.extra["targets"] == list(yes)
    for cc, cell in row.items():
        if cell != "yes":
            with pytest.raises(ConfigError) as e:
                build((cc,))
            assert FAILURE_WORDS[cell] in str(e.value), (cc, str(e.value))
            assert str(e.value).startswith("TensorRT-RTX could not build step.onnx")


@needs_rtx
def test_parser_error_names_graph_node_op_and_fix(tmp_path):
    path = _tiny_graph(tmp_path, "NoSuchOp", domain="ember.test")
    with pytest.raises(ConfigError) as e:
        build_plan_part(tmp_path, "tiny", path, *io_specs(onnx.load(str(path))), _rtx(extra=_batch_profile()))
    msg = str(e.value)
    assert re.match(r"TensorRT-RTX could not parse tiny\.onnx at node 'last' \(NoSuchOp\): .*; "
                    r"compile with --backend onnxruntime, or with another precision than --dtype fp32", msg), msg
    assert "\n" not in msg and not (tmp_path / "tiny.plan").exists()


@needs_rtx
def test_sd_tiny_parts_build_plans(tmp_path):
    pytest.importorskip("diffusers")
    import tensorrt_rtx_bindings as trt

    from ember.compiler.diffusion import PART_NAMES, DiffusionCompileOptions, compile_diffusion

    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    out = tmp_path / "sd-rtx"
    compile_diffusion("sd-tiny", out, DiffusionCompileOptions(
        steps=2, validate=False, quiet=True, backend="tensorrt-rtx",
        backend_extra={"targets": ["sm86"], "max_batch": 4}), open_pipeline=DiffusionPipeline)
    m = _check_plan_folder(out, trt.__version__)
    assert [p.name for p in m.parts] == list(PART_NAMES)
    for p in m.parts:
        assert p.extra["targets"] == ["8.6"] and p.extra["dtype"] == "fp32" and p.extra["quantize"] is None
        assert p.extra["profiles"] == [{"name": "batch", "dims": {"batch": [1, 2, 4]}}]
        assert p.extra["options"]["max_batch"] == 4
    assert m.build["options"]["backend"] == "tensorrt-rtx"
