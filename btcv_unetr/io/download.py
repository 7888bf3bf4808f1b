"""Downloads of weights files: into the user's cache, once, verified by SHA-256 before anything uses them.

    fetch       the cached copy of a URL: a temporary name, the SHA-256 checked, then renamed into place
    split_url   ``URL#sha256=HEX`` (as pip writes hashes) -> the URL and its checksum
    file_sha256 the SHA-256 of a file, read in 1 MiB blocks

Downloads go to ``$XDG_CACHE_HOME/btcv-unetr/weights`` (``~/.cache`` without it; folder 0700, files 0600)
once; later runs check the file they find there against the same checksum. A download whose SHA-256
differs from the expected one is deleted before anything uses it. Where no checksum is known (none is
published), the first download's is printed and kept beside the file (``FILE.sha256``) and every later
run is checked against it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..runtime.cache import cache_folder

WEIGHTS_FOLDER = "weights"
HASH_FRAGMENT = "sha256="


def weights_folder() -> Path:
    """``$XDG_CACHE_HOME/btcv-unetr/weights`` (``~/.cache/...``), created 0700: it holds only this user's files."""
    folder = cache_folder() / WEIGHTS_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
    except OSError as exc:
        raise UserError(f"{folder}: the weights cache cannot be made ({exc.strerror}); set XDG_CACHE_HOME to a "
                        "writable folder, or download the file yourself and pass --pretrained FILE") from None
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_url(value: str) -> tuple[str, str]:
    """``URL#sha256=HEX`` -> (URL, hex); a URL without a well-formed SHA-256 is refused in one line."""
    url, _, fragment = value.partition("#")
    digest = fragment[len(HASH_FRAGMENT):].lower() if fragment.startswith(HASH_FRAGMENT) else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"--pretrained {url}: a URL needs the file's SHA-256: --pretrained '{url}#sha256=<64 hex "
                        "digits>' (sha256sum FILE gives it), or download the file yourself and pass --pretrained FILE")
    return url, digest


def fetch(url: str, name: str, sha256: str | None, label: str) -> Path:
    """The cached copy of ``url`` (``name`` in the weights folder), downloaded first when missing.

    A file found there is checked against ``sha256`` (or the checksum kept at its first download, where
    none is known); a download is checked before it is renamed into place, and deleted when it differs.
    """
    folder = weights_folder()
    path = folder / name
    pinned = path.with_name(f"{name}.sha256")
    if path.is_file():
        expected = sha256 or (pinned.read_text().strip() if pinned.is_file() else None)
        _check_cached(path, expected, label)
        if expected is None:
            _pin(pinned, file_sha256(path), label)
        return path
    _download(url, path, sha256, label)
    if sha256 is None:
        _pin(pinned, file_sha256(path), label)
    return path


def _check_cached(path: Path, expected: str | None, label: str) -> None:
    if expected is not None and file_sha256(path) != expected:
        raise UserError(f"{path}: its SHA-256 is not {expected} ({label}): the file is damaged or was replaced; "
                        "delete it and run again to download it anew")


def _pin(pinned: Path, digest: str, label: str) -> None:
    """Keep ``digest`` beside the file: later runs are checked against it."""
    print(f"{label}: no SHA-256 is published for this file; its SHA-256 is {digest} (kept in {pinned}: later runs "
          "are checked against it)")
    fd = os.open(pinned, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(digest + "\n")


def _download(url: str, path: Path, sha256: str | None, label: str) -> None:
    """MONAI's ``download_url`` (its SHA-256 check included) into a temporary folder beside ``path``, then a
    rename: an interrupted or refused download leaves nothing under ``path``'s name."""
    from monai.apps.utils import HashCheckError, download_url
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        part = staging / path.name
        print(f"{label}: downloading {url} into {path.parent}")
        try:
            # MONAI's log lines and its warning about a missing hash repeat what the lines here say.
            with _quiet("monai.apps"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No hash value provided")
                download_url(url, part, hash_val=sha256, hash_type="sha256", progress=False)
        except HashCheckError:
            raise UserError(f"{label}: the file downloaded from {url} does not have the SHA-256 {sha256}: refused "
                            "and deleted (a changed or damaged file); nothing was kept") from None
        except (OSError, RuntimeError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            raise UserError(f"{label}: cannot download {url} ({_reason(exc)}); without internet, put the file "
                            f"{path.name} into {path.parent} and run again") from None
        if not part.is_file():  # MONAI's download_url swallows permission errors
            raise UserError(f"{label}: the download of {url} left no file; put the file {path.name} into "
                            f"{path.parent} and run again")
        part.chmod(0o600)
        os.replace(part, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` silenced for the block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or str(exc) or exc.__class__.__name__
    return str(reason).strip().splitlines()[0]
