"""Checkpoint files: one versioned dict that resumes a run, verified by a checksum of its weights.

    save_checkpoint   {"version", "checksum", "state_dict", "optimizer", ..., "config", "precision", "model_card"},
                      atomically
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
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, config_from_dict, migrate, split_unknown_keys
from ..errors import UserError
from ..files import atomic_write

# 0: files written before versioning (no "version" key); 1: "version" and "checksum" added.
CHECKPOINT_VERSION = 1

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


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, precision, epoch: int,
                    global_step: int, best_acc: float, config: Config, card: Mapping[str, Any] | None = None) -> None:
    """One dict that resumes everything; plain values only, so ``weights_only=True`` loads it.

    ``config`` holds the settings as asked (``precision: auto``, ``time_budget_min``, and the
    ``max_epochs`` a budget fixed); ``precision`` the one this run resolved, with its reason;
    ``card`` the model card (:func:`btcv_unetr.model.provenance.model_card`: the data, the validation ...).
    Written to a temporary name and renamed: a failed write (a full disk) leaves the previous file.
    """
    weights = model.state_dict()
    state = {"version": CHECKPOINT_VERSION, "checksum": weights_checksum(weights),
             "epoch": epoch, "global_step": global_step, "best_acc": float(best_acc),
             "state_dict": weights, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
             "config": config.to_dict(), "precision": precision.as_dict(),
             "model_card": dict(card) if card is not None else None}
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its zip writer
        raise UserError(f"{path}: the checkpoint could not be written ({_first_line(exc)}); the previous file "
                        "is unchanged: free some disk space or choose another --logdir") from None


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
    handled when it is read: :func:`stored_config`)."""
    content = dict(content)
    version = int(content.get("version", 0))
    if version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint version {version} is newer than this btcv-unetr understands "
                        f"({CHECKPOINT_VERSION}): upgrade btcv-unetr")
    if version == 0:
        # Version 0 had no checksum; its AMP setting lives in config.train.amp (renamed to precision).
        content.setdefault("precision", None)
    content.setdefault("model_card", None)  # files written before model cards existed have none
    content["version"] = CHECKPOINT_VERSION
    return content


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint, migrated to the current version and verified; bare state dicts are returned as read.

    A checkpoint dict's ``best_acc`` becomes a plain float (the reference's is a numpy float).
    """
    content = load_file(path)
    if not (isinstance(content, dict) and isinstance(content.get("state_dict"), Mapping)):
        return content
    content = migrate_checkpoint(content)
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
