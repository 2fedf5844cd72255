"""Hostile model sources: every bad config.json, weight or tokenizer file gives one ConfigError line that
names the file, the field and the fix (CLI exit 2), and sizes are checked against the weights before a
model is allocated. No output folder is created."""
from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.cli import main
from ember.export.config import BUILTIN
from hf_models import save_hf_model


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-src")
    for name in ("gpt2-tiny", "llama-tiny"):
        save_hf_model(BUILTIN[name], root / name)
    return root


def _copy(hf_folders, tmp_path, name: str, **fields) -> Path:
    src = tmp_path / "src"
    shutil.copytree(hf_folders / name, src)
    if fields:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(fields)
        (src / "config.json").write_text(json.dumps(cfg))
    return src


def _compile_fails(src: Path, tmp_path, capsys, *expected: str) -> str:
    """``ember compile`` exits 2 with one line on stderr holding every ``expected`` text; no output folder."""
    out = tmp_path / "engine"
    rc = main(["compile", str(src), "-o", str(out), "--no-validate", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("ember: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("content, expected", [
    (b'[{"model_type": "gpt2"}]', "holds a list, not a JSON object"),
    (b'"gpt2"', "holds a string, not a JSON object"),
    (b"12", "holds an integer, not a JSON object"),
    (b'{"model_type": "gpt2", ', "is not valid JSON"),
    (b'{"model_type": "gpt2\xff\xfe"}', "is not UTF-8 text"),
])
def test_config_json_that_is_not_an_object(hf_folders, tmp_path, capsys, content, expected):
    src = _copy(hf_folders, tmp_path, "gpt2-tiny")
    (src / "config.json").write_bytes(content)
    _compile_fails(src, tmp_path, capsys, f"{src / 'config.json'}", expected, "restore the model's original config.json")


@pytest.mark.parametrize("model, fields, expected", [
    ("gpt2-tiny", {"n_layer": "two"}, 'field n_layer="two" is not a whole number; write the model\'s value as a JSON integer'),
    ("llama-tiny", {"num_hidden_layers": 2.5}, "field num_hidden_layers=2.5 is not a whole number"),
    ("gpt2-tiny", {"n_head": True}, "field n_head=true is not a whole number"),
    ("llama-tiny", {"num_attention_heads": 0}, "field num_attention_heads=0 must be >= 1; set it to the model's value"),
    ("llama-tiny", {"num_key_value_heads": -2}, "field num_key_value_heads=-2 must be >= 1"),
    ("gpt2-tiny", {"vocab_size": 0}, "field vocab_size=0 must be >= 1; set it to the model's value"),
    ("gpt2-tiny", {"n_head": 5}, "n_embd=64 is not divisible by n_head=5; set them to the model's values"),
    ("llama-tiny", {"num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ("llama-tiny", {"rms_norm_eps": "1e-5"}, 'field rms_norm_eps="1e-5" is a string, not a number'),
    ("llama-tiny", {"rope_theta": -1.0}, "field rope_theta=-1.0 must be a finite number > 0"),
    ("llama-tiny", {"tie_word_embeddings": "yes"}, 'field tie_word_embeddings="yes" is a string, not a boolean; write true or false'),
    ("gpt2-tiny", {"eos_token_id": ["x"]}, 'field eos_token_id="x" is not a whole number'),
    ("gpt2-tiny", {"n_positions": None}, "required field 'n_positions' is missing; add it with the model's value"),
])
def test_config_field_with_a_bad_value(hf_folders, tmp_path, capsys, model, fields, expected):
    src = _copy(hf_folders, tmp_path, model, **fields)
    _compile_fails(src, tmp_path, capsys, f"{src / 'config.json'}: ", expected)


@pytest.mark.parametrize("model, fields, expected", [
    ("gpt2-tiny", {"n_positions": 100}, "n_positions=100 but the weights say 256 (wpe.weight has shape [256, 64])"),
    ("llama-tiny", {"intermediate_size": 100}, "intermediate_size=100 but the weights say 176"),
    ("llama-tiny", {"num_key_value_heads": 4}, "num_key_value_heads=4 but the weights say 2"),
    ("gpt2-tiny", {"n_layer": 1}, "n_layer=1 but the weights hold 2 layers (h.0 to h.1); set n_layer to 2"),
])
def test_config_sizes_that_disagree_with_the_weights(hf_folders, tmp_path, capsys, model, fields, expected):
    src = _copy(hf_folders, tmp_path, model, **fields)
    _compile_fails(src, tmp_path, capsys, f"{src / 'config.json'}: ", expected, "or use the weights that belong to this config")


def _limit_memory():  # the child may not allocate the model the config claims: 3 GiB of address space
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def _compile_in_child(src: Path, out: Path, expected: str) -> None:
    """Compile in a subprocess under a memory limit: a compile that allocates the claimed model dies, not the host."""
    try:
        r = subprocess.run([sys.executable, "-m", "ember.cli", "compile", str(src), "-o", str(out), "--no-validate",
                            "--quiet"], capture_output=True, text=True, timeout=90, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("the compile was still building the model after 90 s")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def _drop_tensor(src: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    del sd[name]
    save_file(sd, str(src / "model.safetensors"))


@pytest.mark.parametrize("model, fields, drop, expected", [
    ("gpt2-tiny", {"n_layer": 1_000_000}, None, "n_layer=1000000 but the weights hold 2 layers (h.0 to h.1)"),
    ("llama-tiny", {"vocab_size": 10**9}, None, "vocab_size=1000000000 but the weights say 512"),
    ("gpt2-tiny", {"n_embd": 65536}, None, "n_embd=65536 but the weights say 64"),
    # no tensor pins vocab_size down any more: the parameter count does
    ("gpt2-tiny", {"vocab_size": 10**9}, "transformer.wte.weight", "the config implies 64,000,"),
])
def test_huge_sizes_fail_before_any_allocation(hf_folders, tmp_path, model, fields, drop, expected):
    src = _copy(hf_folders, tmp_path, model, **fields)
    if drop:
        _drop_tensor(src, drop)
    _compile_in_child(src, tmp_path / "engine", expected)


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_is_refused_without_running_it(hf_folders, tmp_path, capsys):
    src = _copy(hf_folders, tmp_path, "gpt2-tiny")
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "evil": _Payload(marker)}, src / "pytorch_model.bin")
    err = _compile_fails(src, tmp_path, capsys, str(src / "pytorch_model.bin"), "objects that are not plain tensors",
                         "convert the checkpoint to safetensors from a trusted copy")
    assert "weights_only" not in err
    assert not marker.exists()
    with (src / "pytorch_model.bin").open("wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(_Payload(marker), f)
    _compile_fails(src, tmp_path, capsys, str(src / "pytorch_model.bin"), "objects that are not plain tensors")
    assert not marker.exists()


def test_pytorch_bin_checkpoint_loads_and_corrupt_weight_files_are_named(hf_folders, tmp_path, capsys):
    from safetensors.torch import load_file

    src = _copy(hf_folders, tmp_path, "llama-tiny")
    safetensors = src / "model.safetensors"
    data = safetensors.read_bytes()
    safetensors.write_bytes(data[: len(data) // 2])
    _compile_fails(src, tmp_path, capsys, str(safetensors), "is not a readable safetensors file", "re-download")
    safetensors.write_bytes(data)
    bin_file = src / "pytorch_model.bin"
    torch.save(load_file(str(safetensors)), bin_file)
    safetensors.unlink()
    assert main(["compile", str(src), "-o", str(tmp_path / "from-bin"), "--no-validate", "--quiet"]) == 0
    bin_file.write_bytes(bin_file.read_bytes()[:5000])
    _compile_fails(src, tmp_path, capsys, str(bin_file), "could not be read as a PyTorch checkpoint",
                   "re-download the weights or convert them to safetensors")
    bin_file.write_bytes(b"not a checkpoint at all")
    err = _compile_fails(src, tmp_path, capsys, str(bin_file), "not plain tensors", "or corrupt bytes")
    assert "weights_only" not in err
    torch.save([torch.zeros(2)], bin_file)
    _compile_fails(src, tmp_path, capsys, str(bin_file), "does not hold a state dict")


def test_weights_of_another_architecture(hf_folders, tmp_path, capsys):
    src = _copy(hf_folders, tmp_path, "llama-tiny")
    shutil.copy(hf_folders / "gpt2-tiny" / "model.safetensors", src / "model.safetensors")
    _compile_fails(src, tmp_path, capsys, f"{src / 'config.json'}: ", "hold no layers.N.* layer tensors",
                   "not a llama checkpoint: use the weights that belong to this config")


def test_weight_files_with_a_missing_layer(hf_folders, tmp_path, capsys):
    src = _copy(hf_folders, tmp_path, "gpt2-tiny")
    for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                 "mlp.c_proj.bias"):
        _drop_tensor(src, f"transformer.h.0.{name}")
    _compile_fails(src, tmp_path, capsys, f"{src / 'config.json'}: ", "the weights hold h.1 but no h.0",
                   "re-download all of them")


@pytest.mark.parametrize("name, content, expected", [
    ("tokenizer_config.json", b"[]", "holds a list, not a JSON object; restore the model's original tokenizer_config.json"),
    ("tokenizer.json", b"{}", "could not be read as a tokenizer"),
    ("chat_template.jinja", b"{{ messages \xff }}", "is not UTF-8 text"),
])
def test_bad_tokenizer_files(hf_folders, tmp_path, capsys, name, content, expected):
    src = _copy(hf_folders, tmp_path, "gpt2-tiny")
    (src / name).write_bytes(content)
    _compile_fails(src, tmp_path, capsys, str(src / name), expected, "restore the model's original")


# --- diffusers pipeline folders --------------------------------------------------------------

@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    from ember.export.diffusion.config import builtin_config
    from ember.export.diffusion.source import build_builtin, save_pipeline_folder

    return save_pipeline_folder(build_builtin(builtin_config("sd-tiny")), tmp_path_factory.mktemp("sd") / "sd-tiny")


def _sd_copy(sd_folder, tmp_path, file: str, change) -> tuple[Path, Path]:
    src = tmp_path / "sd-src"
    shutil.copytree(sd_folder, src)
    path = src / file
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return src, path


@pytest.mark.parametrize("file, change, expected", [
    ("model_index.json", b"[]", "holds a list, not a JSON object; restore the model's original model_index.json"),
    ("unet/config.json", b'["UNet2DConditionModel"]', "holds a list, not a JSON object"),
    ("unet/config.json", {"layers_per_block": "two"}, 'field layers_per_block="two" is not a whole number'),
    ("unet/config.json", {"block_out_channels": [16, 0]}, "field block_out_channels[1]=0 must be >= 1"),
    ("unet/config.json", {"block_out_channels": [16, 48]},
     "the config gives down_blocks.1.resnets.0.conv1.weight the shape [48, 16, 3, 3] but the weights hold [32, 16, 3, 3]"),
    ("vae/config.json", {"layers_per_block": 2}, "parameters but the weight files hold only"),
    ("text_encoder/config.json", {"num_attention_heads": 0}, "field num_attention_heads=0 must be >= 1"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "field num_train_timesteps=0 must be >= 1"),
    ("scheduler/scheduler_config.json", b"\xff\xfe", "is not UTF-8 text"),
])
def test_bad_diffusion_part_configs(sd_folder, tmp_path, capsys, file, change, expected):
    src, path = _sd_copy(sd_folder, tmp_path, file, change)
    _compile_fails(src, tmp_path, capsys, str(path), expected)


@pytest.mark.parametrize("change, expected", [
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers=1000000 but the weights (model.safetensors) hold only"),
    ({"intermediate_size": 10**9}, "shape [1000000000, 32] but the weights hold [64, 32]"),
])
def test_huge_diffusion_sizes_fail_before_any_allocation(sd_folder, tmp_path, change, expected):
    src, _ = _sd_copy(sd_folder, tmp_path, "text_encoder/config.json", change)
    _compile_in_child(src, tmp_path / "engine", expected)
