"""Engine-folder output: where ``ember compile -o DIR`` may write, and the atomic writer.

Where (``check_output``): ``-o`` names a new folder, an empty folder, or, with ``overwrite``
(``--overwrite``), an existing Ember engine folder (its manifest.json parses). Refused, with
the reason and the fix: a file; a non-empty folder that is not an engine folder (even with
``--overwrite``); the source model's folder or any folder that contains it; the current
directory or any folder that contains it. Paths are compared after resolving symlinks.

How (``atomic_folder``): everything is built in ``.NAME.tmp-<pid>-<hex>`` beside the target
and checked (the folder must hold exactly the files its manifest names, see
``check_folder_files``); its folders and files get the modes the umask gives (``_set_modes``).
Then the target (if any) is renamed to ``.NAME.old-<pid>``, the temp folder to the target,
and the old folder is deleted. Nothing is deleted before the new engine
is complete. A failed or interrupted compile removes its temp folder. One killed outright
(SIGKILL, power loss) leaves it behind: the next compile of the same target removes the
``.NAME.tmp-*`` and ``.NAME.old-*`` folders whose owner process is gone
(``clean_stale_siblings``) and leaves those of live processes alone. An ``.old`` folder whose
target is missing (a compile killed between the two renames) is the user's previous engine:
it is renamed back to the target, never deleted.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ember.engine_format.manifest import MANIFEST_NAME, Manifest, manifest_members, read_manifest
from ember.errors import ArtifactError, EmberError

NEW_FOLDER_HINT = "choose a new or empty folder for -o (e.g. -o artifacts/NAME)"


def is_engine_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest.json that parses as an Ember manifest."""
    try:
        read_manifest(folder)
    except (ArtifactError, OSError):
        return False
    return True


def _source_folder(source: str | os.PathLike | None) -> Path | None:
    if source is None or not Path(source).exists():
        return None  # a built-in config name, not a folder
    return Path(source).resolve()


def check_output(target: str | os.PathLike, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Raise EmberError unless a compile may write its engine folder at ``target``.

    ``source`` is the model source (a folder, or a built-in config name). Returns the resolved target.
    """
    t = Path(target).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if t == cwd:
        raise EmberError(f"-o {target} is the current directory, which a compile would replace; {NEW_FOLDER_HINT}")
    if t in cwd.parents:
        raise EmberError(f"-o {target} contains the current directory, which a compile would replace; {NEW_FOLDER_HINT}")
    src = _source_folder(source)
    if src is not None and t == src:
        raise EmberError(f"-o {target} is the source model's folder; write the engine elsewhere: {NEW_FOLDER_HINT}")
    if src is not None and t in src.parents:
        raise EmberError(f"-o {target} contains the source model's folder {source}; write the engine elsewhere: "
                         f"{NEW_FOLDER_HINT}")
    if not os.path.lexists(t):
        return t
    if not t.is_dir():
        raise EmberError(f"-o {target} is a file, not a folder; {NEW_FOLDER_HINT}")
    if next(t.iterdir(), None) is None:
        return t
    if not is_engine_folder(t):
        raise EmberError(f"-o {target} is not empty and is not an Ember engine folder (no valid {MANIFEST_NAME}), so "
                         f"it is never replaced, even with --overwrite; {NEW_FOLDER_HINT}")
    if not overwrite:
        raise EmberError(f"-o {target} already holds an Ember engine; pass --overwrite to replace it (the new engine "
                         f"replaces it only once complete), or choose another -o folder")
    return t


def _sibling_pattern(name: str) -> re.Pattern:
    """``.NAME.tmp-<pid>-<hex>`` (a compile's temp folder) or ``.NAME.old-<pid>`` (the engine it replaces)."""
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp-(?P<tmp_pid>\d+)-[0-9a-f]+|old-(?P<old_pid>\d+))$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can judge: leave its folder alone
    return True


def clean_stale_siblings(target: Path) -> str | None:
    """Remove ``target``'s temp/old folders whose owner process is gone; restore an orphaned old engine.

    Returns a note when a previous engine was restored to ``target``.
    """
    if not target.parent.is_dir():
        return None
    pattern = _sibling_pattern(target.name)
    temps, olds = [], []
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(m["tmp_pid"] or m["old_pid"])
        if not _pid_alive(pid):
            (olds if m["old_pid"] else temps).append(entry)
    note = None
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, target)
        olds.remove(newest)
        note = f"restored {target} from {newest.name}, left by a compile killed while replacing it"
    for folder in temps + olds:
        shutil.rmtree(folder, ignore_errors=True)
    return note


def prepare_output(target: str | os.PathLike, *, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Before a compile's long work: clean stale temp folders of ``target``, then ``check_output``."""
    note = clean_stale_siblings(Path(target).expanduser().resolve())
    if note:
        print(f"ember: {note}", file=sys.stderr, flush=True)
    return check_output(target, overwrite=overwrite, source=source)


def _new_temp_folder(target: Path) -> Path:
    """``.NAME.tmp-<pid>-<hex>`` beside ``target``, made with the umask's permissions (not mkdtemp's 0700)."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise EmberError(f"could not create a temp folder beside {target}; remove the .{target.name}.tmp-* folders there")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during the swap, so no interruption falls between its two renames.

    Python runs signal handlers in the main thread only; elsewhere nothing can interrupt the swap.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in caught:  # delivered now, to the handler that was in place
            signal.raise_signal(s)


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}") if os.path.lexists(target) else None
    if old is not None and os.path.lexists(old):
        raise EmberError(f"{old} is in the way of replacing {target}; move it aside (it may hold an earlier "
                         f"engine) and compile again")
    with _signals_deferred():
        if old is not None:
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous engine back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False,
                  source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temp folder; on clean exit it replaces ``target``, on error it is deleted (module doc)."""
    resolved = prepare_output(target, overwrite=overwrite, source=source)
    resolved.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_folder(resolved)
    folder_mode = tmp.stat().st_mode & 0o777  # what the umask gives a new folder
    try:
        yield tmp
        check_folder_files(tmp, read_manifest(tmp))
        _set_modes(tmp, folder_mode)
        check_output(target, overwrite=overwrite, source=source)  # the target may have changed meanwhile
        _swap_in(tmp, resolved)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _set_modes(folder: Path, folder_mode: int) -> None:
    """Give every folder ``folder_mode`` and every file ``folder_mode & 0o666``: the modes the umask
    gives new folders and files (some writers, e.g. safetensors, make 0600 files)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, folder_mode if path.is_dir() else folder_mode & 0o666)


def manifest_files(manifest: Manifest) -> set[str]:
    """Every file a manifest names (``manifest.manifest_members``), plus manifest.json itself."""
    return {m.file for m in manifest_members(manifest)} | {MANIFEST_NAME}


def check_folder_files(folder: Path, manifest: Manifest) -> None:
    """Fail (an internal error) unless ``folder`` holds exactly the files ``manifest`` names."""
    expected = manifest_files(manifest)
    expected_dirs = {p.as_posix() for f in expected for p in Path(f).parents if p != Path(".")}
    present, dirs = set(), set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        (dirs if path.is_dir() and not path.is_symlink() else present).add(rel)
    stray = sorted((present - expected) | (dirs - expected_dirs))
    missing = sorted(expected - present)
    if stray or missing:
        listed = "; ".join(filter(None, [f"not in the manifest: {', '.join(stray[:8])}" if stray else "",
                                         f"missing: {', '.join(missing[:8])}" if missing else ""]))
        raise EmberError(f"internal: the new engine folder does not match its manifest ({listed}); "
                         f"this is an Ember bug: please report it")


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.to_json() + "\n")
