"""`ember compile` never loses data (issue 16): where -o may write, killed compiles and their temp
folders, permissions, an engine folder's exact file set, and missing optional extras."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
import torch

import ember
from ember.cli import main
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.errors import EmberError
from ember.export.config import BUILTIN

FAST = ["--no-validate", "--quiet"]


def compile_cli(source, out, *flags: str) -> int:
    return main(["compile", str(source), "-o", str(out), *FAST, *flags])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def named_files(folder: Path) -> set[str]:
    """Every "file" string of the folder's manifest.json, wherever nested, plus manifest.json."""
    out = {"manifest.json"}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                out.add(node["file"])
            node = list(node.values())
        if isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads((folder / "manifest.json").read_text()))
    return out


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    from hf_models import save_hf_model

    folder = tmp_path_factory.mktemp("hf") / "hf-tiny"
    save_hf_model(BUILTIN["gpt2-tiny"], folder)
    return folder


@pytest.fixture
def project(hf_source, tmp_path):
    """tmp/project/hf-tiny: a copy of the source model inside a project folder."""
    src = tmp_path / "project" / "hf-tiny"
    shutil.copytree(hf_source, src)
    return src


# -- where -o may write ------------------------------------------------------------------------

def test_current_directory_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for flags in ([], ["--overwrite"]):
        assert compile_cli("gpt2-tiny", ".", *flags) == 2
        assert "current directory" in capsys.readouterr().err
    inner = tmp_path / "sub"
    inner.mkdir()
    monkeypatch.chdir(inner)
    assert compile_cli("gpt2-tiny", "..", "--overwrite") == 2
    assert "contains the current directory" in capsys.readouterr().err
    assert listing(tmp_path) == ["notes.txt", "sub"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_source_folder_and_its_parents_refused(project, capsys):
    before = files_in(project.parent)
    for out in (project, project / ".." / "hf-tiny", project.parent, project / ".."):
        assert compile_cli(project, out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert "source model's folder" in err and err.count("\n") == 1
    assert files_in(project.parent) == before and (project / "config.json").exists()


def test_non_engine_folder_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2,3")
    (out / "manifest.json").write_text('{"name": "not an engine"}')
    for flags in ([], ["--overwrite"]):
        assert compile_cli("gpt2-tiny", out, *flags) == 2
        err = capsys.readouterr().err
        assert "is not empty and is not an Ember engine folder" in err and err.count("\n") == 1
    assert listing(out) == ["data.csv", "manifest.json"] and (out / "data.csv").read_text() == "1,2,3"
    assert listing(tmp_path) == ["mine"]  # no temp folder left beside it


def test_file_target_refused(tmp_path, capsys):
    (tmp_path / "engine").write_text("a file")
    assert compile_cli("gpt2-tiny", tmp_path / "engine", "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "engine").read_text() == "a file"


def test_engine_folder_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()  # an empty folder is fine
    assert compile_cli("gpt2-tiny", out, "--seed", "1") == 0
    first = (out / "manifest.json").read_text()
    assert compile_cli("gpt2-tiny", out, "--seed", "2") == 2
    assert "already holds an Ember engine; pass --overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == first
    before = signal.getsignal(signal.SIGTERM)
    assert compile_cli("gpt2-tiny", out, "--seed", "2", "--overwrite") == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the compile's SIGTERM handler is restored
    assert json.loads((out / "manifest.json").read_text())["model"]["seed"] == 2
    assert listing(tmp_path) == ["engine"]


def test_api_defaults_refuse_and_fail_before_loading(tmp_path, gpt2_tiny, monkeypatch):
    from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline
    import ember.export.sources as sources

    assert CompileOptions().overwrite is False and DiffusionCompileOptions().overwrite is False
    out = tmp_path / "engine"
    shutil.copytree(gpt2_tiny, out)

    def must_not_load(*a, **k):
        raise AssertionError("the model source was loaded before the -o check")

    monkeypatch.setattr(sources, "resolve_decoder_source", must_not_load)
    for opts in (CompileOptions(quiet=True), CompileOptions(tp=2, quiet=True)):
        with pytest.raises(EmberError, match="already holds an Ember engine"):
            compile_decoder("gpt2-tiny", out, opts)
    with pytest.raises(EmberError, match="already holds an Ember engine"):
        compile_diffusion("sd-tiny", out, DiffusionCompileOptions(quiet=True), open_pipeline=DiffusionPipeline)


# -- killed compiles -----------------------------------------------------------------------------

SLOW_COMPILE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ember.export.onnx_export as ox
    from ember.cli import main

    real = ox.export_step_graph_file

    def export_then_wait(*a, **k):
        proto = real(*a, **k)
        Path(sys.argv[1]).write_text("exported")
        time.sleep(120)
        return proto

    ox.export_step_graph_file = export_then_wait
    sys.exit(main(["compile", "gpt2-tiny", "-o", sys.argv[2], "--no-validate", "--quiet"]))
""")


def test_sigterm_mid_compile_removes_temp_folder(tmp_path):
    flag, root = tmp_path / "exported", tmp_path / "out"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPILE, str(flag), str(root / "engine")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), proc.communicate()[1]
        assert [p.name for p in root.iterdir()][0].startswith(".engine.tmp-")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "ember: terminated (SIGTERM)" and "Traceback" not in err
    assert listing(root) == []


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()
    p.wait()


def test_stale_temp_folders_of_dead_compiles_removed(tmp_path, live_pid):
    dead = dead_pid()
    for name in (f".engine.tmp-{dead}-0a1b2c3d", f".engine.old-{dead}", f".engine.tmp-{live_pid}-0a1b2c3d",
                 f".other.tmp-{dead}-0a1b2c3d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "engine").mkdir()  # the target exists: the dead compile's .old folder is superseded
    assert compile_cli("gpt2-tiny", tmp_path / "engine") == 0
    assert listing(tmp_path) == [f".engine.tmp-{live_pid}-0a1b2c3d", f".other.tmp-{dead}-0a1b2c3d", "engine"]


def test_engine_of_a_compile_killed_mid_swap_is_restored(tmp_path, gpt2_tiny, capsys):
    old = tmp_path / f".engine.old-{dead_pid()}"  # killed between the two renames: the target is missing
    shutil.copytree(gpt2_tiny, old)
    assert compile_cli("gpt2-tiny", tmp_path / "engine", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "restored" in err and "already holds an Ember engine" in err
    assert listing(tmp_path) == ["engine"]
    assert (tmp_path / "engine" / "manifest.json").read_text() == (gpt2_tiny / "manifest.json").read_text()


# -- permissions ---------------------------------------------------------------------------------

def test_engine_folder_follows_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        compile_decoder("gpt2-tiny", tmp_path / "engine",
                        CompileOptions(quantize="int8", validate=False, quiet=True))  # writes a scales table
    finally:
        os.umask(previous)
    out = tmp_path / "engine"
    assert (out / "tables" / "quant_scales.safetensors").exists()  # safetensors writes its files 0600
    assert out.stat().st_mode & 0o777 == 0o750
    for p in out.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


# -- an engine folder holds exactly the files its manifest names ----------------------------------

@pytest.fixture
def past_2gb(monkeypatch):
    """Lower save_onnx's external-data threshold, and make torch's exporter behave as it does past
    2 GB: one external file per tensor (``onnx__MatMul_3349``, ``embed_tokens.weight``...) beside the graph."""
    import ember.export.onnx_export as ox

    real = torch.onnx.export

    def export_like_past_2gb(model, args, f, *a, **k):
        out = real(model, args, f, *a, **k)
        proto = onnx.load(str(f))
        onnx.save_model(proto, str(f), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
        assert len(list(Path(f).parent.iterdir())) >= 2  # the per-tensor files are there
        return out

    monkeypatch.setattr(torch.onnx, "export", export_like_past_2gb)
    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 1024)


def test_decoder_folder_holds_exactly_its_files(tmp_path, past_2gb):
    out = tmp_path / "engine"
    compile_decoder("gpt2-tiny", out, CompileOptions(validate=False, fused_decode="on", quiet=True))
    assert files_in(out) == named_files(out)
    assert {"step.onnx", "step.onnx.data", "decode.onnx", "decode.onnx.data"} <= files_in(out)
    assert listing(tmp_path) == ["engine"]
    with ember.load(out) as eng:
        assert len(eng.generate(["hi"], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3


def test_tp_folder_holds_exactly_its_files(tmp_path, past_2gb):
    out = tmp_path / "engine"
    compile_decoder("gpt2-tiny", out, CompileOptions(tp=2, validate=False, quiet=True))
    assert files_in(out) == named_files(out)
    assert any(f.startswith("rank1/") and f.endswith(".onnx.data") for f in files_in(out))


def test_diffusion_folder_holds_exactly_its_files(tmp_path, past_2gb):
    from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    out = tmp_path / "engine"
    compile_diffusion("sd-tiny", out, DiffusionCompileOptions(steps=2, validate=False, quiet=True), open_pipeline=DiffusionPipeline)
    assert files_in(out) == named_files(out)
    assert "unet_full.onnx.data" in files_in(out)


def test_stray_file_fails_the_compile(tmp_path, monkeypatch):
    import ember.compiler.compile as cc

    real = cc.write_manifest

    def write_manifest_and_a_stray(folder, m):
        real(folder, m)
        (folder / "onnx__MatMul_3349").write_bytes(b"\0" * 16)

    monkeypatch.setattr(cc, "write_manifest", write_manifest_and_a_stray)
    with pytest.raises(EmberError, match="internal: .*not in the manifest: onnx__MatMul_3349"):
        compile_decoder("gpt2-tiny", tmp_path / "engine", CompileOptions(validate=False, quiet=True))
    assert listing(tmp_path) == []


# -- missing optional extras ---------------------------------------------------------------------

def hide_modules(monkeypatch, *names: str) -> None:
    """Make ``names`` unimportable and forget Ember's modules that import them (restored after)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m.startswith("ember.server")]:
        monkeypatch.delitem(sys.modules, name)


def test_serve_without_its_extra_stays_listed(monkeypatch, capsys, gpt2_tiny):
    hide_modules(monkeypatch, "fastapi", "starlette", "uvicorn")
    from ember.cli import build_parser

    assert "serve" in build_parser().format_help()
    assert main(["serve", str(gpt2_tiny), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the 'serve' extra" in err and "pip install 'ember[serve]'" in err


def test_compile_without_torch_names_the_export_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["compile", "gpt2-tiny", "-o", str(tmp_path / "e"), "--quiet"]) == 2
    assert "pip install 'ember[export]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(["compile", "sd-tiny", "-o", str(tmp_path / "d"), "--quiet"]) == 2
    assert "pip install 'ember[diffusion]'" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_extension_whose_dependency_is_missing_stays_listed(monkeypatch, tmp_path, capsys):
    (tmp_path / "ember_fake_feature.py").write_text("import ember_fake_dependency\n\ndef add_parser(sub):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("ember.cli.EXTENSIONS", {"ember_fake_feature": (("fake-feature",), "bench")})
    from ember.cli import build_parser

    assert "fake-feature" in build_parser().format_help()
    assert main(["fake-feature", "--flag", "x"]) == 2
    err = capsys.readouterr().err
    assert err == ("ember: error: `ember fake-feature` needs the 'bench' extra (ember_fake_dependency is not "
                   "installed): pip install 'ember[bench]'\n")
