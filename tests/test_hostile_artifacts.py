"""Hostile and damaged engine folders: paths that reach outside, files that are not files,
bad schema and config values, a swapped or broken tokenizer, a tampered chat template, and
load options the folder does not take. Every case must end in a one-line EmberError that
names the file or option, quickly, without reading anything outside the folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ember
from ember.engine_format.manifest import read_manifest
from ember.errors import ArtifactError, InputError

from engine_folders import edit_manifest, private_copy

pytest.importorskip("transformers")

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
_opened: list[str] | None = None  # paths opened (Python-level `open` audit events) while recording


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording_opens():
    """Yields the list of the real paths of every file Python opens inside the block."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> Path:
    """gpt2-tiny compiled from a Hugging Face folder that has a chat template (so the engine has one)."""
    from hf_models import save_hf_model

    from ember.compiler.compile import CompileOptions, compile_decoder
    from ember.export.config import BUILTIN

    root = tmp_path_factory.mktemp("hostile")
    save_hf_model(BUILTIN["gpt2-tiny"], root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    compile_decoder(str(root / "hf"), root / "engine", CompileOptions(quiet=True, validate=False))
    return root / "engine"


@pytest.fixture
def folder(compiled, tmp_path) -> Path:
    return private_copy(compiled, tmp_path)


def record(path: Path, rel: str) -> dict:
    data = path.read_bytes()
    return {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# ---- paths that reach outside the folder ------------------------------------------------------

def _outside_copy(folder: Path, tmp_path: Path, entry: str) -> Path:
    """A file outside the folder that would load if it were read: a copy of the real member."""
    source = {"parts": folder / "step.onnx", "tokenizer": folder / "tokenizer" / "tokenizer.json"}.get(entry)
    target = tmp_path / f"outside-{entry}.bin"
    target.write_bytes(source.read_bytes() if source else b"scale tables from elsewhere")
    return target


def _name_in_manifest(m: dict, entry: str, rec: dict) -> None:
    if entry == "parts":
        m["parts"][0].update(rec)
    elif entry == "external_data":
        m["parts"][0]["external_data"].append(rec)
    elif entry == "tables":
        m["tables"].append({"name": "scales", **rec})
    else:
        m["tokenizer"].update(rec)


@pytest.mark.parametrize("entry", ["parts", "external_data", "tables", "tokenizer"])
@pytest.mark.parametrize("style", ["parent", "absolute"])
def test_paths_outside_the_folder_are_refused_unread(folder, tmp_path, entry, style):
    target = _outside_copy(folder, tmp_path, entry)
    rel = f"../{target.name}" if style == "parent" else str(target)
    edit_manifest(folder, lambda m: _name_in_manifest(m, entry, record(target, rel)))
    with recording_opens() as opened, pytest.raises(ArtifactError, match=r"outside the engine folder.*recompile"):
        ember.load(folder)
    assert str(target.resolve()) not in opened


def test_symlink_to_a_file_outside_is_refused_unread(folder, tmp_path):
    target = _outside_copy(folder, tmp_path, "tables")
    (folder / "tables").mkdir(exist_ok=True)
    (folder / "tables" / "scales.bin").symlink_to(target)
    edit_manifest(folder, lambda m: _name_in_manifest(m, "tables", record(target, "tables/scales.bin")))
    with recording_opens() as opened, pytest.raises(ArtifactError,
                                                    match=r"tables/scales.bin .*symlink to .*outside the engine folder"):
        ember.load(folder)
    assert str(target.resolve()) not in opened


def _load_in_subprocess(folder: Path, timeout_s: float = 30.0) -> str:
    """``ember.load(folder)`` in a child process: its error line; fails the test if it hangs."""
    code = textwrap.dedent("""
        import sys, ember
        try:
            ember.load(sys.argv[1]).close()
            print("LOADED")
        except ember.EmberError as e:
            print(type(e).__name__, e)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ember.load did not return within {timeout_s:.0f} s")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_dev_zero_external_data_fails_fast(folder):
    empty = hashlib.sha256(b"").hexdigest()
    edit_manifest(folder, lambda m: _name_in_manifest(m, "external_data", {"file": "/dev/zero", "sha256": empty, "size": 0}))
    out = _load_in_subprocess(folder)
    assert out.startswith("ArtifactError") and "'/dev/zero', outside the engine folder" in out, out


def test_symlink_to_dev_zero_fails_fast(folder):
    empty = hashlib.sha256(b"").hexdigest()
    (folder / "step.onnx.data").symlink_to("/dev/zero")
    edit_manifest(folder, lambda m: _name_in_manifest(
        m, "external_data", {"file": "step.onnx.data", "sha256": empty, "size": 0}))
    out = _load_in_subprocess(folder)
    assert out.startswith("ArtifactError") and "symlink to /dev/zero, outside the engine folder" in out, out


def test_fifo_inside_the_folder_fails_fast(folder):
    empty = hashlib.sha256(b"").hexdigest()
    os.mkfifo(folder / "step.onnx.data")
    edit_manifest(folder, lambda m: _name_in_manifest(
        m, "external_data", {"file": "step.onnx.data", "sha256": empty, "size": 0}))
    out = _load_in_subprocess(folder)
    assert out.startswith("ArtifactError") and "step.onnx.data" in out and "not a regular file (a fifo)" in out, out


def test_size_cap_is_checked_before_the_file_is_opened(folder):
    tok = folder / "tokenizer" / "tokenizer.json"
    os.truncate(tok, 300 << 20)  # sparse: a 300 MB tokenizer.json, over the 256 MiB cap
    edit_manifest(folder, lambda m: m["tokenizer"].update(size=300 << 20, sha256="0" * 64))
    with recording_opens() as opened, pytest.raises(
            ArtifactError, match=r"tokenizer says 'tokenizer/tokenizer.json' is 314572800 bytes, over Ember's limit"):
        ember.load(folder, verify="size")
    assert str(tok.resolve()) not in opened


# ---- schema and model config ------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, -7, True, 1.5])
def test_schema_version_must_be_a_positive_integer(folder, version):
    edit_manifest(folder, lambda m: m.update(schema_version=version))
    with pytest.raises(ArtifactError, match=rf"manifest.json: 'schema_version' is {version!r}, not a positive "
                                            rf"integer.*ember compile"):
        ember.load(folder)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("num_layers"), r"model.config has no 'num_layers'"),
    (lambda c: c.update(num_heads=0), r"model.config.num_heads is 0; it must be at least 1"),
    (lambda c: c.update(num_heads=-4), r"model.config.num_heads is -4; it must be at least 1"),
    (lambda c: c.update(num_layers="two"), r"model.config.num_layers is 'two', not an integer"),
    (lambda c: (c.pop("head_dim"), c.update(hidden_size=66)),  # a folder from before head_dim was recorded
     r"model.config.hidden_size 66 is not a multiple of num_heads 4"),
    (lambda c: c.update(head_dim="16"), r"model.config.head_dim is '16', not a positive integer"),
    (lambda c: c.update(num_kv_heads=3), r"model.config.num_heads 4 is not a multiple of num_kv_heads 3"),
    (lambda c: c.update(max_positions=0), r"model.config.max_positions is 0; it must be at least 1"),
], ids=["no-num_layers", "num_heads-0", "num_heads-negative", "num_layers-str", "hidden-heads", "head_dim-str",
        "heads-kv", "max_pos-0"])
def test_model_config_is_checked_at_load(folder, change, message):
    edit_manifest(folder, lambda m: change(m["model"]["config"]))
    with pytest.raises(ArtifactError, match=rf"manifest.json: {message}.*recompile"):
        ember.load(folder)


# ---- tokenizer and chat template inside the integrity check -----------------------------------

def test_compile_records_tokenizer_and_chat_template_files(compiled):
    tok = read_manifest(compiled).tokenizer
    assert tok["file"] == "tokenizer/tokenizer.json"
    assert tok == {**record(compiled / tok["file"], tok["file"]), "chat_template": tok["chat_template"]}
    assert tok["chat_template"] == record(compiled / "tokenizer" / "chat_template.jinja", "tokenizer/chat_template.jinja")
    assert (compiled / "tokenizer" / "chat_template.jinja").read_text() == TEMPLATE


def test_swapped_tokenizer_fails_load(folder):
    from ember.export.tokenizer_builtin import build_builtin_tokenizer

    build_builtin_tokenizer(300).save(str(folder / "tokenizer" / "tokenizer.json"))
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer.json is \d+ bytes but the manifest says"):
        ember.load(folder)


def test_same_size_vocabulary_swap_fails_even_without_hashing_engine_files(folder):
    tok = folder / "tokenizer" / "tokenizer.json"
    text = tok.read_text()
    assert text.count('"0": 16,\n') == text.count('"1": 17,\n') == 1
    swapped = text.replace('"0": 16,\n', '"0": 17,\n').replace('"1": 17,\n', '"1": 16,\n')  # ids of "0" and "1"
    assert swapped != text and len(swapped) == len(text)
    tok.write_text(swapped)
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer.json does not match its sha256"):
        ember.load(folder, verify="size")


def test_deleted_tokenizer_names_the_file(folder):
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer.json is missing from the engine folder; recompile"):
        ember.load(folder)


def test_corrupt_tokenizer_names_the_file(folder):
    tok = folder / "tokenizer" / "tokenizer.json"
    tok.write_bytes(b"\0" * tok.stat().st_size)
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer.json does not match its sha256.*recompile"):
        ember.load(folder)


def test_tampered_chat_template_fails_load_and_lookup(folder):
    from ember.server.chat_template import find_chat_template

    manifest = read_manifest(folder)
    assert find_chat_template(folder, manifest) == TEMPLATE
    (folder / "tokenizer" / "chat_template.jinja").write_text(TEMPLATE.replace("<assistant>", "<evil_user>"))  # same size
    with pytest.raises(ArtifactError, match=r"chat_template.jinja does not match its sha256"):
        ember.load(folder)
    with pytest.raises(ArtifactError, match=r"chat_template.jinja does not match its sha256"):
        find_chat_template(folder, manifest)


def test_older_manifest_records_still_load_and_a_broken_tokenizer_is_named(folder):
    """Folders compiled before tokenizer records carried sha256 (template inline) keep loading."""
    def older(m):
        m["tokenizer"] = {"file": "tokenizer/tokenizer.json", "chat_template": TEMPLATE}
    edit_manifest(folder, older)
    (folder / "tokenizer" / "chat_template.jinja").unlink(missing_ok=True)
    from ember.server.chat_template import find_chat_template

    with ember.load(folder) as eng:
        assert eng.generate(["hi"], max_new_tokens=2)[0].finish_reason.value in ("length", "eos")
        assert find_chat_template(folder, eng.manifest) == TEMPLATE
    (folder / "tokenizer" / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer.json is not a valid tokenizer file.*recompile"):
        ember.load(folder)


def test_unrecorded_template_file_is_not_read(folder):
    """A template the manifest does not record is outside the integrity check, so it is not used."""
    from ember.server.chat_template import find_chat_template

    edit_manifest(folder, lambda m: m["tokenizer"].pop("chat_template", None))
    (folder / "tokenizer" / "chat_template.jinja").write_text("{{ 'dropped in by hand' }}")
    assert find_chat_template(folder, read_manifest(folder)) is None


# ---- load options -----------------------------------------------------------------------------

def test_tp_on_a_single_process_folder_is_an_input_error(folder):
    with pytest.raises(InputError, match=r"tp=2: .* compiled for one process.*omit tp \(CLI: --tp\).*--tp 2"):
        ember.load(folder, tp=2)
    ember.load(folder, tp=1).close()  # what the folder is: accepted


def test_cli_generate_tp_on_a_single_process_folder(folder, capsys):
    from ember.cli import main

    assert main(["generate", str(folder), "hi", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ember: error: tp=2: ") and "\n" not in err


def test_unknown_load_option_lists_the_accepted_ones(folder):
    with pytest.raises(InputError, match=r"option\(s\) max_batchs are not understood .*accepted: verify, max_batch, "):
        ember.load(folder, max_batchs=4)
