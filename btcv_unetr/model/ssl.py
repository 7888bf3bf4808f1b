"""``--use_ssl_pretrained``: the encoder of a Swin UNETR or a UNETR started from self-supervised weights, as the
reference recipes do, but strictly: every encoder tensor of the model must come from the file, with its shape.

    SSL_ENCODERS        architecture -> :class:`SSLEncoder`: where the file is, what it holds, how its keys map
    ssl_start_conflict  why ``--use_ssl_pretrained`` cannot go with the run's other starting weights, or None
    load_ssl_encoder    the file (``pretrained_dir`` or downloaded once), its encoder loaded; a one-line summary

The reference (research-contributions SwinUNETR/BTCV main.py) renames ``module.`` away and loads
``model_swinvit.pt`` with ``strict=False``: the file's keys lack the ``swinViT.`` prefix and name the MLP layers
``fc1``/``fc2`` (MONAI's are ``linear1``/``linear2``, see MONAI's ``SwinUNETR.load_from``), so that load silently
keeps the random encoder (research-contributions issues 268, 346). Here the keys are mapped as ``load_from`` maps
them, and a file that leaves any encoder tensor unset is refused in one line. Tensors of the file outside the
encoder (its final norm, SSL heads: rotation, contrastive, reconstruction) are ignored and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.schema import Config, ModelConfig, TrainConfig
from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..io.download import fetch
from .architectures import ARCHITECTURES
from .unetr import UNUSED_PARAMETERS
from .weights import extract_state_dict

SHOWN = 4  # names listed in a message before "and N more"


@dataclass(frozen=True)
class SSLEncoder:
    """A self-supervised encoder file: where it is, what it holds, and how its keys map onto our model's."""

    file_name: str  # looked for in pretrained_dir first, then downloaded under this name
    url: str | None  # None: no address is published (``obtain`` says how to make the file)
    sha256: str | None  # None: none published; the first download's is pinned (io/download.py)
    about: str
    prefix: str  # our model's encoder: the state-dict keys that start with this
    model: Mapping[str, Any] = field(default_factory=dict)  # ModelConfig values it was trained with (for messages)
    aliases: tuple[str, ...] = ()  # other names of the encoder's prefix in files (older code)
    renames: tuple[tuple[str, str], ...] = ()  # (file's, ours) parts of a key, after the prefix
    obtain: str = ""


SSL_ENCODERS: dict[str, SSLEncoder] = {
    "swin_unetr": SSLEncoder(
        file_name="model_swinvit.pt",
        url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
        sha256=None,  # none published (research-contributions SwinUNETR/Pretrain gives only the address)
        about="the Swin UNETR encoder (Swin-B, feature size 48) pretrained self-supervised (inpainting, rotation, "
              "contrastive) on about 5,050 public CTs (Tang et al., CVPR 2022; research-contributions "
              "SwinUNETR/Pretrain); the recipe finetunes it on BTCV with --feature_size 48",
        prefix="swinViT.", aliases=("swin_vit.",),
        model={"spatial_dims": 3, "in_channels": 1, "feature_size": 48, "use_v2": False},
        # The pretraining code's own MLP layer names (MONAI's SwinUNETR.load_from maps them the same way).
        renames=((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))),
    "unetr": SSLEncoder(
        file_name="best_model.pt",
        url=None,  # the tutorial publishes the recipe and its results, not the file
        sha256=None,
        about="the ViT-B of MONAI's ViTAutoEnc pretrained self-supervised (reconstruction and contrastive loss) on "
              "TCIA COVID-19's CTs by MONAI tutorials self_supervised_pretraining/vit_unetr_ssl; finetuned as "
              "UNETR's encoder it raised BTCV mean Dice from 78.9 to 82.3 with 24 training scans",
        prefix="vit.",
        model={"spatial_dims": 3, "in_channels": 1, "roi_x": 96, "roi_y": 96, "roi_z": 96, "hidden_size": 768,
               "mlp_dim": 3072, "num_heads": 12, "num_layers": 12, "pos_embed": "conv"},
        obtain="no address is published for it: run MONAI tutorials' self_supervised_pretraining/vit_unetr_ssl/"
               "ssl_train.ipynb, which writes best_model.pt into its logdir (the multi-GPU script writes "
               "ckpt_best.pth: rename it)"),
}


def ssl_start_conflict(train: TrainConfig) -> str | None:
    """Why ``--use_ssl_pretrained`` cannot go with the run's other starting weights (the encoder would come from
    two sources and which wins is ambiguous), or None."""
    if not train.use_ssl_pretrained:
        return None
    others = [flag for flag, given in (("--pretrained", train.pretrained is not None),
                                       ("--checkpoint", train.checkpoint is not None),
                                       ("--resume_jit", train.resume_jit), ("--resume_ckpt", train.resume_ckpt))
              if given]
    if not others:
        return None
    return (f"--use_ssl_pretrained and {' and '.join(others)} exclude each other: both set the encoder's starting "
            "weights (which would win is ambiguous); --use_ssl_pretrained starts a new run from the self-supervised "
            "encoder, the others from a whole network: give one of them")


def load_ssl_encoder(model: nn.Module, config: Config) -> str:
    """Load the self-supervised encoder of ``config.model.model_name`` into ``model`` in place, strictly; returns
    the one-line summary ("loaded N encoder tensors from FILE; ignored M ...; the decoder starts from random
    weights"). The file is ``pretrained_dir``/its name where it lies there, else downloaded once into the
    user's cache. Any encoder tensor missing from the file or of another shape: one :class:`UserError` line."""
    conflict = ssl_start_conflict(config.train)
    if conflict:
        raise UserError(conflict)
    name = config.model.model_name
    if name not in SSL_ENCODERS:
        raise UserError(f"--use_ssl_pretrained: self-supervised encoder weights exist for "
                        f"{', '.join(sorted(SSL_ENCODERS))}, not --model_name {name}: drop the flag")
    encoder = SSL_ENCODERS[name]
    path = ssl_file(encoder, Path(config.train.pretrained_dir), name)
    state = extract_state_dict(load_checkpoint(path), str(path))
    return load_encoder_state(model, state, encoder, str(path), config.model)


def ssl_file(encoder: SSLEncoder, folder: Path, name: str) -> Path:
    """The encoder's file: in ``folder`` (as the reference reads ./pretrained_models/model_swinvit.pt), else the
    cached download of its address; without an address, one line that says how to make it."""
    local = folder.expanduser() / encoder.file_name
    if local.is_file():
        return local
    if encoder.url is None:
        raise UserError(f"--use_ssl_pretrained: {local} not found; {ARCHITECTURES[name].title}'s self-supervised "
                        f"encoder: {encoder.obtain}; put it into --pretrained_dir ({folder})")
    return fetch(encoder.url, encoder.file_name, encoder.sha256, "--use_ssl_pretrained")


def map_key(key: str, encoder: SSLEncoder) -> str:
    """A file's key (wrapper prefixes such as ``module.`` already removed) as our model's key: the encoder's prefix
    (added where the file has none or an older name for it), then the renamed parts."""
    for prefix in (encoder.prefix, *encoder.aliases):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for old, new in encoder.renames:
        key = key.replace(old, new)
    return encoder.prefix + key


def load_encoder_state(model: nn.Module, state: Mapping[str, torch.Tensor], encoder: SSLEncoder, source: str,
                       config: ModelConfig) -> str:
    """Copy the encoder tensors of ``state`` (a file's state dict) into ``model``; every encoder key of the model
    must be there with its shape (MONAI's unused ``norm_cross_attn`` excepted: files of older MONAI lack them);
    what the file holds outside the encoder is counted, not loaded. Returns the summary line."""
    own = model.state_dict()
    wanted = {key: value for key, value in own.items() if key.startswith(encoder.prefix)}
    found: dict[str, tuple[str, torch.Tensor]] = {}  # our key -> (the file's key, its tensor)
    ignored = []
    for key, value in state.items():
        target = map_key(key, encoder)
        if target in wanted:
            found[target] = (key, value)
        else:
            ignored.append(key)
    if len(found) < len(wanted) / 2:  # a few names in common (a final "norm") do not make it this encoder
        raise UserError(f"{source}: not a self-supervised encoder for this {config.model_name} network: "
                        f"{len(found)} of its {len(state)} tensors ({_names(list(state))}) are among the encoder's "
                        f"{len(wanted)} ({encoder.prefix}*)")
    missing = [key for key in wanted if key not in found and not UNUSED_PARAMETERS.search(key)]
    mis_shaped = [f"{found[key][0]} {tuple(found[key][1].shape)} vs {key} {tuple(value.shape)}"
                  for key, value in wanted.items() if key in found and found[key][1].shape != value.shape]
    if missing or mis_shaped:
        parts = [f"{len(missing)} encoder tensors missing from the file: {_names(missing)}"] if missing else []
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} of another shape (file vs model): {_names(mis_shaped)}")
        raise UserError(f"{source}: the self-supervised encoder does not match the {config.model_name} encoder "
                        f"built from the flags; {'; '.join(parts)}{_trained_as(encoder, config)}")
    loaded = {**own, **{key: value for key, (_, value) in found.items()}}
    model.load_state_dict(loaded, strict=True)
    others = f" ({_names(ignored)})" if ignored else ""
    return (f"loaded {len(found)} encoder tensors from {source}; ignored {len(ignored)} tensors outside the encoder"
            f"{others}; the decoder starts from random weights")


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def _trained_as(encoder: SSLEncoder, config: ModelConfig) -> str:
    """The flags whose values differ from those the encoder was trained with, e.g. ``: it was trained with
    --feature_size 48 (this config: 12)``; empty where none differs."""
    differing = [f"--{key} {value} (this config: {getattr(config, key)})" for key, value in encoder.model.items()
                 if getattr(config, key) != value]
    return f": it was trained with {', '.join(differing)}" if differing else ""
