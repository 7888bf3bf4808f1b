"""Models for inference: from a training checkpoint (with the architecture and preprocessing it stores), a bare state
dict, a TorchScript file's weights, or an ensemble's members."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.schema import PREPROCESSING, SECTIONS, Config
from ..io.checkpoint import is_torchscript, load_checkpoint, stored_card, stored_config, weights_checksum
from ..model.build import build_model
from ..model.pretrained import REFERENCE_INFERENCE, REFERENCE_PREPROCESSING
from ..model.torchscript import load_torchscript_model
from ..model.weights import extract_state_dict, load_weights
from ..runtime.precision import runs_natively
from .ensemble import check_compatible, member_files


def with_weights_file(config: Config, path: Path) -> Config:
    """``config`` with its model's weights read from ``path``: a training checkpoint or a state dict, or a
    TorchScript file (told by its content), whose weights go into the network it records or the config builds."""
    saved = "torchscript" if path.is_file() and is_torchscript(path) else config.infer.saved_checkpoint
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, pretrained_dir=str(path.parent), pretrained_model_name=path.name),
        infer=dataclasses.replace(config.infer, saved_checkpoint=saved))


# What weights without stored preprocessing are run with: the reference recipe's (MONAI research-contributions
# UNETR/BTCV), which its released weights were trained and evaluated with, per section.
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {"data": REFERENCE_PREPROCESSING, "infer": REFERENCE_INFERENCE}
# What the reference's values mean, for the line that says they were applied.
_MEANING = {"crop_before_resampling": "the whole scan resampled first", "mode": "windows weighed equally"}


def _override_flag(section: str, key: str) -> str:
    """The flag that gives ``key`` this project's default back (``--crop_before_resampling``, ``--mode gaussian``)."""
    default = getattr(SECTIONS[section](), key)
    if isinstance(default, bool):
        return f"--{key}" if default else f"--no-{key}"
    return f"--{key} {default}"


def with_reference_settings(config: Config, path: Path) -> Config:
    """``config`` for weights that store no preprocessing (a bare state dict, as the released reference weights
    are): the reference recipe's settings where this project's defaults differ from them (it resamples the whole
    scan before cropping the body, and blends windows with constant weights), said in one line.

    Only keys still at their default are replaced: a value the user set (a flag, a YAML file) or a
    ``--pretrained`` source stated (``config.explicit``) wins. 2D models are left alone: the recipe is for CT
    volumes, and a picture is resized to one window, so neither setting applies.
    """
    if config.model.spatial_dims != 3:
        return config
    applied: dict[str, dict[str, Any]] = {}
    for section, reference in REFERENCE_SETTINGS.items():
        current, default = getattr(config, section), SECTIONS[section]()
        applied[section] = {key: value for key, value in reference.items() if key not in config.explicit
                            and getattr(current, key) == getattr(default, key) != value}
    changes = [(section, key, value) for section, values in applied.items() for key, value in values.items()]
    if not changes:
        return config
    settings = ", ".join(f"{key} {value}" + (f" ({_MEANING[key]})" if key in _MEANING else "")
                         for _, key, value in changes)
    flags = " ".join(_override_flag(section, key) for section, key, _ in changes)
    print(f"{path} stores no preprocessing (a bare state dict, as the released reference weights are): using the "
          f"reference recipe's, which such weights were trained with: {settings}; to override, give {flags}")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)
                                          for section, values in applied.items() if values})


@dataclass
class LoadedModel:
    """A model ready for inference, the config it implies, and what its file says about it."""

    model: nn.Module
    config: Config
    card: dict | None  # the checkpoint's model card; None for files written without one
    weights_checksum: str  # SHA-256 of the weights (checkpoint.weights_checksum): the one the file stores, if any


def load_inference_model(config: Config, device: torch.device) -> tuple[nn.Module, Config]:
    """The model and the config it implies (:func:`load_model` without the card and checksum)."""
    loaded = load_model(config, device)
    return loaded.model, loaded.config


def load_model(config: Config, device: torch.device) -> LoadedModel:
    """The model (and the config it implies) from our checkpoint, a bare state dict or a TorchScript file.

    A training checkpoint carries its config: its architecture and preprocessing are used, so
    ``test.py`` on a run folder needs no repeat of the training flags. Its precision setting too, when
    ``--precision`` is left at auto and that precision is fast on ``device``. A TorchScript file gives
    its weights to the network its recorded config names (our export of a network other than UNETR), else to the
    one built from the flags, read from its archive without running any of its code (``io/torchscript.py``); a
    UNETR architecture the file shows that differs from the flags is refused.
    A bare state dict stores no preprocessing: it runs with the reference recipe's where the user set none
    (:func:`with_reference_settings`).
    """
    path = Path(config.train.pretrained_dir) / config.train.pretrained_model_name
    if config.infer.saved_checkpoint == "torchscript":
        # A file our export wrote for another network than UNETR records it: that network is built (as a
        # checkpoint's stored architecture is); a UNETR is the flags', checked against the file's tensor shapes.
        model, model_config = load_torchscript_model(config.model, config.data.pixdim, path)
        config = dataclasses.replace(config, model=model_config)
        return LoadedModel(model.to(device).eval(), config, None, weights_checksum(model.state_dict()))
    content = load_checkpoint(path)
    trained = stored_config(content, str(path)) if isinstance(content, dict) else None
    if trained is not None:
        # The model only works on data prepared as it was trained: the checkpoint's preprocessing wins.
        preprocessing = {key: getattr(trained.data, key) for key in PREPROCESSING}
        train = config.train
        if train.precision == "auto" and runs_natively(trained.train.precision, device):
            train = dataclasses.replace(train, precision=trained.train.precision)
        config = dataclasses.replace(config, model=trained.model, train=train,
                                     data=dataclasses.replace(config.data, **preprocessing))
        print(f"using the architecture and preprocessing stored in {path}")
    else:
        config = with_reference_settings(config, path)
    model = build_model(config.model, config.data.pixdim)
    load_weights(model, extract_state_dict(content, str(path)), str(path))
    stored = content.get("checksum") if isinstance(content, dict) else None  # verified by load_checkpoint
    checksum = stored if isinstance(stored, str) else weights_checksum(model.state_dict())
    return LoadedModel(model.to(device).eval(), config, stored_card(content), checksum)


def load_members(config: Config, device: torch.device) -> tuple[list[Path], list[LoadedModel]]:
    """The weights files and models of ``config``: the ``--checkpoints`` ensemble's (each file as :func:`load_model`
    reads it, TorchScript told by its content), else the one ``pretrained_dir/pretrained_model_name``. Each member
    keeps the network its checkpoint stores (they may differ); a member whose preprocessing, dimensions, channels or
    classes differ from the first's is refused in one line (:func:`~.ensemble.check_compatible`)."""
    if not config.infer.checkpoints:
        return [Path(config.train.pretrained_dir) / config.train.pretrained_model_name], [load_model(config, device)]
    files = member_files(config.infer.checkpoints)
    members: list[LoadedModel] = []
    for path in files:
        member = load_model(with_weights_file(config, path), device)
        if members:
            check_compatible(files[0], members[0].config, path, member.config)
        members.append(member)
    return files, members
