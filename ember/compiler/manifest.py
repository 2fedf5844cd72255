"""The engine folder's manifest: schema, I/O signatures, hashing, and validation.

The runtime depends on this module only (never on export/ or passes/). A manifest is
plain JSON; ``Manifest`` is its typed view. Schema versions are integers; a folder
written by a newer Ember fails to load with an error that says to upgrade.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, element type (numpy name) and shape (ints or dim names)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class EnginePart:
    """One engine file of the folder (e.g. the decoder step graph, a UNet branch, a TP rank)."""

    name: str
    backend: str  # "onnxruntime" | "tensorrt"
    file: str  # relative to the folder
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[dict[str, Any]] = field(default_factory=list)  # [{file, sha256, size}]
    extra: dict[str, Any] = field(default_factory=dict)  # backend details: profiles, rank, dtype


@dataclass
class Manifest:
    kind: str  # "decoder" | "diffusion"
    model: dict[str, Any]  # family + config
    parts: list[EnginePart]
    schema_version: int = SCHEMA_VERSION
    tokenizer: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)  # [{name, file, sha256, size}]
    extra: dict[str, Any] = field(default_factory=dict)

    def find_part(self, name: str) -> EnginePart | None:
        return next((p for p in self.parts if p.name == name), None)

    def part(self, name: str) -> EnginePart:
        for p in self.parts:
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.parts) or "none"
        raise ArtifactError(f"manifest has no engine part {name!r} (parts: {names}); recompile the folder")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "manifest.json") -> "Manifest":
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{where}: no integer 'schema_version'; this is not an Ember engine folder")
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: written by a newer Ember (manifest schema {version}, this Ember reads up to "
                f"{SCHEMA_VERSION}); upgrade Ember (`pip install -U ember`) or recompile with this version"
            )
        try:
            parts = [
                EnginePart(
                    **{
                        **p,
                        "inputs": [TensorSpec(**t) for t in p["inputs"]],
                        "outputs": [TensorSpec(**t) for t in p["outputs"]],
                    }
                )
                for p in d["parts"]
            ]
            fields = {k: v for k, v in d.items() if k != "parts"}
            return Manifest(parts=parts, **fields)
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({e}); recompile the folder") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def file_record(folder: Path, rel: str) -> dict[str, Any]:
    p = folder / rel
    return {"file": rel, "sha256": sha256_file(p), "size": p.stat().st_size}


def build_environment() -> dict[str, Any]:
    """Versions that decide whether an engine built here loads elsewhere."""
    import onnx
    import onnxruntime

    import ember

    env: dict[str, Any] = {
        "ember": ember.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": platform.system(),
    }
    try:  # torch is present at compile time only
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and parse ``folder/manifest.json`` with errors that name the file and the fix."""
    folder = Path(folder)
    if not folder.exists():
        raise ArtifactError(f"engine folder {str(folder)!r} does not exist; compile one with `ember compile SOURCE -o {folder}`")
    if not folder.is_dir():
        raise ArtifactError(f"{str(folder)!r} is a file, not an engine folder; pass the folder `ember compile` wrote")
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise ArtifactError(f"{path} is missing: {str(folder)!r} is not an Ember engine folder (or was half-written); recompile it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); recompile the folder") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; recompile the folder")
    return Manifest.from_dict(data, where=str(path))


def verify_files(folder: str | os.PathLike, manifest: Manifest, check_hashes: bool = True) -> None:
    """Check every file the manifest names: present, right size, right sha256."""
    folder = Path(folder)
    records: list[dict[str, Any]] = []
    for p in manifest.parts:
        records.append({"file": p.file, "sha256": p.sha256, "size": p.size})
        records.extend(p.external_data)
    records.extend(manifest.tables)
    for r in records:
        f = folder / r["file"]
        if not f.exists():
            raise ArtifactError(f"{f} is missing from the engine folder; recompile with `ember compile`")
        size = f.stat().st_size
        if size != r["size"]:
            raise ArtifactError(
                f"{f} is {size} bytes but the manifest says {r['size']} (truncated or replaced); recompile the folder"
            )
        if check_hashes and sha256_file(f) != r["sha256"]:
            raise ArtifactError(f"{f} does not match its sha256 in the manifest (corrupt); recompile the folder")
