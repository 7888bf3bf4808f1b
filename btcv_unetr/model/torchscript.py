"""What a TorchScript archive says about a UNETR, and its weights loaded into this project's UNETR.

The archive is read as data by ``btcv_unetr.io.torchscript`` (none of its code runs); here its weights, attributes
and recorded config are interpreted as UNETR settings:

    file_architecture        the UNETR settings an archive shows: from tensor shapes (hidden size, MLP size, layers,
                             feature size, channels, patches), from attributes (heads, patch grid: scripted files),
                             from the model config our export records (heads, ROI), from a traced file's example
                             input (the ROI)
    check_architecture       refuses settings that differ from the flags; returns those the file does not record
    load_torchscript_weights the weights of a TorchScript UNETR into this project's UNETR, checked as above
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..config.schema import ModelConfig
from ..errors import UserError
from ..io.torchscript import ScriptArchive, read_archive
from .weights import extract_state_dict, load_weights

PATCH = 16  # MONAI's UNETR cuts every window into 16-voxel patches along each axis


def file_architecture(archive: ScriptArchive) -> dict[str, Any]:
    """The UNETR settings the archive shows, by ModelConfig name; ``roi`` is the window shape and ``patches`` the
    number of 16-voxel patches per window (the position embeddings'), known even where the shape is not.

    Tensors give spatial_dims, in_channels, feature_size, out_channels, hidden_size, patches, pos_embed, mlp_dim,
    num_layers;
    attributes (scripted files) num_heads and the patch grid (UNETR's ``feat_size``), hence the ROI; else the config
    our export recorded its heads and ROI, and a traced file's example input its ROI. Settings the file does not
    show are absent.
    """
    weights, attributes, found = archive.weights, archive.attributes, {}
    first = weights.get("encoder1.layer.conv1.conv.weight")
    if first is not None and first.ndim in (4, 5):
        found.update(spatial_dims=first.ndim - 2, feature_size=first.shape[0], in_channels=first.shape[1])
    last = weights.get("out.conv.conv.weight")
    if last is not None and last.ndim >= 1:
        found["out_channels"] = last.shape[0]
    positions = weights.get("vit.patch_embedding.position_embeddings")
    if positions is not None and positions.ndim == 3:
        found.update(patches=positions.shape[1], hidden_size=positions.shape[2])
    if "vit.patch_embedding.patch_embeddings.weight" in weights:  # MONAI's conv embedding: one Conv3d
        found["pos_embed"] = "conv"
    elif "vit.patch_embedding.patch_embeddings.1.weight" in weights:  # perceptron: Rearrange, then Linear
        found["pos_embed"] = "perceptron"
    mlp = weights.get("vit.blocks.0.mlp.linear1.weight")
    if mlp is not None and mlp.ndim == 2:
        found["mlp_dim"] = mlp.shape[0]
    blocks = {match.group(1) for key in weights if (match := re.match(r"vit\.blocks\.(\d+)\.", key))}
    if blocks:
        found["num_layers"] = len(blocks)
    heads = {value for key, value in attributes.items() if re.fullmatch(r"vit\.blocks\.\d+\.attn\.num_heads", key)}
    recorded = archive.recorded
    if len(heads) == 1 and isinstance(next(iter(heads)), int):
        found["num_heads"] = heads.pop()
    elif isinstance(recorded.get("num_heads"), int):
        found["num_heads"] = recorded["num_heads"]
    grid, patch = attributes.get("feat_size"), attributes.get("patch_size")
    dims = found.get("spatial_dims")
    recorded_roi = tuple(recorded.get(f"roi_{axis}") for axis in "xyz"[:dims or 0])
    if isinstance(grid, (tuple, list)) and isinstance(patch, (tuple, list)) and len(grid) == len(patch) == dims:
        found["roi"] = tuple(g * p for g, p in zip(grid, patch))
    elif recorded_roi and all(isinstance(size, int) for size in recorded_roi):
        found["roi"] = recorded_roi
    elif dims is not None and archive.traced_inputs and len(archive.traced_inputs[0]) == dims + 2:
        found["roi"] = tuple(archive.traced_inputs[0][2:])
    return found


def _flag_text(key: str, value: Any) -> str:
    if key == "roi":
        return " ".join(f"--roi_{axis} {size}" for axis, size in zip("xyz", value))
    return f"--{key} {value}"


def check_architecture(archive: ScriptArchive, config: ModelConfig, source: str) -> list[str]:
    """Refuse, in one line, every UNETR setting the file shows that differs from the flags' ``config``.

    Returns what the file does not record and was therefore taken from the flags unchecked (the heads of a traced
    file; the ROI's shape where only its number of patches is known).
    """
    found = file_architecture(archive)
    flags = {key: getattr(config, key) for key in ("spatial_dims", "in_channels", "out_channels", "feature_size",
                                                   "hidden_size", "pos_embed", "mlp_dim", "num_layers",
                                                   "num_heads")}
    flags["roi"] = tuple(config.roi_size)
    differ = [key for key in flags if key in found and found[key] != flags[key]]
    flag_patches = math.prod(size // PATCH for size in config.roi_size)
    patches_differ = "roi" not in found and "patches" in found and found["patches"] != flag_patches
    if differ or patches_differ:
        in_file = [_flag_text(key, found[key]) for key in differ]
        in_flags = [_flag_text(key, flags[key]) for key in differ]
        if patches_differ:
            in_file.append(f"an ROI of {found['patches']} {PATCH}-voxel patches")
            in_flags.append(f"{_flag_text('roi', flags['roi'])} ({flag_patches} patches)")
        raise UserError(f"{source}: this TorchScript UNETR was built with {', '.join(in_file)}, the flags say "
                        f"{', '.join(in_flags)}: run with the file's settings")
    unverified = []
    if "num_heads" not in found:
        unverified.append(f"the attention heads ({_flag_text('num_heads', flags['num_heads'])})")
    if "roi" not in found:
        unverified.append(f"the ROI's shape ({_flag_text('roi', flags['roi'])}; only its number of patches is "
                          "checked)" if "patches" in found else f"the ROI ({_flag_text('roi', flags['roi'])})")
    return unverified


def load_torchscript_weights(model: nn.Module, config: ModelConfig, path: str | Path, warn: bool = True) -> None:
    """Copy the weights of a TorchScript UNETR into ``model``, this project's UNETR built from ``config``.

    Nothing of the file runs (:func:`read_archive`). Its architecture, where the file records it, must be the
    flags' (:func:`check_architecture`); what it does not record is named in a warning line (``warn``: this
    process prints it). The weights then load strictly, old MONAI key layouts adapted (``weights.load_weights``).
    """
    archive = read_archive(path)
    unverified = check_architecture(archive, config, str(path))
    if unverified and warn:
        print(f"warning: {path} does not record {' or '.join(unverified)}: taken from the flags unchecked; a model "
              "built with other values gives other masks", file=sys.stderr)
    load_weights(model, extract_state_dict(archive.weights, str(path)), str(path))
