"""Checkpoint files: one versioned dict that resumes a run, verified by checksums of everything it stores.

    write_checkpoint  {"version", "checksum", "content_checksums", "state_dict", "optimizer", ..., "config",
                      "precision", "model_card"}, atomically; save_checkpoint builds that dict from the objects
    weights_checksum  SHA-256 of the weights alone: the model's identity (masks' provenance, ensembles)
    seal              a checkpoint dict with its checksums (weights and every other entry) filled in
    altered_entries   the entries of a loaded checkpoint that do not match their stored checksums
    load_file         ``torch.load(weights_only=True)``: data only, never code (TorchScript files are refused)
    load_checkpoint   load_file + migration of older versions + checksum verification
    stored_config     the run's config from a checkpoint, tolerating keys this version no longer has
    stored_card       the model card of a checkpoint (provenance.model_card), None for files without one

Used by training, inference and export alike. Files are only ever read with ``weights_only=True``; the
few numpy globals the reference trainer's checkpoints carry (its ``best_acc`` is a numpy float) are
allowed as data.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config.load import config_from_dict, split_unknown_keys
from ..config.migration import migrate
from ..config.schema import Config
from ..errors import UserError
from ..files import atomic_write

# 0: files written before versioning (no "version" key); 1: "version" and "checksum" (of the weights) added;
# 2: "content_checksums" added: one SHA-256 per other entry (config, optimiser, scheduler, scaler, epoch
# counters, model card, and "version" and "checksum" themselves), so a file altered anywhere is refused.
CHECKPOINT_VERSION = 2
CONTENT_CHECKSUMS = "content_checksums"
# Entries not in CONTENT_CHECKSUMS: the weights are covered by "checksum" (which is itself covered).
_NOT_COVERED = ("state_dict", CONTENT_CHECKSUMS)
# How an altered entry is named to the user; other keys by their own name.
_ENTRY_NAMES = {"config": "config", "optimizer": "optimiser state", "scheduler": "learning-rate schedule state",
                "scaler": "gradient-scaler state", "precision": "precision", "model_card": "model card",
                "epoch": "epoch counter", "global_step": "step counter", "best_acc": "best score",
                "version": "version", "checksum": "weights checksum", CONTENT_CHECKSUMS: "checksums"}

# The globals a reference-trainer checkpoint needs for its numpy ``best_acc``, under the names numpy 1
# and numpy 2 pickle them: plain data, safe to rebuild.
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
NUMPY_SCALAR_GLOBALS = [(_MULTIARRAY.scalar, "numpy.core.multiarray.scalar"),
                        (_MULTIARRAY.scalar, "numpy._core.multiarray.scalar"), np.dtype,
                        *(getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType")
                          if hasattr(np, "dtypes"))]


def weights_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor (order-independent of the dict)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.contiguous().reshape(-1)  # stride 1 even where a size-1 axis has another stride
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _put(digest: Any, tag: bytes, *parts: bytes) -> None:
    """A type tag, then each part prefixed by its length: no two different values feed the same bytes."""
    digest.update(tag)
    for part in parts:
        digest.update(b"%d:" % len(part))
        digest.update(part)


def _feed(digest: Any, value: Any) -> None:
    """``value`` in a canonical form: tensors by dtype, shape and bytes; mappings with their keys sorted (so the
    order of a dict does not matter); lists and tuples alike; plain values as JSON. Anything else (which
    ``save_checkpoint`` never stores) raises TypeError."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        flat = tensor.contiguous().reshape(-1)  # stride 1 even where a size-1 axis has another stride
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        _put(digest, b"T", f"{tensor.dtype}|{tuple(tensor.shape)}".encode(), data)
    elif isinstance(value, Mapping):
        keys = sorted(value, key=lambda key: (type(key).__name__, repr(key)))  # int and str keys (optimiser state)
        _put(digest, b"D", str(len(keys)).encode())
        for key in keys:
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        _put(digest, b"L", str(len(value)).encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        _put(digest, b"J", json.dumps(value).encode())  # floats as their shortest exact repr; NaN as NaN
    elif isinstance(value, bytes):
        _put(digest, b"B", value)
    elif isinstance(value, np.generic):  # a numpy scalar in a card or counter: as the plain value it equals
        _feed(digest, value.item())
    else:
        raise TypeError(f"a checkpoint entry holds a {type(value).__name__}, which has no canonical form")


def value_checksum(value: Any) -> str:
    """SHA-256 of ``value``'s canonical form (:func:`_feed`): equal for equal content, however it was pickled."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a checkpoint dict with "state_dict") with "checksum" (its weights) and "content_checksums"
    (every other entry, "checksum" included) set: together they cover everything the file stores."""
    state = {key: value for key, value in state.items() if key != CONTENT_CHECKSUMS}
    state["checksum"] = weights_checksum(state["state_dict"])
    state[CONTENT_CHECKSUMS] = {key: value_checksum(value) for key, value in state.items() if key not in _NOT_COVERED}
    return state


def altered_entries(content: Mapping[str, Any]) -> list[str]:
    """The entries of a version-2 checkpoint dict that differ from what was saved (sorted): those whose checksum
    does not match, and those added or removed since (an entry without a checksum, a checksum without its entry).
    The weights are checked against "checksum" separately (:func:`load_checkpoint`)."""
    stored = content.get(CONTENT_CHECKSUMS)
    if not isinstance(stored, Mapping):
        return [CONTENT_CHECKSUMS]
    covered = [key for key in content if key not in _NOT_COVERED]
    altered = [str(key) for key in set(stored).symmetric_difference(covered)]
    for key in covered:
        if key not in stored:
            continue
        try:
            if value_checksum(content[key]) != stored[key]:
                altered.append(str(key))
        except TypeError:  # a value save_checkpoint never writes: the file was altered
            altered.append(str(key))
    return sorted(altered)


def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint dict (``state_dict``, and any plain values: ``weights_only=True`` loads it) with its
    version and checksums (:func:`seal`), to a temporary name then renamed: a failed write (a full disk) leaves the
    previous file, and says so in one line."""
    sealed = seal({"version": CHECKPOINT_VERSION, **state})
    try:
        atomic_write(path, lambda tmp: torch.save(sealed, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its zip writer
        raise UserError(f"{path}: the checkpoint could not be written ({_first_line(exc)}); the previous file "
                        "is unchanged: free some disk space or choose another --logdir") from None


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, precision, epoch: int,
                    global_step: int, best_acc: float, config: Config, card: Mapping[str, Any] | None = None) -> None:
    """The checkpoint training writes (``train.loop.fit`` builds the same dict), from the objects themselves:
    one dict that resumes everything.

    ``config`` holds the settings as asked (``precision: auto``, ``time_budget_min``, and the
    ``max_epochs`` a budget fixed); ``precision`` the one this run resolved, with its reason;
    ``card`` the model card (:func:`btcv_unetr.train.card.model_card`: the data, the validation ...).
    """
    write_checkpoint(path, {"epoch": epoch, "global_step": global_step, "best_acc": float(best_acc),
                            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
                            "config": config.to_dict(), "precision": precision.as_dict(),
                            "model_card": dict(card) if card is not None else None})


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0] if lines else ''}"


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU with one-line errors for user mistakes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if is_torchscript(path):
        raise UserError(f"{path}: this is a TorchScript file: use --resume_jit (training) or "
                        "--saved_checkpoint torchscript (inference)")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__})") from None
        raise UserError(f"{path}: refused to load, the file needs arbitrary code to unpickle (weights_only=True); "
                        "re-save it as a plain state dict (torch.save(model.state_dict(), ...))") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def migrate_checkpoint(content: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict of any earlier version in the current layout (the config's renamed keys are
    handled when it is read: :func:`stored_config`). Its checksums are checked before, on the file's own
    content (:func:`load_checkpoint`): a migrated dict no longer matches its "content_checksums"."""
    content = dict(content)
    version = stored_version(content)
    if version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint version {version} is newer than this btcv-unetr understands "
                        f"({CHECKPOINT_VERSION}): upgrade btcv-unetr")
    if version == 0:
        # Version 0 had no checksum; its AMP setting lives in config.train.amp (renamed to precision).
        content.setdefault("precision", None)
    # Version 1 checksummed the weights only; nothing else of its layout changed.
    content.setdefault("model_card", None)  # files written before model cards existed have none
    content["version"] = CHECKPOINT_VERSION
    return content


def stored_version(content: Mapping[str, Any], source: str | Path = "checkpoint") -> int:
    """The layout version a checkpoint dict says it has (0: none); one that is not a number is corruption."""
    version = content.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{source}: the stored version is {version!r}, not a number: the file is corrupt or was "
                        "altered, and is not used; use another copy (model_final.pt / model.pt) or train again")
    return version


def verify_entries(content: Mapping[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a checkpoint dict whose entries other than the weights were altered (version 2 and
    later, or any file carrying "content_checksums"); version-1 files are told to be checked in part."""
    version = stored_version(content, path)
    if version < 2 and CONTENT_CHECKSUMS not in content:
        if version == 1:
            print(f"note: {path}: a version-1 checkpoint: only its weights carry a checksum; its config, optimiser "
                  "state and model card cannot be checked (a run resumed from it saves them with one)",
                  file=sys.stderr)
        return
    if not isinstance(content.get(CONTENT_CHECKSUMS), Mapping):
        raise UserError(f"{path}: a version-{version} checkpoint without the checksums of its contents: the file is "
                        "corrupt or was altered, and is not used; use another copy (model_final.pt / model.pt) or "
                        "train again")
    altered = [_ENTRY_NAMES.get(key, key) for key in altered_entries(content)]
    if altered:
        what = altered[0] if len(altered) == 1 else f"{', '.join(altered[:-1])} and {altered[-1]}"
        match = "does not match the checksum saved with it" if len(altered) == 1 else \
            "do not match the checksums saved with them"
        raise UserError(f"{path}: its stored {what} {match}: the file is corrupt or was altered, and is not used; "
                        "use another copy (model_final.pt / model.pt) or train again")


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint, verified and migrated to the current version; bare state dicts are returned as read.

    Version 2 and later: every entry is checked against its stored checksum, the weights against
    "checksum"; version 1: the weights only; version 0 and reference files: nothing (they store none).
    A checkpoint dict's ``best_acc`` becomes a plain float (the reference's is a numpy float).
    """
    content = load_file(path)
    if not (isinstance(content, dict) and isinstance(content.get("state_dict"), Mapping)):
        return content
    stored_version(content, path)
    migrated = migrate_checkpoint(content)  # first: a newer version is refused as such, not as corrupt
    verify_entries(content, path)
    content = migrated
    if "best_acc" in content:
        content["best_acc"] = float(content["best_acc"])
    expected = content.get("checksum")
    if expected is not None and weights_checksum(content["state_dict"]) != expected:
        raise UserError(f"{path}: the weights do not match the checksum stored with them: the file is corrupt; "
                        "use another copy (model_final.pt / model.pt)")
    return content


def stored_config(content: Mapping[str, Any], source: str) -> Config | None:
    """The config a checkpoint was trained with, or None; keys this version does not know are dropped
    with one warning line (they cannot matter to the model built from the keys it knows)."""
    raw = content.get("config")
    if not isinstance(raw, Mapping):
        return None
    known, dropped = split_unknown_keys(migrate(dict(raw)))
    config = config_from_dict(known)
    if dropped:
        print(f"warning: {source}: ignoring config keys this version does not use: {', '.join(dropped)}",
              file=sys.stderr)
    return config


def stored_card(content: Any) -> dict[str, Any] | None:
    """The model card of a loaded checkpoint, or None (a bare state dict, a file written before cards)."""
    card = content.get("model_card") if isinstance(content, Mapping) else None
    return dict(card) if isinstance(card, Mapping) else None
