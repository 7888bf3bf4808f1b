"""The networks a config can name (``--model_name``), in the spirit of nnU-Net's network-from-plans: one table maps a
name to MONAI's class and arguments for the config (``config/networks.py``, pure data), the ROI it needs, its CPU
layout and its full-resolution width.

    ARCHITECTURES      name -> :class:`Architecture`
    architecture_of    the :class:`Architecture` of a ModelConfig (architecture_of_module: of a built network)
    build_network      the ``nn.Module`` of a ModelConfig (the UNETR builder is ``unetr.py``)
    deep_outputs       a training forward's logits per head, full resolution first (deep supervision)
    roi_problem        why an ROI does not suit the network (Swin UNETR: multiples of 32; DynUNet: its strides), or None
    network_settings, network_facts, describe_network   the net as a result describes it

Every network maps ``(B, in_channels, *roi)`` to ``(B, out_channels, *roi)`` logits. Which settings belong to which
network is :data:`btcv_unetr.config.schema.MODEL_SETTINGS` (the config refuses a foreign one in one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config.networks import (
    MEDNEXT_SIZES,
    TITLES,
    dynunet_strides,
    int_list,
    network_definition,
)
from ..config.schema import MODEL_SETTINGS, ModelConfig
from ..errors import UserError
from .unetr import build_unetr


@dataclass(frozen=True)
class Architecture:
    name: str
    roi_multiple: Callable[[ModelConfig, tuple[float, ...]], tuple[int, ...]]  # what each ROI side must divide by
    roi_factor: int = 1  # each side at least this many multiples (the deepest stage must keep more than one voxel)
    classes: tuple[str, ...] = ()  # the class names of the built module (tells a loaded network's architecture)
    # CPU channels-last 3D layout by default (--channels_last overrides): measured per network, benchmarks/bench.py
    # --networks (docs/networks.md)
    cpu_channels_last: bool = True
    # Channels of its widest full-resolution feature map: a window's activation memory scales with it (serve's
    # job memory estimate).
    full_resolution_channels: Callable[[ModelConfig], int] = lambda config: config.feature_size

    @property
    def title(self) -> str:
        """For the model card, the SEG's algorithm name, messages: "Swin UNETR"."""
        return TITLES[self.name]


def deep_outputs(output: torch.Tensor | Sequence[torch.Tensor], spatial_dims: int) -> list[torch.Tensor]:
    """A training forward's logits as a list, full resolution first, then each deep head's (coarser or, for DynUNet,
    already upsampled): SegResNetDS and MedNeXt return a sequence, DynUNet stacks its heads on axis 1
    ``(B, heads, C, *spatial)``, a net without deep supervision returns ``(B, C, *spatial)``."""
    if isinstance(output, torch.Tensor):
        return list(output.unbind(1)) if output.dim() == spatial_dims + 3 else [output]
    return list(output)


def _fixed(multiple: int) -> Callable[[ModelConfig, tuple[float, ...]], tuple[int, ...]]:
    return lambda config, spacing: (multiple,) * config.spatial_dims


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("unetr", _fixed(16), classes=("UNETR", "DeeperUNETR")),  # its 16-voxel patches
    # 5 stages of 2x patch merging; at 32 voxels the bottleneck is one voxel, which instance norm cannot train on.
    # Contiguous: a channels-last training step was 17% slower on an AVX2 EPYC, its forward no faster (1.21/1.28 s).
    Architecture("swin_unetr", _fixed(32), roi_factor=2, classes=("SwinUNETR",), cpu_channels_last=False),
    Architecture("segresnet", lambda c, spacing: (2 ** (len(int_list(c.blocks_down)) - 1),) * c.spatial_dims,
                 classes=("SegResNet", "SegResNetDS"), full_resolution_channels=lambda c: c.init_filters or 16),
    Architecture("dynunet", dynunet_strides, classes=("DynUNet",),
                 full_resolution_channels=lambda c: c.init_filters or 32),
    Architecture("mednext", _fixed(16), classes=("MedNeXt",),  # 4 downsamplings
                 # its blocks expand the channels at full resolution by their first/last expansion ratio
                 full_resolution_channels=lambda c: (c.init_filters or 32) * max(
                     MEDNEXT_SIZES[c.mednext_size]["encoder_expansion_ratio"][0],
                     MEDNEXT_SIZES[c.mednext_size]["decoder_expansion_ratio"][-1])),
)}


def architecture_of_module(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of a built network (by its class; UNETR for a class no entry names, such as a
    TorchScript module)."""
    name = type(model).__name__
    return next((arch for arch in ARCHITECTURES.values() if name in arch.classes), ARCHITECTURES["unetr"])


def architecture_of(config: ModelConfig) -> Architecture:
    return ARCHITECTURES[config.model_name]


def full_resolution_channels(config: ModelConfig) -> int:
    """Channels of the network's widest full-resolution feature map (what a window's activation memory scales
    with): UNETR's and Swin UNETR's feature size, a CNN's first filters (MedNeXt's times its expansion)."""
    return architecture_of(config).full_resolution_channels(config)


def build_network(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> nn.Module:
    """The network ``config`` names; ``spacing`` (mm per voxel of the preprocessed grid) plans DynUNet. An ROI the
    network cannot take is one :class:`UserError` line."""
    spacing = tuple(spacing or (1.0,) * config.spatial_dims)[:config.spatial_dims]
    problem = roi_problem(config, spacing)
    if problem:
        raise UserError(f"config: {problem}: set --roi_x/--roi_y/--roi_z accordingly")
    class_name, arguments = network_definition(config, spacing)
    if class_name == "UNETR":
        return build_unetr(config)
    from monai.networks import nets
    return getattr(nets, class_name)(**arguments)


def roi_problem(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> str | None:
    """Why the ROI does not suit the network, naming the flags; None when it does."""
    arch = architecture_of(config)
    multiples = arch.roi_multiple(config, spacing or (1.0,) * config.spatial_dims)
    names = ("roi_x", "roi_y", "roi_z")[:config.spatial_dims]
    for name, size, multiple in zip(names, config.roi_size, multiples):
        if size < multiple * arch.roi_factor or size % multiple:
            least = f" of at least {multiple * arch.roi_factor}" if arch.roi_factor > 1 else ""
            return f"{name} {size} must be a multiple of {multiple}{least} for {arch.title}"
    return None


# --- The net as a result describes it (model card, provenance, DICOM objects, the service) ------------------------


def network_settings(config: ModelConfig, changed_only: bool = False) -> dict[str, object]:
    """The settings of ``config``'s own network (:data:`~btcv_unetr.config.schema.MODEL_SETTINGS`), name -> value in
    the config's field order: a SegResNet's ``init_filters``, ``blocks_down`` ... and no ViT sizes. ``changed_only``:
    only those that differ from the config's defaults (what a line that names the net needs to say)."""
    defaults = ModelConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if config.model_name in MODEL_SETTINGS.get(f.name, ())
            and not (changed_only and getattr(config, f.name) == getattr(defaults, f.name))}


def network_facts(config: ModelConfig) -> dict[str, object]:
    """What a model card or a mask's provenance says of one network: ``model_name``, ``network`` (its title),
    ``network_settings`` (:func:`network_settings`, all of them) and ``roi_size`` (its sliding window, voxels)."""
    return {"model_name": config.model_name, "network": architecture_of(config).title,
            "network_settings": network_settings(config), "roi_size": list(config.roi_size)}


def describe_network(models: ModelConfig | list[ModelConfig] | tuple[ModelConfig, ...]) -> str:
    """The net's title ("Swin UNETR"); an ensemble's (several configs): "ensemble of 3: UNETR, Swin UNETR x2", titles
    in the members' order of first appearance, counted. A one-member sequence is that member's title."""
    configs = [models] if isinstance(models, ModelConfig) else list(models)
    titles = [architecture_of(config).title for config in configs]
    if len(titles) == 1:
        return titles[0]
    counted = {title: titles.count(title) for title in titles}  # dicts keep the first appearance's order
    names = ", ".join(title if count == 1 else f"{title} x{count}" for title, count in counted.items())
    return f"ensemble of {len(titles)}: {names}"
