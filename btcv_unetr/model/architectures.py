"""The networks a config can name (``--model_name``), in the spirit of nnU-Net's network-from-plans: one table maps a
name to how MONAI builds it from the config, the ROI it needs and the settings it owns.

    ARCHITECTURES      name -> :class:`Architecture`
    architecture_of    the :class:`Architecture` of a ModelConfig
    build_network      the ``nn.Module`` of a ModelConfig (the UNETR builder is ``unetr.py``)
    network_definition MONAI's class name and keyword arguments of a ModelConfig (a bundle's network_def)
    deep_outputs       a training forward's logits per head, full resolution first (deep supervision)
    roi_problem        why an ROI does not suit the network (Swin UNETR: multiples of 32; DynUNet: its strides), or None
    plan_dynunet       nnU-Net-style kernel sizes and strides from the ROI and the voxel spacing

Every network maps ``(B, in_channels, *roi)`` to ``(B, out_channels, *roi)`` logits. Which settings belong to which
network is :data:`btcv_unetr.config.schema.MODEL_SETTINGS` (the config refuses a foreign one in one line).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config.schema import MODEL_SETTINGS, ModelConfig
from ..errors import UserError
from .unetr import build_unetr


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str  # for the model card, the SEG's algorithm name, messages
    definition: Callable[[ModelConfig, tuple[float, ...]], Definition]  # (config, mm per voxel) -> class, arguments
    roi_multiple: Callable[[ModelConfig, tuple[float, ...]], tuple[int, ...]]  # what each ROI side must divide by
    roi_factor: int = 1  # each side at least this many multiples (the deepest stage must keep more than one voxel)
    classes: tuple[str, ...] = ()  # the class names of the built module (tells a loaded network's architecture)
    # CPU channels-last 3D layout by default (--channels_last overrides): measured per network, benchmarks/bench.py
    # --networks (docs/networks.md)
    cpu_channels_last: bool = True
    # Channels of its widest full-resolution feature map: a window's activation memory scales with it (serve's
    # job memory estimate).
    full_resolution_channels: Callable[[ModelConfig], int] = lambda config: config.feature_size


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


# A network is MONAI's class name and its keyword arguments (nnU-Net's arch_class_name and arch_kwargs): the same
# pair builds it here and is written as a MONAI bundle's network_def (io/bundle.py). Arguments are JSON-plain.
Definition = tuple[str, dict[str, Any]]


def _swin_unetr(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    return "SwinUNETR", {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                         "out_channels": config.out_channels, "feature_size": config.feature_size,
                         "norm_name": config.norm_name, "drop_rate": 0.0, "attn_drop_rate": 0.0,
                         "dropout_path_rate": config.dropout_path_rate, "use_checkpoint": config.use_checkpoint,
                         "use_v2": config.use_v2}


# SegResNetDS keeps SegResNet's group norm (8 groups) in this project (MONAI's default for SegResNetDS is batch norm).
SEGRESNET_DS_NORM = ["group", {"num_groups": 8}]


def _segresnet(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    if config.init_filters is not None and (config.init_filters < 8 or config.init_filters % 8):
        raise UserError(f"config: init_filters {config.init_filters} must be a multiple of 8 for SegResNet (its group "
                        "norms have 8 groups)")
    down, up = list(_int_list(config.blocks_down)), list(_int_list(config.blocks_up))
    arguments = {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                 "out_channels": config.out_channels, "init_filters": config.init_filters or 16, "blocks_down": down,
                 "blocks_up": up}
    if not config.deep_supervision:
        return "SegResNet", arguments
    # SegResNetDS: SegResNet's encoder and decoder with a head at each of the last dsdepth decoder levels (its own
    # module names, so its weights are not SegResNet's).
    if len(up) != len(down) - 1:
        raise UserError(f"config: blocks_up {config.blocks_up} needs one entry per decoder level ({len(down) - 1}, "
                        f"one fewer than blocks_down {config.blocks_down}) for SegResNet with deep supervision")
    if config.deep_supervision >= len(up):  # the last of its up-levels is the full-resolution one
        raise UserError(f"config: deep_supervision {config.deep_supervision} exceeds SegResNet's {len(up) - 1} "
                        "decoder levels below full resolution: lower it or add levels (blocks_down, blocks_up)")
    return "SegResNetDS", {**arguments, "norm": SEGRESNET_DS_NORM, "dsdepth": config.deep_supervision + 1}


def plan_dynunet(roi: tuple[int, ...], spacing: tuple[float, ...], max_levels: int = 6
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides as nnU-Net plans them: an axis is pooled (stride 2) only while its spacing is
    within a factor 2 of the finest current spacing and its size stays >= 8 voxels; a kernel is 1 along an axis
    still much coarser than the others (3 once it is pooled level). The first level never pools."""
    sizes, current = list(roi), list(spacing)
    kernels = [[3 if current[d] <= 2 * min(current) else 1 for d in range(len(roi))]]
    strides = [[1] * len(roi)]
    for _ in range(max_levels - 1):
        finest = min(current)
        stride = [2 if current[d] <= 2 * finest and sizes[d] >= 16 else 1 for d in range(len(roi))]
        if not any(s == 2 for s in stride):
            break
        sizes = [s // t for s, t in zip(sizes, stride)]
        current = [c * t for c, t in zip(current, stride)]
        kernels.append([3 if current[d] <= 2 * min(current) else 1 for d in range(len(roi))])
        strides.append(stride)
    return kernels, strides


def _dynunet_strides(config: ModelConfig, spacing: tuple[float, ...]) -> tuple[int, ...]:
    _, strides = plan_dynunet(config.roi_size, spacing)
    return tuple(math.prod(s[d] for s in strides) for d in range(config.spatial_dims))


def _dynunet(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    kernels, strides = plan_dynunet(config.roi_size, spacing)
    # nnU-Net's filters: 32 doubling per level, capped at 320 (3D) or 512 (2D).
    cap = 320 if config.spatial_dims == 3 else 512
    filters = [min((config.init_filters or 32) * 2 ** level, cap) for level in range(len(strides))]
    # nnU-Net supervises every decoder level but the bottleneck's; MONAI's DynUNet allows one fewer than its up-layers
    if config.deep_supervision >= len(strides) - 1:
        raise UserError(f"config: deep_supervision {config.deep_supervision} must be at most {len(strides) - 2} for "
                        f"this DynUNet ({len(strides)} levels planned from the ROI {config.roi_size}): lower it")
    return "DynUNet", {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                       "out_channels": config.out_channels, "kernel_size": kernels, "strides": strides,
                       "upsample_kernel_size": strides[1:], "filters": filters, "norm_name": config.norm_name,
                       "res_block": True, "deep_supervision": config.deep_supervision > 0,
                       "deep_supr_num": max(config.deep_supervision, 1)}


# MedNeXt's sizes, the paper's S, B, M and L (as MONAI's create_mednext builds them, which fixes 32 filters):
# expansion ratios and blocks per level.
MEDNEXT_SIZES: dict[str, dict[str, Any]] = {
    "S": {"encoder_expansion_ratio": [2] * 4, "decoder_expansion_ratio": [2] * 4, "bottleneck_expansion_ratio": 2,
          "blocks_down": [2, 2, 2, 2], "blocks_bottleneck": 2, "blocks_up": [2, 2, 2, 2]},
    "B": {"encoder_expansion_ratio": [2, 3, 4, 4], "decoder_expansion_ratio": [4, 4, 3, 2],
          "bottleneck_expansion_ratio": 4, "blocks_down": [2, 2, 2, 2], "blocks_bottleneck": 2,
          "blocks_up": [2, 2, 2, 2]},
    "M": {"encoder_expansion_ratio": [2, 3, 4, 4], "decoder_expansion_ratio": [4, 4, 3, 2],
          "bottleneck_expansion_ratio": 4, "blocks_down": [3, 4, 4, 4], "blocks_bottleneck": 4,
          "blocks_up": [4, 4, 4, 3]},
    "L": {"encoder_expansion_ratio": [3, 4, 8, 8], "decoder_expansion_ratio": [8, 8, 4, 3],
          "bottleneck_expansion_ratio": 8, "blocks_down": [3, 4, 8, 8], "blocks_bottleneck": 8,
          "blocks_up": [8, 8, 4, 3]}}
# What every size has (the paper's residual blocks and group norm).
MEDNEXT_COMMON = {"use_residual_connection": True, "norm_type": "group", "global_resp_norm": False}
# MedNeXt's deep supervision is all or nothing: a head at each of its 4 lower decoder levels.
MEDNEXT_HEADS = 4


def _mednext(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    if config.deep_supervision not in (0, MEDNEXT_HEADS):
        raise UserError(f"config: deep_supervision {config.deep_supervision}: MedNeXt has a head at each of its "
                        f"{MEDNEXT_HEADS} lower levels or none: give 0 or {MEDNEXT_HEADS}")
    return "MedNeXt", {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                       "out_channels": config.out_channels, "init_filters": config.init_filters or 32,
                       "kernel_size": config.kernel_size, "deep_supervision": config.deep_supervision > 0,
                       **MEDNEXT_COMMON, **MEDNEXT_SIZES[config.mednext_size]}


def deep_outputs(output: torch.Tensor | Sequence[torch.Tensor], spatial_dims: int) -> list[torch.Tensor]:
    """A training forward's logits as a list, full resolution first, then each deep head's (coarser or, for DynUNet,
    already upsampled): SegResNetDS and MedNeXt return a sequence, DynUNet stacks its heads on axis 1
    ``(B, heads, C, *spatial)``, a net without deep supervision returns ``(B, C, *spatial)``."""
    if isinstance(output, torch.Tensor):
        return list(output.unbind(1)) if output.dim() == spatial_dims + 3 else [output]
    return list(output)


def _unetr(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    """MONAI's UNETR arguments; :func:`build_network` builds it with ``unetr.build_unetr`` (a ViT deeper than 12
    blocks, frozen unused parameters), which takes the same arguments."""
    return "UNETR", {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                     "out_channels": config.out_channels, "img_size": list(config.roi_size),
                     "feature_size": config.feature_size, "hidden_size": config.hidden_size,
                     "mlp_dim": config.mlp_dim, "num_heads": config.num_heads, "proj_type": config.pos_embed,
                     "norm_name": config.norm_name, "conv_block": config.conv_block, "res_block": config.res_block,
                     "dropout_rate": config.dropout_rate}


def _fixed(multiple: int) -> Callable[[ModelConfig, tuple[float, ...]], tuple[int, ...]]:
    return lambda config, spacing: (multiple,) * config.spatial_dims


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("unetr", "UNETR", _unetr, _fixed(16), classes=("UNETR", "DeeperUNETR")),  # its 16-voxel patches
    # 5 stages of 2x patch merging; at 32 voxels the bottleneck is one voxel, which instance norm cannot train on
    # contiguous: a channels-last training step was 17% slower on an AVX2 EPYC, its forward no faster (1.21/1.28 s)
    Architecture("swin_unetr", "Swin UNETR", _swin_unetr, _fixed(32), roi_factor=2, classes=("SwinUNETR",),
                 cpu_channels_last=False),
    Architecture("segresnet", "SegResNet", _segresnet,
                 lambda config, spacing: (2 ** (len(_int_list(config.blocks_down)) - 1),) * config.spatial_dims,
                 classes=("SegResNet", "SegResNetDS"), full_resolution_channels=lambda c: c.init_filters or 16),
    Architecture("dynunet", "DynUNet (nnU-Net)", _dynunet, _dynunet_strides, classes=("DynUNet",),
                 full_resolution_channels=lambda c: c.init_filters or 32),
    Architecture("mednext", "MedNeXt", _mednext, _fixed(16), classes=("MedNeXt",),  # 4 downsamplings
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


def network_definition(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> Definition:
    """MONAI's class name and keyword arguments (JSON-plain) of the network ``config`` names; ``spacing`` (mm per
    voxel) plans DynUNet. A setting the network cannot take is one :class:`UserError` line."""
    spacing = tuple(spacing or (1.0,) * config.spatial_dims)[:config.spatial_dims]
    return architecture_of(config).definition(config, spacing)


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
