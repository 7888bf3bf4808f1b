"""Sliding-window settings shared by inference and training's validation: the blending settings, the windows per
forward pass for a device, and the number of windows a scan takes.

    windows_per_pass       the windows MONAI's sliding window runs over an image of a shape (arithmetic, no list)
    window_bound_problem   one line when an overlap plans too many windows (--max_windows_factor), else None
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.inferers.utils import _get_scan_interval  # private: pinned by tests/test_monai_internals.py

from ..config.schema import Config
from ..runtime.precision import cpu_features

LARGE_SCAN_WINDOWS = 64


# A rough upper bound of the GPU memory one window needs at inference: the decoder keeps a few
# full-resolution maps of feature_size channels alive at once; 64 bytes per voxel and feature is
# 16 such maps in float32 (0.9 GB for a 96^3 window at feature 16). Only half the free memory is used.
_BYTES_PER_WINDOW_VOXEL_FEATURE = 64


def auto_sw_batch_size(requested: int, device: torch.device, roi: Sequence[int], feature_size: int,
                       precision: str, limit: int = 8) -> int:
    """Windows per forward pass: ``requested`` if > 0, else chosen for the device. ``roi`` is the window's
    size, one number per spatial dimension (2 for a 2D model, 3 for a 3D one).

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
    per_window = math.prod(roi) * feature_size * _BYTES_PER_WINDOW_VOXEL_FEATURE  # voxels or pixels alike
    return max(1, min(limit, int(0.5 * free // per_window)))


def window_settings(config: Config) -> dict:
    """Sliding-window settings shared by ``test.py`` and training validation, so both blend windows alike."""
    return {"roi_size": config.model.roi_size, "overlap": config.infer.infer_overlap, "mode": config.infer.mode}


# The overlap the window bound is relative to: the reference's.
REFERENCE_OVERLAP = 0.5


def windows_per_pass(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """The windows MONAI's ``sliding_window_inference`` runs over one image of spatial ``shape`` (voxels) with
    window ``roi`` and ``overlap``: the image padded to at least one window, then per axis the positions of its
    scan grid (as ``dense_patch_slices`` lists them, counted without building the list: a 1-voxel stride over a
    large scan lists millions).

    The scan interval comes from MONAI's private ``_get_scan_interval``; tests/test_monai_internals.py checks
    this count against the windows ``sliding_window_inference`` runs and fails, naming the change, when a MONAI
    release differs.
    """
    size = tuple(max(int(n), int(r)) for n, r in zip(shape, roi))
    intervals = _get_scan_interval(size, tuple(roi), len(roi), (overlap,) * len(roi))
    # Along an axis: the first window at 0, then one per interval until a window reaches the image's end.
    return math.prod(math.ceil((n - r) / step) + 1 if n > r else 1 for n, r, step in zip(size, roi, intervals))


def largest_fitting_overlap(shape: Sequence[int], roi: Sequence[int], max_windows: float, below: float) -> float:
    """The largest overlap under ``below``, in steps of 0.01, whose :func:`windows_per_pass` is at most
    ``max_windows`` (0 when none is)."""
    for hundredths in range(math.ceil(round(below * 100, 6)) - 1, -1, -1):
        if windows_per_pass(shape, roi, hundredths / 100) <= max_windows:
            return hundredths / 100
    return 0.0


def window_bound_problem(shape: Sequence[int], roi: Sequence[int], overlap: float, factor: float,
                         passes: int = 1) -> str | None:
    """One line with the counts when ``overlap`` plans more than ``factor`` times the windows of overlap 0.5 over
    an image of spatial ``shape`` (each of ``passes`` passes: test-time flips, ensemble members), naming the largest
    overlap within the bound; None within it, or when ``factor`` is 0 (no bound)."""
    if factor <= 0:
        return None
    planned = windows_per_pass(shape, roi, overlap)
    reference = windows_per_pass(shape, roi, REFERENCE_OVERLAP)
    if planned <= factor * reference:
        return None
    fitting = largest_fitting_overlap(shape, roi, factor * reference, overlap)
    total = f"{planned * passes:,} windows ({planned:,} per pass, {passes} passes)" if passes > 1 else \
        f"{planned:,} windows"
    ratio = planned / reference
    times = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"
    return (f"--infer_overlap {overlap:g} plans {total}, {times} times the {reference:,} of overlap "
            f"{REFERENCE_OVERLAP:g}, over --max_windows_factor {factor:g}: use --infer_overlap {fitting:.2f} or "
            "less, or raise --max_windows_factor (0: no bound)")
