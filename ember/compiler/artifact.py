"""Atomic engine-folder writer: build everything in a temp folder beside the target, then rename.

A failed or interrupted compile leaves nothing at the target path (and removes its temp
folder); an existing target is replaced only once the new folder is complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ember.compiler.manifest import MANIFEST_NAME, Manifest
from ember.errors import EmberError


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder; on clean exit it replaces ``target``, on error it is deleted."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise EmberError(f"{target} already exists; pass --overwrite or choose another -o path")
    if target.exists() and not target.is_dir():
        raise EmberError(f"{target} exists and is a file; choose another -o path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST_NAME).exists():
            raise EmberError(f"internal: compile of {target} wrote no {MANIFEST_NAME}")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.to_json() + "\n")
