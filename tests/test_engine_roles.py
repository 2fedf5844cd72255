"""I/O roles in the manifest (engine_format/roles.py): the compiler writes them, the runtime
finds tensors by them, and a schema-1 folder (no roles) still loads with roles from names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import ember
from ember.engine_format.manifest import SCHEMA_VERSION, TensorSpec, read_manifest
from ember.engine_format.roles import role_from_name
from ember.errors import ArtifactError

from engine_folders import edit_manifest, private_copy


@pytest.fixture
def folder(gpt2_tiny, tmp_path) -> Path:
    return private_copy(gpt2_tiny, tmp_path)


def greedy(folder: Path) -> list[int]:
    with ember.load(folder, threads=1) as eng:
        [c] = eng.generate(["hello world"], max_new_tokens=6, ignore_eos=True)
    return c.token_ids


@pytest.mark.parametrize("name, role, layer", [
    ("input_ids", "token_ids", None), ("positions", "positions", None), ("past_lengths", "past_lengths", None),
    ("new_lengths", "new_lengths", None), ("past_key.0", "past_key", 0), ("past_value.11", "past_value", 11),
    ("logits", "logits", None), ("new_key.3", "new_key", 3), ("seqlens_k", "past_lengths", None),
    ("total_sequence_length", "kv_capacity", None), ("present_value.2", "present_value", 2),
    ("partial", "partial_sum", None), ("sample", None, None), ("past_key.x", None, None),
])
def test_role_from_name(name, role, layer):
    assert role_from_name(name) == (role, layer)


def test_the_compiler_writes_roles(gpt2_tiny):
    raw = json.loads((gpt2_tiny / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION >= 2
    step = next(p for p in raw["parts"] if p["name"] == "step")
    roles = {t["name"]: (t["role"], t["layer"]) for t in step["inputs"] + step["outputs"]}
    assert roles["input_ids"] == ("token_ids", None) and roles["past_lengths"] == ("past_lengths", None)
    assert roles["past_value.1"] == ("past_value", 1) and roles["new_key.0"] == ("new_key", 0)
    assert roles["logits"] == ("logits", None)


def test_a_schema_1_folder_without_roles_loads_the_same(folder, gpt2_tiny):
    def strip(m):
        m["schema_version"] = 1
        for p in m["parts"]:
            for t in p["inputs"] + p["outputs"]:
                del t["role"], t["layer"]
    edit_manifest(folder, strip)
    old, new = read_manifest(folder), read_manifest(gpt2_tiny)
    assert [p.inputs + p.outputs for p in old.parts] == [p.inputs + p.outputs for p in new.parts]
    assert greedy(folder) == greedy(gpt2_tiny)


def test_the_runtime_finds_the_cache_by_role_not_by_name(folder):
    def drop_role(m):
        step = next(p for p in m["parts"] if p["name"] == "step")
        kv = next(t for t in step["inputs"] if t["name"] == "past_key.0")
        kv["role"] = kv["layer"] = None
    edit_manifest(folder, drop_role)
    with pytest.raises(ArtifactError, match=r"part 'step' .* has no input with role 'past_key' \(layer 0\)"):
        ember.load(folder, threads=1)


def test_part_kv_tensors_in_layer_order(gpt2_tiny):
    part = read_manifest(gpt2_tiny).part("step")
    names = [t.name for t in part.kv_tensors("past_key", "past_value")]
    assert len(names) >= 4 and names == [f"past_{kind}.{i}" for i in range(len(names) // 2) for kind in ("key", "value")]
    assert TensorSpec.from_dict({"name": "sample", "dtype": "float32", "shape": [1]}).role is None
