"""The engine folder's manifest: schema, I/O signatures, hashing, and validation.

Part of ``ember.engine_format``, which the compiler writes and the runtime reads (neither
imports the other). A manifest is plain JSON; ``Manifest`` is its typed view. Schema versions are positive integers; a folder
written by a newer Ember fails to load with an error that says to upgrade.

Every file the manifest names (parts, their external data, a TensorRT plan's source ONNX,
tables, the tokenizer and its chat template) is a *member* of the folder: ``manifest_members`` lists them and
``resolve_member`` is the one gate every reader goes through. A member is a relative POSIX
path that stays inside the folder once symlinks are resolved, names a regular file (never a
device, fifo or directory) and is no larger than its cap; its size is compared with the
manifest's before it is opened and its sha256 while it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ember.engine_format.roles import role_from_name
from ember.errors import ArtifactError

SCHEMA_VERSION = 2  # 2: tensor specs carry role/layer (schema 1 folders get them from their names)
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
CHAT_TEMPLATE_FILE = "tokenizer/chat_template.jinja"
# Caps checked before a member is opened, so a hostile manifest cannot make Ember hash or
# read without end. Engine files (weights) can be large; files read whole into memory are not.
MAX_MEMBER_BYTES = 1 << 40  # 1 TiB: any engine file, its external data, a table
MAX_TOKENIZER_BYTES = 1 << 28  # 256 MiB: tokenizer.json (the largest vocabularies are ~20 MB)
MAX_TEMPLATE_BYTES = 1 << 20  # 1 MiB: a chat template
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, element type (numpy name), shape (ints or dim names), and
    what it means (``role``, ``layer`` for per-layer K/V: ``engine_format.roles``; None for none)."""

    name: str
    dtype: str
    shape: list[int | str]
    role: str | None = None
    layer: int | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TensorSpec":
        """A manifest record; one written before roles (schema 1) gets them from its name."""
        if "role" not in d:
            role, layer = role_from_name(d["name"])
            return TensorSpec(**d, role=role, layer=layer)
        return TensorSpec(**d)


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

    @property
    def total_bytes(self) -> int:
        """The graph file's bytes plus its external data files' (the weights, for a large part)."""
        return self.size + sum(int(e["size"]) for e in self.external_data)

    def tensor(self, role: str, layer: int | None = None, output: bool = False) -> TensorSpec:
        """The input (or ``output``) with ``role`` (and ``layer``); ArtifactError when there is none."""
        found = self.find_tensor(role, layer, output)
        if found is None:
            what = f"{'output' if output else 'input'} with role {role!r}" + ("" if layer is None else f" (layer {layer})")
            raise ArtifactError(f"manifest part {self.name!r} ({self.file}) has no {what}; recompile the folder")
        return found

    def find_tensor(self, role: str, layer: int | None = None, output: bool = False) -> TensorSpec | None:
        return next((t for t in (self.outputs if output else self.inputs) if t.role == role and t.layer == layer), None)

    def kv_tensors(self, key_role: str, value_role: str, output: bool = False) -> list[TensorSpec]:
        """The per-layer K/V tensors in the runtime's order: key 0, value 0, key 1, value 1, ..."""
        specs = self.outputs if output else self.inputs
        layers = sorted({t.layer for t in specs if t.role == key_role})
        return [self.tensor(r, i, output) for i in layers for r in (key_role, value_role)]


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
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ArtifactError(f"{where}: 'schema_version' is {version!r}, not a positive integer; this is not an "
                                f"Ember engine folder (recompile it with `ember compile SOURCE -o FOLDER`)")
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
                        "inputs": [TensorSpec.from_dict(t) for t in p["inputs"]],
                        "outputs": [TensorSpec.from_dict(t) for t in p["outputs"]],
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
    """Check every file the manifest names: inside the folder, a regular file, right size, right sha256.

    Every path is checked (and every size compared) before any file is opened for hashing."""
    folder = Path(folder)
    members = manifest_members(manifest, str(folder / MANIFEST_NAME))
    paths = [check_member(folder, m) for m in members]
    if check_hashes:
        for m, path in zip(members, paths):
            if m.sha256 is not None and _digest(folder, m, path) != m.sha256:
                raise ArtifactError(f"{folder / m.file} does not match its sha256 in the manifest (corrupt or "
                                    f"replaced); recompile the folder")


@dataclass(frozen=True)
class Member:
    """One file the manifest names. ``where``: the manifest entry naming it (for messages);
    ``size``/``sha256`` are None only in tokenizer records written before they carried them."""

    where: str
    file: str
    size: int | None
    sha256: str | None
    cap: int = MAX_MEMBER_BYTES


def manifest_members(manifest: Manifest, where: str = MANIFEST_NAME) -> list[Member]:
    """Every file ``manifest`` names, each record's shape checked (errors name the entry)."""
    members = []
    for p in manifest.parts:
        members.append(_member(where, f"parts[{p.name}]", {"file": p.file, "sha256": p.sha256, "size": p.size}))
        for i, rec in enumerate(_records(where, f"parts[{p.name}].external_data", p.external_data)):
            members.append(_member(where, f"parts[{p.name}].external_data[{i}]", rec))
        if isinstance(p.extra, dict) and p.extra.get("source_onnx") is not None:  # a TensorRT plan's source graph
            members.append(_member(where, f"parts[{p.name}].source_onnx", p.extra["source_onnx"]))
    for i, rec in enumerate(_records(where, "tables", manifest.tables)):
        members.append(_member(where, f"tables[{i}]", rec))
    return members + [m for m in tokenizer_members(manifest, where) if m is not None]


def tokenizer_members(manifest: Manifest, where: str = MANIFEST_NAME) -> tuple[Member | None, Member | None]:
    """(tokenizer.json, chat template file) members of ``manifest``; None where it names none
    (a template recorded inline, as folders compiled before templates became files have it, is no file)."""
    tok = manifest.tokenizer
    if tok is None:
        return None, None
    tokenizer = _member(where, "tokenizer", tok, MAX_TOKENIZER_BYTES, legacy=True)
    template = tok.get("chat_template")
    if isinstance(template, dict):
        return tokenizer, _member(where, "tokenizer.chat_template", template, MAX_TEMPLATE_BYTES)
    if template is not None and not isinstance(template, str):
        raise ArtifactError(f"{where}: tokenizer.chat_template is neither a file record nor text; recompile the folder")
    return tokenizer, None


def _records(where: str, name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ArtifactError(f"{where}: {name} is not a list of file records; recompile the folder")
    return value


def _member(where: str, entry: str, rec: Any, cap: int = MAX_MEMBER_BYTES, legacy: bool = False) -> Member:
    """``legacy``: a record may carry neither size nor sha256 (tokenizers recorded before they did)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
        raise ArtifactError(f"{where}: {entry} is not a file record with a 'file' path; recompile the folder")
    size, sha = rec.get("size"), rec.get("sha256")
    if legacy and size is None and sha is None:
        return Member(entry, rec["file"], None, None, cap)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ArtifactError(f"{where}: {entry}.size is {size!r}, not a byte count; recompile the folder")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ArtifactError(f"{where}: {entry}.sha256 is {sha!r}, not a sha256 hex digest; recompile the folder")
    if size > cap:
        raise ArtifactError(f"{where}: {entry} says {rec['file']!r} is {size} bytes, over Ember's limit of {cap} "
                            f"bytes for this file; recompile the folder")
    return Member(entry, rec["file"], size, sha, cap)


def resolve_member(folder: str | os.PathLike, rel: Any, entry: str = "file") -> Path:
    """The real path of the folder's file ``rel`` (named by manifest entry ``entry``), after checking
    that ``rel`` is a relative POSIX path, stays inside the folder once symlinks are resolved, and
    names a regular file. Nothing is opened."""
    folder = Path(folder)
    where = folder / MANIFEST_NAME
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise ArtifactError(f"{where}: {entry} names {rel!r}, not a relative POSIX path; recompile the folder")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise ArtifactError(f"{where}: {entry} names {rel!r}, outside the engine folder (an absolute path or '..'); "
                            f"an engine folder names only files inside itself -- recompile it with `ember compile`")
    try:
        root = folder.resolve(strict=True)
        path = (root / pure).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ArtifactError(f"{folder / rel} cannot be resolved ({e}); recompile the folder") from e
    if not path.is_relative_to(root):
        raise ArtifactError(f"{folder / rel} ({entry}) is a symlink to {path}, outside the engine folder; replace it "
                            f"with the file itself or recompile the folder")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{folder / rel} is missing from the engine folder; recompile with `ember compile`") from None
    except OSError as e:
        raise ArtifactError(f"{folder / rel} cannot be read ({e.strerror}); fix its permissions or recompile") from e
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{folder / rel} ({entry}) is not a regular file ({_file_kind(mode)}); an engine folder "
                            f"holds regular files only -- recompile it")
    return path


def check_member(folder: Path, m: Member) -> Path:
    """``resolve_member`` plus the size checks: the file's size against the manifest's and the cap."""
    path = resolve_member(folder, m.file, m.where)
    size = path.stat().st_size
    if size > m.cap:
        raise ArtifactError(f"{folder / m.file} is {size} bytes, over Ember's limit of {m.cap} bytes for {m.where}; "
                            f"recompile the folder")
    if m.size is not None and size != m.size:
        raise ArtifactError(f"{folder / m.file} is {size} bytes but the manifest says {m.size} (truncated or "
                            f"replaced); recompile the folder")
    return path


def read_member(folder: str | os.PathLike, m: Member) -> bytes:
    """The member's bytes, checked (path, size, cap, and sha256 when recorded) as they are read:
    what is returned is what was hashed. For files read whole (tokenizer, chat template)."""
    folder = Path(folder)
    chunks: list[bytes] = []
    digest = _digest(folder, m, check_member(folder, m), chunks)
    if m.sha256 is not None and digest != m.sha256:
        raise ArtifactError(f"{folder / m.file} does not match its sha256 in the manifest (corrupt or replaced); "
                            f"recompile the folder")
    return b"".join(chunks)


def _digest(folder: Path, m: Member, path: Path, sink: list[bytes] | None = None, chunk: int = 1 << 22) -> str:
    """sha256 of the member at ``path``, reading no more than its expected size (+1 to see growth).
    Opened non-blocking so a fifo swapped in after the check cannot hang the read."""
    expected = m.size if m.size is not None else path.stat().st_size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ArtifactError(f"{folder / m.file} cannot be read ({e.strerror}); fix its permissions or recompile") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(f"{folder / m.file} was replaced by something that is not a regular file; recompile")
        h, total = hashlib.sha256(), 0
        while total <= expected and (b := f.read(min(chunk, expected + 1 - total))):
            h.update(b)
            total += len(b)
            if sink is not None:
                sink.append(b)
    if total != expected:
        raise ArtifactError(f"{folder / m.file} changed size while it was read ({total} bytes, expected {expected}); "
                            f"recompile the folder")
    return h.hexdigest()


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")
