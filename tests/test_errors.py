"""Bad inputs give one clear error naming the input and the fix; no half-written folders."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.errors import ArtifactError, ConfigError, InputError


@pytest.fixture
def engine_copy(gpt2_tiny, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(gpt2_tiny, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist.*ember compile"):
        ember.load(tmp_path / "nope")


def test_not_an_engine_folder(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        ember.load(tmp_path)


def test_corrupt_engine_file(engine_copy):
    p = engine_copy / "step.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step.onnx does not match its sha256"):
        ember.load(engine_copy)


def test_truncated_engine_file(engine_copy):
    p = engine_copy / "step.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="step.onnx is 1000 bytes but the manifest says"):
        ember.load(engine_copy, verify="size")


def test_missing_engine_file(engine_copy):
    (engine_copy / "step.onnx").unlink()
    with pytest.raises(ArtifactError, match="step.onnx is missing"):
        ember.load(engine_copy)


def test_newer_schema(engine_copy):
    p = engine_copy / "manifest.json"
    m = json.loads(p.read_text())
    m["schema_version"] = 99
    p.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer Ember.*schema 99.*upgrade"):
        ember.load(engine_copy)


def test_corrupt_manifest(engine_copy):
    (engine_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        ember.load(engine_copy)


def test_prompt_too_long_and_bad_params(gpt2_tiny):
    with ember.load(gpt2_tiny) as eng:
        with pytest.raises(InputError, match="prompt has 300 tokens; the model's maximum sequence length is 256"):
            eng.submit(list(range(1, 301)))
        with pytest.raises(InputError, match="top_p"):
            eng.submit("hi", top_p=1.5)
        with pytest.raises(InputError, match="max_new_tokens"):
            eng.submit("hi", max_new_tokens=0)
        with pytest.raises(InputError, match="prompt is empty"):
            eng.submit([])
        assert eng.generate(["still works"], max_new_tokens=2)[0].finish_reason.value == "length"


def test_unknown_model_type_leaves_nothing(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="model_type 'bert' is not supported"):
        compile_decoder(str(src), out, CompileOptions(quiet=True))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]


def test_failure_mid_compile_leaves_no_folder(tmp_path, monkeypatch):
    import ember.compiler.compile as cc

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cc, "_build_part", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compile_decoder("gpt2-tiny", tmp_path / "out", CompileOptions(quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_unknown_source_name(tmp_path):
    with pytest.raises(ConfigError, match="neither a folder nor a built-in config.*gpt2-tiny"):
        compile_decoder("gpt3-huge", tmp_path / "x", CompileOptions(quiet=True))


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ember.cli", "generate", str(tmp_path / "missing"), "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("ember: error: engine folder") and "Traceback" not in r.stderr


def test_cli_compile_inspect_generate(tmp_path):
    out = tmp_path / "g"
    r = subprocess.run([sys.executable, "-m", "ember.cli", "compile", "gpt2-tiny", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[1/5] loading model source gpt2-tiny" in r.stderr and "wrote" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ember.cli", "inspect", str(out)], capture_output=True, text=True)
    assert "decoder (manifest schema 2)" in r.stdout and "step.onnx" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ember.cli", "generate", str(out), "Hello", "--max-new-tokens", "5",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert len(row["token_ids"]) == 5 and row["finish_reason"] == "length"
