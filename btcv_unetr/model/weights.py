"""Weights into this project's UNETR: from training checkpoints, bare state dicts, old MONAI key layouts and
wrapped models (DDP, compile); TorchScript files are read, without running them, by ``torchscript.py``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from .unetr import UNUSED_PARAMETERS

# Keys of UNETR state dicts written by MONAI 0.6-0.8 (the released BTCV weights) that the current
# UNETR no longer has. None of them ever affected the output: the class token was unused without
# classification, and conv3 was a residual projection that those blocks never applied.
LEGACY_KEYS = re.compile(r"^(vit\.patch_embedding\.cls_token|encoder\d\.blocks\.\d+\.1\.conv3\.conv\.weight)$")


WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def extract_state_dict(content: Any, source: str) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint dict or a bare state dict, wrapper prefixes removed."""
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise UserError(f"{source}: neither a state dict nor a checkpoint with a 'state_dict' entry")
    state = {}
    for key, value in content.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def adapt_legacy_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an old-MONAI UNETR state dict onto the current layout.

    Drops the legacy keys the model lacks and keeps the model's own values for its unused
    parameters when the file lacks them. Any other difference is left for the strict load to report.
    """
    own = model.state_dict()
    adapted = {k: v for k, v in state.items() if k in own or not LEGACY_KEYS.match(k)}
    for key, value in own.items():
        if key not in adapted and UNUSED_PARAMETERS.search(key):
            adapted[key] = value
    return adapted


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load; a mismatch names the missing, unexpected and mis-shaped keys (never a silent partial load)."""
    state = adapt_legacy_keys(dict(state), model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {title}: {shown}")
        raise UserError(f"{source}: weights do not match the model built from the flags "
                        f"(check --feature_size/--hidden_size/--num_heads/--roi_*/--out_channels); {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load weights from our checkpoint, a bare state dict (any MONAI version) into ``model``."""
    load_weights(model, extract_state_dict(load_checkpoint(path), str(path)), str(path))
