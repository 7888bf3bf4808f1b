"""Sliding-window settings shared by inference and training's validation: the blending settings, the windows per
forward pass for a device, and the number of windows a scan takes."""

from __future__ import annotations

import torch

from ..config import Config
from ..model.precision import cpu_features

LARGE_SCAN_WINDOWS = 64


# A rough upper bound of the GPU memory one window needs at inference: the decoder keeps a few
# full-resolution maps of feature_size channels alive at once; 64 bytes per voxel and feature is
# 16 such maps in float32 (0.9 GB for a 96^3 window at feature 16). Only half the free memory is used.
_BYTES_PER_WINDOW_VOXEL_FEATURE = 64


def auto_sw_batch_size(requested: int, device: torch.device, roi: tuple[int, int, int], feature_size: int,
                       precision: str, limit: int = 8) -> int:
    """Windows per forward pass: ``requested`` if > 0, else chosen for the device.

    CPU: 4 with AMX (its matrix units are fed better by 4 windows: 6% less time per UNETR-B
    window under bf16 on a 2-core Xeon), else 2 (per UNETR-B window, 15% less time than 1 under
    bf16 on a Zen 4, and 4 no better; 40% less under fp32 on the AVX2 class for the demo's model,
    4 no better). AMX counts only in bfloat16: its tiles compute no float32. GPU: as many as fit in
    half the free memory, up to ``limit``.
    """
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 4 if cpu_features().amx_bf16 and precision == "bf16" else 2
    free, _ = torch.cuda.mem_get_info(device)
    per_window = roi[0] * roi[1] * roi[2] * feature_size * _BYTES_PER_WINDOW_VOXEL_FEATURE
    return max(1, min(limit, int(0.5 * free // per_window)))


def window_settings(config: Config) -> dict:
    """Sliding-window settings shared by ``test.py`` and training validation, so both blend windows alike."""
    return {"roi_size": config.model.roi_size, "overlap": config.infer.infer_overlap, "mode": config.infer.mode}
