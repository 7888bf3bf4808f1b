"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash or a full disk during a write leaves the previous file (or no file) in place, never a
truncated one. ``os.replace`` is atomic on POSIX and Windows within one filesystem.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

from .errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed onto it when the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers that pick a format from
    the extension still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TEMPORARY_GLOB = ".*.tmp*"  # the names atomic_path gives


def remove_stale_temporaries(folder: str | Path, names: Collection[str] | None = None) -> list[Path]:
    """Delete temporary files that a killed process left in ``folder`` (call it while holding its lock):
    all of them, or only those of the files ``names`` (while other processes write the others)."""
    removed = []
    for path in Path(folder).glob(TEMPORARY_GLOB):
        if names is not None and not any(_is_temporary_of(path.name, name) for name in names):
            continue
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_temporary_of(temporary: str, name: str) -> bool:
    """Whether ``temporary`` is a name :func:`atomic_path` gives for a file ``name``: "." + name + "." +
    mkstemp's random letters, digits and underscores + ".tmp" + the suffix."""
    rest = temporary.removeprefix(f".{name}.")
    return rest != temporary and re.fullmatch(r"[a-z0-9_]+\.tmp.*", rest) is not None


@contextmanager
def folder_lock(folder: str | Path, purpose: str, *, shared: bool = False, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it) for the block, or refuse in one line.

    ``shared``: a lock that other shared holders may hold too (the parts of one job array), but no
    exclusive one; ``name``: another lock file in the folder (one part's own).
    The operating system drops the lock when the process ends, however it ends, so a crashed run
    never leaves a folder locked.
    """
    folder = Path(folder)
    lock_file = folder / name
    try:
        handle = lock_file.open("a+")
    except OSError as exc:
        raise UserError(f"{folder}: cannot be written ({exc.strerror}): choose another folder") from None
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UserError(f"{folder} is in use by {owner}: wait for it to finish, or choose another folder") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{purpose} (process {os.getpid()})\n")
        handle.flush()
        yield
    finally:
        handle.close()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_nifti(image: nib.Nifti1Image, path: str | Path) -> None:
    atomic_write(path, lambda tmp: nib.save(image, tmp))
