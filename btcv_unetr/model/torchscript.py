"""What a TorchScript archive says about its network, and its weights loaded into this project's network.

The archive is read as data by ``btcv_unetr.io.torchscript`` (none of its code runs). An archive whose recorded
config (``btcv-unetr export``) names another network than UNETR is built from that config; a UNETR's weights,
attributes and recorded config are interpreted as UNETR settings (the released file records none):

    file_architecture        the UNETR settings an archive shows: from tensor shapes (hidden size, MLP size, layers,
                             feature size, channels, patches), from attributes (heads, patch grid: scripted files),
                             from the model config our export records (heads, ROI), from a traced file's example
                             input (the ROI)
    check_architecture       refuses settings that differ from the flags; returns those the file does not record
    recorded_model           the model config (and grid spacing) our export recorded, or None
    load_torchscript_weights the weights of a TorchScript file into the network built from the flags, checked
    load_torchscript_model   the network a TorchScript file holds: its recorded one, else the flags' (inference)
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..config.load import config_from_dict, split_unknown_keys
from ..config.migration import migrate
from ..config.schema import MODEL_SETTINGS, ModelConfig
from ..errors import UserError
from ..io.torchscript import RECORDED_SPACING, ScriptArchive, read_archive
from .architectures import ARCHITECTURES
from .build import build_model
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


# Settings that change no weight (dropout, gradient checkpointing): a file may be finetuned with other values.
WEIGHT_NEUTRAL = ("dropout_rate", "dropout_path_rate", "use_checkpoint")


def recorded_model(archive: ScriptArchive, source: str) -> tuple[ModelConfig, tuple[float, ...] | None] | None:
    """The model config our export recorded in the archive (keys of older versions migrated, of newer ones
    dropped) and the grid spacing (mm per voxel) it was built for, where recorded; None for other files."""
    recorded = archive.recorded
    if not recorded:
        return None
    known, _ = split_unknown_keys(migrate({"model": dict(recorded)}))
    try:
        model = config_from_dict(known).model
    except UserError as exc:
        raise UserError(f"{source}: the model config this TorchScript file records is not valid ({exc}); export "
                        "it again") from None
    spacing = recorded.get(RECORDED_SPACING)
    if spacing is None:
        return model, None
    if not (isinstance(spacing, list) and len(spacing) == model.spatial_dims
            and all(isinstance(s, (int, float)) and s > 0 for s in spacing)):
        raise UserError(f"{source}: the grid spacing this TorchScript file records ({spacing!r}) is not "
                        f"{model.spatial_dims} positive numbers; export it again")
    return model, tuple(float(s) for s in spacing)


def _title(name: str) -> str:
    return ARCHITECTURES[name].title


def _check_recorded_settings(recorded: ModelConfig, config: ModelConfig, source: str) -> None:
    """Refuse, in one line, the settings of the recorded network that change its weights and differ from the
    flags' (a CNN or Swin UNETR takes windows of any valid ROI, so the ROI is not compared)."""
    owned = [key for key, owners in MODEL_SETTINGS.items() if config.model_name in owners and key not in WEIGHT_NEUTRAL]
    keys = ["spatial_dims", "in_channels", "out_channels", *owned]
    differ = [key for key in keys if getattr(recorded, key) != getattr(config, key)]
    if differ:
        in_file = ", ".join(_flag_text(key, getattr(recorded, key)) for key in differ)
        in_flags = ", ".join(_flag_text(key, getattr(config, key)) for key in differ)
        raise UserError(f"{source}: this TorchScript {_title(config.model_name)} was built with {in_file}, the flags "
                        f"say {in_flags}: run with the file's settings")


def _load_strictly(model: nn.Module, weights: dict[str, Any], source: str, built_from: str) -> None:
    """Every weight of the file into ``model``, or one line naming the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    problems = {"missing": [k for k in own if k not in weights], "unexpected": [k for k in weights if k not in own],
                "wrong shape (file vs model)": shapes}
    parts = [f"{len(keys)} {title}: {', '.join(keys[:4])}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
             for title, keys in problems.items() if keys]
    if parts:
        raise UserError(f"{source}: its weights are not those of the {built_from} ({'; '.join(parts)}): the file "
                        "holds another network; export it again from its checkpoint")
    model.load_state_dict(weights, strict=True)


def load_archive_weights(model: nn.Module, config: ModelConfig, archive: ScriptArchive, source: str,
                         warn: bool = True) -> None:
    """The weights of ``archive`` (read from ``source``) into ``model``, the network built from ``config``.

    A network the archive records must be the flags' (its name, and the settings that shape its weights); a
    UNETR's architecture is also read from its tensor shapes (:func:`check_architecture`), and what the file does
    not show is named in a warning line (``warn``: this process prints it). The weights load strictly (a UNETR's
    old MONAI key layouts adapted, ``weights.load_weights``).
    """
    recorded = recorded_model(archive, source)
    if recorded is not None and recorded[0].model_name != config.model_name:
        name = recorded[0].model_name
        raise UserError(f"{source}: this TorchScript file holds a {_title(name)} (its recorded config), the flags "
                        f"build a {_title(config.model_name)}: run with --model_name {name} and the file's settings")
    if config.model_name == "unetr":
        unverified = check_architecture(archive, config, source)
        if unverified and warn:
            print(f"warning: {source} does not record {' or '.join(unverified)}: taken from the flags unchecked; a "
                  "model built with other values gives other masks", file=sys.stderr)
        load_weights(model, extract_state_dict(archive.weights, source), source)
        return
    if recorded is not None:
        _check_recorded_settings(recorded[0], config, source)
    elif warn:
        print(f"warning: {source} records no model config (it was not written by btcv-unetr export): the "
              f"{_title(config.model_name)} of the flags is assumed, its weights checked strictly", file=sys.stderr)
    built_from = f"{_title(config.model_name)} " + ("its recorded config builds" if recorded else "the flags build")
    _load_strictly(model, extract_state_dict(archive.weights, source), source, built_from)


def load_torchscript_weights(model: nn.Module, config: ModelConfig, path: str | Path, warn: bool = True) -> None:
    """Copy the weights of a TorchScript file into ``model``, the network built from ``config`` (the flags), as
    :func:`load_archive_weights` checks them. Nothing of the file runs (:func:`read_archive`)."""
    load_archive_weights(model, config, read_archive(path), str(path), warn)


def load_torchscript_model(config: ModelConfig, spacing: tuple[float, ...], path: str | Path
                           ) -> tuple[nn.Module, ModelConfig]:
    """The network of a TorchScript file with its weights, and its model config, for inference.

    A file whose recorded config names another network than UNETR is built from that config (and the grid
    spacing it records, which plans DynUNet; else ``spacing``), whatever the flags say, as a training checkpoint's
    stored architecture is; any other file gives its weights to the network the flags' ``config`` builds, checked
    (:func:`load_archive_weights`)."""
    archive = read_archive(path)
    recorded = recorded_model(archive, str(path))
    if recorded is not None and recorded[0].model_name != "unetr":
        config, spacing = recorded[0], recorded[1] or spacing
        print(f"using the architecture recorded in {path}: {_title(config.model_name)}")
    model = build_model(config, spacing)
    load_archive_weights(model, config, archive, str(path))
    return model, config
