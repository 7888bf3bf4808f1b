"""``--pretrained NAME_OR_URL``: released weights by name, a URL, a file or a MONAI bundle, made a local
verified file that training finetunes from (as ``--resume_ckpt`` does) and inference and export load.

    RELEASED             the table: name -> address, SHA-256 (None where none is published), architecture
    resolve_pretrained   the config with ``pretrained_dir``/``pretrained_model_name`` naming that file, and the
                         architecture and preprocessing its source states

Downloads (``btcv_unetr.io.download``) go to the user's cache once, checked against their SHA-256; a URL needs
its checksum given with it (``URL#sha256=HEX``): a file from an arbitrary address is never trusted blindly.

No SHA-256 is published for any of the released weights (the research-contributions READMEs give only the
addresses). Their entries have none: the first download's SHA-256 is printed and kept beside the file
(``FILE.sha256``), and every later run is checked against it. The file is a state dict read with
``torch.load(weights_only=True)`` (data, never code) into a network of the table's architecture, strictly:
a file that is not those weights is refused whatever its checksum.

The self-supervised encoders (``--use_ssl_pretrained``) are encoder-only files, not whole networks: their table
is ``ssl.py``'s ``SSL_ENCODERS``. docs/pretrained.md lists both tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.load import config_from_dict
from ..config.schema import Config
from ..errors import UserError
from ..io.bundle import is_bundle, read_bundle
from ..io.download import fetch, split_url
from .ssl import ssl_start_conflict

# The reference UNETR/BTCV recipe's model and preprocessing (MONAI research-contributions UNETR/BTCV).
REFERENCE_UNETR = {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, "roi_x": 96, "roi_y": 96, "roi_z": 96,
                   "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "num_layers": 12,
                   "pos_embed": "perceptron", "norm_name": "instance", "conv_block": True, "res_block": True}
REFERENCE_PREPROCESSING = {"a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "space_x": 1.5,
                           "space_y": 1.5, "space_z": 2.0, "axcodes": "RAS",
                           # the reference recipe crops the body after resampling (CropForegroundd after Spacingd)
                           "crop_before_resampling": False}
# The Swin UNETR/BTCV recipe's model (research-contributions SwinUNETR/BTCV main.py and README: SwinUNETR(in_channels=1,
# out_channels=14, feature_size=48), 96^3 windows, MONAI's default instance norm, the v1 blocks); its preprocessing
# is the UNETR recipe's (the same data_utils.py: Orientation RAS, Spacing 1.5/1.5/2.0, ScaleIntensityRange -175..250
# to 0..1, CropForeground after resampling). Drop-path rate and gradient checkpointing are training choices, left
# to the user.
REFERENCE_SWIN_UNETR = {"model_name": "swin_unetr", "spatial_dims": 3, "in_channels": 1, "out_channels": 14,
                        "roi_x": 96, "roi_y": 96, "roi_z": 96, "feature_size": 48, "norm_name": "instance",
                        "use_v2": False}
SWIN_RELEASES = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
# The reference's blending of overlapping windows: its test.py calls sliding_window_inference without a mode, so
# MONAI's default, "constant" (every window weighs the same; this project's default is "gaussian").
REFERENCE_INFERENCE = {"mode": "constant"}


@dataclass(frozen=True)
class Released:
    """One row of the table: where the file is, its SHA-256 (None: none published), what it holds."""

    url: str
    sha256: str | None
    about: str
    model: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig values of the weights' architecture
    data: Mapping[str, Any] = field(default_factory=dict)  # DataConfig preprocessing values they were trained with

    @property
    def file_name(self) -> str:
        return Path(urlsplit(self.url).path).name


RELEASED: dict[str, Released] = {
    "unetr_btcv": Released(
        url="https://developer.download.nvidia.com/assets/Clara/monai/research/UNETR_model_best_acc.pth",
        sha256=None,  # not published; see the module docstring
        about="UNETR (ViT-B, feature size 16, 96^3 windows) trained on BTCV's 24 training cases by the UNETR "
              "authors (MONAI research-contributions UNETR/BTCV); a state dict written by MONAI 0.7-0.8",
        model=REFERENCE_UNETR, data=REFERENCE_PREPROCESSING),
    # research-contributions SwinUNETR/BTCV README, "Models": finetuned from the self-supervised encoder, written by
    # its trainer.py as {"epoch", "best_acc", "state_dict"} (keys swinViT.*, encoder*, decoder*, out.*; its test.py
    # loads them strictly into MONAI's SwinUNETR).
    "swin_unetr_btcv": Released(
        url=f"{SWIN_RELEASES}swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
        sha256=None,  # not published
        about="Swin UNETR/Base (feature size 48, 62.1 M parameters, 96^3 windows) finetuned on BTCV from the "
              "self-supervised encoder by its authors (MONAI research-contributions SwinUNETR/BTCV; mean Dice "
              "82.25 at overlap 0.7)",
        model=REFERENCE_SWIN_UNETR, data=REFERENCE_PREPROCESSING),
    "swin_unetr_btcv_small": Released(
        url=f"{SWIN_RELEASES}swin_unetr.small_5000ep_f24_lr2e-4_pretrained.pt",
        sha256=None,
        about="Swin UNETR/Small (feature size 24, 15.7 M parameters) trained on BTCV from scratch "
              "(research-contributions SwinUNETR/BTCV; mean Dice 79.79 at overlap 0.7)",
        model={**REFERENCE_SWIN_UNETR, "feature_size": 24}, data=REFERENCE_PREPROCESSING),
    "swin_unetr_btcv_tiny": Released(
        url=f"{SWIN_RELEASES}swin_unetr.tiny_5000ep_f12_lr2e-4_pretrained.pt",
        sha256=None,
        about="Swin UNETR/Tiny (feature size 12, 4.0 M parameters) trained on BTCV from scratch "
              "(research-contributions SwinUNETR/BTCV; mean Dice 72.05 at overlap 0.7)",
        model={**REFERENCE_SWIN_UNETR, "feature_size": 12}, data=REFERENCE_PREPROCESSING),
}
@dataclass
class Source:
    """A ``--pretrained`` value made local: the weights file, the config values it brings, and a description."""

    weights: Path
    values: dict[str, dict[str, Any]]
    description: str


def locate(value: str) -> Source:
    """``--pretrained`` made local: a table name, ``URL#sha256=HEX``, a MONAI bundle folder or a weights file."""
    if value in RELEASED:
        entry = RELEASED[value]
        weights = fetch(entry.url, entry.file_name, entry.sha256, f"--pretrained {value}")
        return Source(weights, {"model": dict(entry.model), "data": dict(entry.data)}, f"{value}: {entry.about}")
    if urlsplit(value).scheme in ("http", "https"):
        url, digest = split_url(value)
        name = f"{digest[:16]}-{Path(urlsplit(url).path).name or 'weights.pt'}"
        return Source(fetch(url, name, digest, f"--pretrained {url}"), {}, url)
    path = Path(value).expanduser()
    if is_bundle(path):
        bundle = read_bundle(path)
        return Source(bundle.weights, bundle.values, f"the MONAI bundle {path} (architecture and preprocessing "
                                                     f"from {bundle.config_file.name})")
    if path.is_file():
        return Source(path, {}, str(path))
    names = ", ".join(sorted(RELEASED))
    raise UserError(f"--pretrained {value}: not a released model ({names}), a URL, a MONAI bundle folder "
                    "(configs/, models/model.pt) or a weights file")


def resolve_pretrained(config: Config, command: str) -> Config:
    """``config`` with ``--pretrained`` made a local file in ``pretrained_dir``/``pretrained_model_name``, the
    architecture and preprocessing it states applied, and, for training, ``resume_ckpt`` on; else ``config``."""
    value = config.train.pretrained
    if value is None:
        return config
    train, infer = config.train, config.infer
    if command == "train" and (train.checkpoint or train.resume_jit):
        other = "--checkpoint (it resumes a run)" if train.checkpoint else "--resume_jit"
        raise UserError(f"--pretrained and {other} exclude each other: --pretrained starts a new run from "
                        "released weights; give one of them")
    if command == "train" and train.use_ssl_pretrained:
        raise UserError(ssl_start_conflict(train) or "")
    if command == "infer" and getattr(infer, "checkpoints", None):
        raise UserError("--pretrained and --checkpoints exclude each other: give the released weights or an "
                        "ensemble")
    if command != "train" and infer.saved_checkpoint == "torchscript":
        raise UserError("--pretrained and --saved_checkpoint torchscript exclude each other: --pretrained loads "
                        "weights as data; drop one")
    source = locate(value)
    layered = config.to_dict()
    for section, values in source.values.items():
        # The weights need their architecture and preprocessing; the blending of windows is the user's to choose.
        layered[section].update({key: value for key, value in values.items()
                                 if section != "infer" or key not in config.explicit})
    layered["train"].update(pretrained_dir=str(source.weights.parent), pretrained_model_name=source.weights.name,
                            resume_ckpt=command == "train" or train.resume_ckpt)
    # What the user set stays explicit, and what the source states becomes so: the loader's defaults for weights
    # without preprocessing (inference/loader.py) replace neither.
    stated = {key for values in source.values.values() for key in values}
    resolved = dataclasses.replace(config_from_dict(layered), explicit=config.explicit | stated)
    print(f"pretrained weights: {source.description}; file {source.weights}")
    changed = [f"{key} {getattr(getattr(resolved, section), key)}" for section in ("model", "data", "infer")
               for key in source.values.get(section, {})
               if getattr(getattr(config, section), key) != getattr(getattr(resolved, section), key)]
    if changed:
        print(f"  using their architecture and preprocessing: {', '.join(changed)}")
    return resolved
