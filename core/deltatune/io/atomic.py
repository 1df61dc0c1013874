"""Atomic writes that never destroy what deltatune did not write.

A file or folder appears complete under its final name, or not at all: it is written beside its
target under a temporary name carrying the writer's process id (``.NAME.tmp-PID-XXXXXXXX``), then
renamed onto the target. An existing folder is replaced only when the caller asks (``overwrite``)
and only when deltatune wrote it (it holds the :data:`MARKER` file, or an adapter manifest from
before the marker existed); a non-empty folder deltatune did not write, a file where a folder
should go, the current folder and the folders in ``protected`` (and any folder holding one) are
refused with an :class:`~deltatune.errors.OutputError` naming the path. A write that fails (disk
full) raises an ``OutputError`` and leaves the previous version in place.

A writer killed mid-way can leave its temporary folder, or — between the two renames of a replacement —
the previous version parked as ``.NAME.old-PID``. The next write to the same target (or
:func:`recover`) removes the temporary leftovers of processes that no longer exist and puts a parked
previous version back when the target is missing. New files and folders get the permissions the
umask gives.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltatune.errors import DeltaTuneError, OutputError

MARKER = ".deltatune"
"""File in every folder :func:`atomic_folder` writes: the proof that deltatune may replace it."""
LEGACY_MANIFEST = "deltatune.json"
"""An adapter manifest also proves deltatune wrote the folder (adapters written before :data:`MARKER`)."""


def _leftover_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)(-[0-9a-f]{{8}})?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(target: Path) -> list[str]:
    """Clean up after writers of ``target`` that were killed; return one line per action taken.

    Only names of deltatune's own pattern whose process id is no longer running are touched: a parked
    previous version (``.NAME.old-PID``) is renamed back onto ``target`` when ``target`` is missing and
    removed otherwise; a temporary file or folder (``.NAME.tmp-PID-…``) is removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = _leftover_pattern(target.name)
    actions: list[str] = []
    for path in sorted(target.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not target.exists() and not target.is_symlink():
            os.replace(path, target)
            actions.append(f"restored {target} from {path.name}, parked by a writer that was killed")
        else:
            _remove(path)
            actions.append(f"removed {path}, left by a writer that was killed")
    return actions


def written_by_deltatune(folder: Path) -> bool:
    """Whether ``folder`` holds deltatune's :data:`MARKER` or an adapter manifest."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    try:
        return json.loads((folder / LEGACY_MANIFEST).read_text()).get("format") == "deltatune-adapter"
    except (OSError, ValueError, AttributeError):
        return False


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def check_target(target: Path, *, overwrite: bool = False, protected: Iterable[Path] = (),
                 hint: str = "pass --overwrite to replace it") -> None:
    """Raise :class:`OutputError` unless writing the folder ``target`` loses nothing.

    ``target`` may be missing or an empty folder; a non-empty folder only with ``overwrite`` and only when
    deltatune wrote it. Never the current folder, a folder holding it, or one of ``protected`` (or a
    folder holding one of them). ``hint`` says how to ask for a replacement.
    """
    target = Path(target)
    where = target.absolute().resolve()
    if target.name in ("", ".", "..") or _contains(where, Path.cwd().resolve()):
        raise OutputError(f"refusing to write into '{target}': it is (or holds) the current folder; "
                          "name a new folder instead")
    for path in protected:
        if _contains(where, Path(path).absolute().resolve()):
            raise OutputError(f"refusing to write '{target}': it would replace {path}, which this command "
                              "needs; choose another folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"refusing to write '{target}': it exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not written_by_deltatune(target):
        raise OutputError(f"refusing to replace '{target}': it is not empty and deltatune did not write it "
                          f"(no {MARKER} marker); choose a new folder")
    if not overwrite:
        raise OutputError(f"'{target}' already exists; {hint}")


def temp_path(target: Path) -> Path:
    """A new temporary name beside ``target`` (``.NAME.tmp-PID-XXXXXXXX``), which :func:`recover` knows."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _write_failed(target: Path, existed: bool, exc: OSError) -> OutputError:
    kept = "the previous version is intact" if existed else "nothing was written"
    return OutputError(f"cannot write {target}: {exc.strerror or exc}; {kept}")


@contextmanager
def atomic_folder(target: Path, *, overwrite: bool = False, protected: Iterable[Path] = (),
                  hint: str = "pass --overwrite to replace it") -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    :func:`check_target` decides whether ``target`` may be replaced (``overwrite``, ``protected``, ``hint``
    are passed on); leftovers of killed writers are cleaned first (:func:`recover`). An exception leaves
    ``target`` as it was; an ``OSError`` (disk full) comes out as an :class:`OutputError`.
    """
    target = Path(target)
    recover(target)
    check_target(target, overwrite=overwrite, protected=protected, hint=hint)
    existed = target.exists()
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "deltatune"}) + "\n")
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if isinstance(exc, DeltaTuneError):
            raise
        raise _write_failed(target, existed, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a new temporary path beside ``target``; on success it is renamed onto ``target``.

    Leftovers of killed writers are cleaned first; an ``OSError`` comes out as an :class:`OutputError`
    and leaves ``target`` as it was.
    """
    target = Path(target)
    recover(target)
    existed = target.exists()
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        if isinstance(exc, DeltaTuneError):
            raise
        raise _write_failed(target, existed, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
