"""Helpers for tests that tamper with a copy of a compiled engine folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def private_copy(compiled: Path, tmp_path: Path) -> Path:
    """A private copy of the compiled engine folder, free to tamper with."""
    return Path(shutil.copytree(compiled, tmp_path / "engine"))


def edit_manifest(folder: Path, change) -> None:
    """Apply ``change(manifest_dict)`` to ``folder/manifest.json`` in place."""
    p = folder / "manifest.json"
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m))
