"""How large a job this server takes, decided from an upload's header before any voxel is read.

    Declared           what a header says: voxel shape, spacing (mm), bytes per voxel
    JobLimits          the service's flags: voxels, physical extent, picture pixels, DICOM files, job memory
    job_memory_bytes   an upper estimate of one job's peak memory for this model (bytes)
    limit_problem      the first limit a declared image breaks, as one line with the numbers, or None

A 1 MB ``.nii.gz`` can declare a gigavoxel of zeros: its size on the wire says nothing. Every check
here uses the header alone, so the refusal (413) comes before the voxels are decompressed or queued.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..config.schema import MAX_PIXELS  # pictures (2D models): 8000 x 8000, the command line's default too
from ..data.images import pixels_problem
from ..model.architectures import full_resolution_channels

GB = 1 << 30
# Defaults: a whole-body CT at 0.8 mm (about 512 x 512 x 2300 voxels, 50 x 50 x 190 cm) passes; a
# field of view wider than any CT gantry's (about 80 cm) or longer than a body does not.
MAX_VOXELS = 1_000_000_000
MAX_EXTENT_MM = (800.0, 800.0, 2200.0)  # compared with the scan's extents sorted from small to large
MAX_DICOM_FILES = 5000
JOB_MEMORY_FRACTION = 0.75  # default --max_job_memory_gb: this share of the machine's memory

# Peak memory of a job, an upper fit to whole jobs measured by benchmarks/job_memory.py (peak RSS over the
# loaded model; README, "Serving"): a fixed part (the transforms' and allocator's working memory), per
# scan voxel beyond its stored bytes (its float32 copy, the mask), per voxel of the
# model's grid (the preprocessed image) and per grid voxel and class (blended logits, softmax, the
# inversion's padded copy), and the windows in flight (as infer's GPU batch sizing counts them).
JOB_BASE_BYTES = 320 * (1 << 20)
BYTES_PER_SCAN_VOXEL = 12
BYTES_PER_GRID_VOXEL = 16
BYTES_PER_GRID_VOXEL_CLASS = 9
BYTES_PER_WINDOW_VOXEL_FEATURE = 64
BYTES_PER_PICTURE_PIXEL_CHANNEL = 16


@dataclass(frozen=True)
class Declared:
    """An image as its header declares it: spatial ``shape`` (voxels), ``spacing`` (mm per voxel, 1 for
    pictures), ``channels`` and the stored bytes per voxel and channel."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int = 1
    itemsize: int = 2

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def extent_mm(self) -> tuple[float, ...]:
        return tuple(n * abs(s) for n, s in zip(self.shape, self.spacing))


@dataclass(frozen=True)
class JobLimits:
    """The service's size limits (flags ``--max_voxels``, ``--max_extent_mm``, ``--max_pixels``,
    ``--max_dicom_files``, ``--max_job_memory_gb``)."""

    max_voxels: int = MAX_VOXELS
    max_extent_mm: tuple[float, float, float] = MAX_EXTENT_MM
    max_pixels: int = MAX_PIXELS
    max_dicom_files: int = MAX_DICOM_FILES
    max_job_memory_gb: float = 0.0  # 0: JOB_MEMORY_FRACTION of this machine's memory

    @property
    def job_memory_bytes(self) -> int:
        return int(self.max_job_memory_gb * GB) if self.max_job_memory_gb > 0 else default_job_memory_bytes()


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_job_memory_bytes() -> int:
    return int(JOB_MEMORY_FRACTION * machine_memory_bytes())


def grid_voxels(declared: Declared, model_spacing: tuple[float, float, float]) -> int:
    """Voxels of the model's grid over the whole scan (the foreground crop can only make it smaller)."""
    return math.prod(max(1, math.ceil(extent / target)) for extent, target in zip(declared.extent_mm, model_spacing))


def job_memory_bytes(declared: Declared, model, model_spacing: tuple[float, float, float] | None,
                     sw_batch_size: int, members: int = 1, member_models: Sequence | None = None) -> int:
    """Peak memory of one job beyond the loaded model(s), in bytes (an upper estimate).

    ``model`` is the ModelConfig (classes, ROI, network); ``model_spacing`` the grid's mm per voxel
    (None for pictures, which are resized to the ROI); ``members`` the models of an ensemble, whose
    running sum of probabilities is one more float32 map of the grid and classes; ``member_models`` their
    ModelConfigs where they differ (members run one after another: the largest window counts).
    """
    windows = max(sw_batch_size * math.prod(member.roi_size) * full_resolution_channels(member)
                  * BYTES_PER_WINDOW_VOXEL_FEATURE for member in (member_models or [model]))
    if model_spacing is None:
        return declared.voxels * declared.channels * BYTES_PER_PICTURE_PIXEL_CHANNEL + windows
    grid = grid_voxels(declared, model_spacing)
    ensemble_sum = 4 * grid * model.out_channels if members > 1 else 0
    return (JOB_BASE_BYTES + declared.voxels * (BYTES_PER_SCAN_VOXEL + declared.itemsize)
            + grid * (BYTES_PER_GRID_VOXEL + BYTES_PER_GRID_VOXEL_CLASS * model.out_channels) + windows
            + ensemble_sum)


def _shape_text(declared: Declared) -> str:
    return " x ".join(str(n) for n in declared.shape)


def limit_problem(declared: Declared, limits: JobLimits, memory_bytes: int) -> str | None:
    """The first limit ``declared`` breaks, as one line with the numbers and the flag, or None."""
    if len(declared.shape) == 2:
        problem = pixels_problem(*declared.shape, limits.max_pixels, whose="this server's ")
        if problem:
            return problem
    else:
        if declared.voxels > limits.max_voxels:
            return (f"{_shape_text(declared)} voxels ({declared.voxels / 1e6:.0f} million) exceed this server's "
                    f"--max_voxels {limits.max_voxels / 1e6:g} million")
        extents = sorted(declared.extent_mm)
        if any(extent > limit for extent, limit in zip(extents, sorted(limits.max_extent_mm))):
            shown = " x ".join(f"{e:.0f}" for e in declared.extent_mm)
            return (f"a field of view of {shown} mm is larger than any body this server takes (--max_extent_mm "
                    f"{','.join(f'{v:g}' for v in limits.max_extent_mm)}): check the header's voxel spacing")
    allowed = limits.job_memory_bytes
    if memory_bytes > allowed:
        return (f"{_shape_text(declared)} would need about {memory_bytes / GB:.1f} GB to segment, over this "
                f"server's --max_job_memory_gb {allowed / GB:.1f}: send a smaller scan or crop it")
    return None
