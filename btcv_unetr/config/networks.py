"""What each network's settings mean to MONAI: its class name and keyword arguments, planned from the model config
(nnU-Net's network from plans: ``arch_class_name`` and ``arch_kwargs``). Pure data, no torch: the same pair builds the
network (``model/architectures.py``) and is written as a MONAI bundle's ``network_def`` (``io/bundle.py``).

    TITLES              name -> the network's title ("Swin UNETR"), for cards, messages and DICOM objects
    network_definition  a ModelConfig (and the grid's mm per voxel) -> (MONAI class name, JSON-plain arguments)
    plan_dynunet        nnU-Net-style kernel sizes and strides from the ROI and the voxel spacing
    MEDNEXT_SIZES       the MedNeXt paper's sizes S, B, M, L

A setting a network cannot take is one :class:`~btcv_unetr.errors.UserError` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from .schema import ModelConfig

# MONAI's class name and its keyword arguments, JSON-plain (lists, not tuples).
Definition = tuple[str, dict[str, Any]]

TITLES = {"unetr": "UNETR", "swin_unetr": "Swin UNETR", "segresnet": "SegResNet", "dynunet": "DynUNet (nnU-Net)",
          "mednext": "MedNeXt"}


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


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
    down, up = list(int_list(config.blocks_down)), list(int_list(config.blocks_up))
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


def dynunet_strides(config: ModelConfig, spacing: tuple[float, ...]) -> tuple[int, ...]:
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


def _unetr(config: ModelConfig, spacing: tuple[float, ...]) -> Definition:
    """MONAI's UNETR arguments; :func:`build_network` builds it with ``unetr.build_unetr`` (a ViT deeper than 12
    blocks, frozen unused parameters), which takes the same arguments."""
    return "UNETR", {"spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                     "out_channels": config.out_channels, "img_size": list(config.roi_size),
                     "feature_size": config.feature_size, "hidden_size": config.hidden_size,
                     "mlp_dim": config.mlp_dim, "num_heads": config.num_heads, "proj_type": config.pos_embed,
                     "norm_name": config.norm_name, "conv_block": config.conv_block, "res_block": config.res_block,
                     "dropout_rate": config.dropout_rate}


DEFINITIONS: dict[str, Callable[[ModelConfig, tuple[float, ...]], Definition]] = {
    "unetr": _unetr, "swin_unetr": _swin_unetr, "segresnet": _segresnet, "dynunet": _dynunet, "mednext": _mednext}


def network_definition(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> Definition:
    """MONAI's class name and keyword arguments (JSON-plain) of the network ``config`` names; ``spacing`` (mm per
    voxel of the preprocessed grid; isotropic when None) plans DynUNet."""
    spacing = tuple(spacing or (1.0,) * config.spatial_dims)[:config.spatial_dims]
    return DEFINITIONS[config.model_name](config, spacing)
