"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash or a full disk during a write leaves the previous file (or no file) in place, never a
truncated one. ``os.replace`` is atomic on POSIX and Windows within one filesystem.

Nothing here writes through a symbolic link: temporaries are created exclusively (``O_EXCL``, which
also refuses a link at the name) and renamed over the final name, which replaces a link there rather
than its target; lock files are opened with ``O_NOFOLLOW`` and must be plain files of their own.
A full disk (or quota) is :class:`DiskFull`: one line naming the file and the space left.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

from .errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that hide the errno (SimpleITK, torch.save raise RuntimeError) failed for lack of space when
# less than this is left where they wrote.
NEARLY_FULL_BYTES = 1 << 20


class DiskFull(UserError):
    """No space (or quota) left for a file: nothing more can be written there, so a run stops at once."""


def free_space(path: Path) -> int | None:
    """Bytes free to this user on the filesystem of ``path`` (its nearest existing folder), or None."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _size(count: int | None) -> str:
    """``count`` bytes for people: ``0 B``, ``12.5 MiB``."""
    if count is None:
        return "unknown space"
    if count < 1024:
        return f"{count} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def disk_full(path: Path, exc: BaseException, action: str = "not written") -> DiskFull | None:
    """The one-line :class:`DiskFull` for a failed write of ``path`` (``action``: what did not happen), or None
    when ``exc`` is not a lack of space: an ``OSError`` with ENOSPC/EDQUOT, or a ``RuntimeError`` (a writer that
    hides the errno) while under :data:`NEARLY_FULL_BYTES` are free."""
    if isinstance(exc, OSError) and exc.errno not in DISK_FULL_ERRNOS:
        return None
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    free = free_space(path.parent)
    if isinstance(exc, RuntimeError) and (free is None or free >= NEARLY_FULL_BYTES):
        return None
    what = "over the disk quota" if isinstance(exc, OSError) and exc.errno == errno.EDQUOT else "the disk is full"
    return DiskFull(f"{path}: {action}, {what} ({_size(free)} free there): free some space or write to "
                    "another folder")


def make_folder(path: Path, mode: int = 0o777) -> None:
    """``mkdir -p path``; a full disk is :class:`DiskFull`, other failures stay ``OSError`` for the caller
    to word (which flag names the folder)."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_full(path, exc, "not created") or exc from None


def _create_temporary(path: Path) -> Path:
    """A new empty file (0600) beside ``path``, named ``.NAME.RANDOM.tmpSUFFIX``: created exclusively and without
    following links (``O_CREAT | O_EXCL | O_NOFOLLOW``), so that nothing existing is ever opened."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, flags, 0o600))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise disk_full(path, exc) or exc from None
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed onto it when the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers that pick a format from
    the extension still do the right thing. A symbolic link at ``path`` is replaced by the file (its
    target is left alone); a folder there is refused in one line. Running out of space anywhere in the
    block raises :class:`DiskFull` and leaves no temporary.
    """
    path = Path(path)
    make_folder(path.parent)
    tmp = _create_temporary(path)
    try:
        try:
            yield tmp
        except Exception as exc:  # noqa: BLE001 - only a lack of space is reworded; the rest is re-raised
            raise disk_full(path, exc) or exc
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise UserError(f"{path} is a folder: remove it, or write to another name") from None
        except OSError as exc:
            raise disk_full(path, exc) or exc from None
    finally:
        tmp.unlink(missing_ok=True)


TEMPORARY_GLOB = ".*.tmp*"  # the names atomic_path gives


def remove_stale_temporaries(folder: str | Path, names: Collection[str] | None = None) -> list[Path]:
    """Delete temporary files that a killed process left in ``folder`` (call it while holding its lock):
    all of them, or only those of the files ``names`` (while other processes write the others).
    Only plain files are removed: :func:`atomic_path` never makes a link or a folder."""
    removed = []
    for path in Path(folder).glob(TEMPORARY_GLOB):
        if names is not None and not any(_is_temporary_of(path.name, name) for name in names):
            continue
        try:
            plain = stat.S_ISREG(path.lstat().st_mode)
        except FileNotFoundError:
            continue
        if plain:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_temporary_of(temporary: str, name: str) -> bool:
    """Whether ``temporary`` is a name :func:`atomic_path` gives for a file ``name``: "." + name + "." +
    random letters, digits and underscores + ".tmp" + the suffix."""
    rest = temporary.removeprefix(f".{name}.")
    return rest != temporary and re.fullmatch(r"[a-z0-9_]+\.tmp.*", rest) is not None


def _open_lock_file(lock_file: Path) -> int:
    """The lock file's descriptor, opened for reading and writing without following a link (``O_NOFOLLOW``;
    ``O_NONBLOCK`` so that a FIFO there cannot hang the open); refused unless it is a plain file with no other
    name (a hard link would have another file truncated)."""
    folder = lock_file.parent
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_file, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{lock_file} is a symbolic link: remove it (the lock is never written through a link), "
                            "or choose another folder") from None
        raise disk_full(lock_file, exc) or UserError(
            f"{folder}: cannot be written ({exc.strerror}): choose another folder") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        kind = "not a plain file" if not stat.S_ISREG(info.st_mode) else f"a file with {info.st_nlink} names"
        raise UserError(f"{lock_file} is {kind}: remove it (the lock is written there), or choose another folder")
    os.set_blocking(fd, True)
    return fd


@contextmanager
def folder_lock(folder: str | Path, purpose: str, *, shared: bool = False, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file in it) for the block, or refuse in one line.

    ``shared``: a lock that other shared holders may hold too (the parts of one job array), but no
    exclusive one; ``name``: another lock file in the folder (one part's own).
    The operating system drops the lock when the process ends, however it ends, so a crashed run
    never leaves a folder locked. The lock file is reused from run to run, so it cannot be created
    exclusively; it is opened without following links and must be a plain file (:func:`_open_lock_file`).
    """
    folder = Path(folder)
    lock_file = folder / name
    handle = os.fdopen(_open_lock_file(lock_file), "r+")
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise UserError(f"{folder} is in use by {owner}: wait for it to finish, or choose another folder") \
                from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{purpose} (process {os.getpid()})\n")
            handle.flush()
        except OSError as exc:
            raise disk_full(lock_file, exc) or exc from None
        yield
    finally:
        try:
            handle.close()
        except OSError:  # the purpose line could not be flushed (a full disk): already reported
            pass


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
