"""Inference: ``python test.py`` / ``btcv-unetr infer``; one ``CASE_seg.nii.gz`` per scan in the scan's own geometry.

    find_cases             --input (a NIfTI file, a folder of them, a DICOM series folder) or a datalist split
    auto_sw_batch_size     windows per forward pass, per device, CPU class and free memory
    window_settings        the sliding-window settings test.py and training validation share
    Predictor              loads the model (or an ensemble's) once; preprocess -> sliding window (+ flip TTA) ->
                           softmax (averaged over an ensemble's members) -> to the scan
    probabilities_to_scan  class map (and probabilities) on the scan's own grid
    run_inference          writes masks (atomically), optional probabilities and overlays, and the metrics report;
                           of this process's share of the cases under torchrun or --num_parts (infer_parts.py)

The spatial preprocessing (orientation, spacing, foreground crop) is undone on the class
probabilities by trilinear interpolation, then the argmax is taken on the scan's grid, in one pass:
three 1-D interpolations over only the scan voxels the crop covers. It gives the masks MONAI's
inverse transforms (``Invertd``) give, one channel at a time (the tests' oracle), at a fraction of
the time and memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.transforms import KeepLargestConnectedComponent
from torch import nn
from tqdm import tqdm

from .config import Config, add_config_arguments, config_from_args, parse_label_map
from .checks import Expected, dimension_problems
from .data import case_name, class_names, load_config_split
from .distributed import (Context, barrier, gather_objects, launch, local_world_size, pick_device,
                          share_cpu_threads, under_torchrun)
from .errors import UserError
from .evaluate import CaseMetrics, case_metrics, format_summary, map_values, summarise, write_reports
from .allocator import keep_freed_memory
from .dicom_seg import SEG_SUFFIX, require_highdicom, series_files, write_dicom_seg
from .ensemble import check_compatible, ensemble_card, ensemble_checksum, member_files
from .files import atomic_write, remove_stale_temporaries
from .infer_parts import Part, held_output_folder, mask_problem
from .images import (IMAGE_SUFFIXES, Volume, dicom_series, image_shape, is_image_file, is_picture, mask_path,
                     read_volume, write_dicom_series_as_nifti, write_mask)
from .checkpoint import is_torchscript, load_checkpoint, stored_card, stored_config, weights_checksum
from .model import (build_model, compile_if_asked, describe_model_size, extract_state_dict, load_torchscript_weights, load_weights,
                    prepare_model)
from .precision import cpu_features, resolve_precision, runs_natively
from .pretrained import resolve_pretrained
from .provenance import model_card_lines, provenance as mask_provenance
from .transforms import infer_transforms

LARGE_SCAN_WINDOWS = 64
# Preprocessing keys taken from a training checkpoint's config: the model only works on data
# prepared as it was trained.
PREPROCESSING_KEYS = ("a_min", "a_max", "b_min", "b_max", "space_x", "space_y", "space_z", "axcodes")


@dataclass
class Case:
    name: str
    image: Path
    label: Path | None = None
    dicom: tuple[Path, ...] = ()  # a DICOM input's series files: a SEG references them


def find_cases(config: Config, scratch: Path) -> list[Case]:
    """The scans to segment: ``--input`` (an image file, a folder of them or a DICOM folder), else the datalist split."""
    given = config.infer.input
    if given is None:
        entries = load_config_split(config.data, config.infer.split)
        return [Case(case_name(e["image"]), Path(e["image"]), Path(e["label"]) if "label" in e else None)
                for e in entries]
    path = Path(given)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_file():
        return [Case(case_name(path), path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
    if files:
        return [Case(case_name(p), p) for p in files]
    series = dicom_series(path)
    if not series:
        raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series in this folder")
    cases = []
    for uid in series:  # each series as NIfTI (SimpleITK keeps its geometry): the rest of the pipeline sees files
        nifti = scratch / f"{path.name}{'_' + uid[-8:] if len(series) > 1 else ''}.nii.gz"
        write_dicom_series_as_nifti(path, uid, nifti)
        cases.append(Case(case_name(nifti), nifti, dicom=tuple(series_files(path, uid))))
    return cases


def check_seg_inputs(cases: list[Case]) -> None:
    """``--output_format dicom_seg``: the dicom extra is installed and every case is a DICOM series, or one line."""
    require_highdicom()
    for case in cases:
        if not case.dicom:
            raise UserError(f"{case.image}: --output_format dicom_seg needs a DICOM series input (its folder of "
                            "files); for this file use --output_format nifti")


def check_image(path: Path, expected: Expected) -> None:
    """A readable image of an accepted format with the dimensions and colour channels the model takes,
    or a one-line error naming the file."""
    if not is_image_file(path):
        raise UserError(f"{path}: not an accepted image format ({', '.join(IMAGE_SUFFIXES)}); convert it, "
                        "or give a DICOM series as its folder")
    try:
        volume = read_volume(path) if is_picture(path) else None  # pictures are small: read them whole
        shape = volume.shape if volume is not None else image_shape(path)
    except Exception as exc:  # nibabel and SimpleITK raise several types for unreadable files
        raise UserError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None
    if volume is None:
        volume = Volume(tuple(shape), np.eye(4), np.empty(0), 1)
    problems = dimension_problems(path, volume, expected, is_label=False)
    if problems:
        raise UserError(str(problems[0]))


def with_weights_file(config: Config, path: Path) -> Config:
    """``config`` with its model's weights read from ``path``: a training checkpoint or a state dict, or a
    TorchScript file (told by its content), whose weights go into the UNETR the config builds."""
    saved = "torchscript" if path.is_file() and is_torchscript(path) else config.infer.saved_checkpoint
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, pretrained_dir=str(path.parent), pretrained_model_name=path.name),
        infer=dataclasses.replace(config.infer, saved_checkpoint=saved))


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
    its weights to this project's UNETR built from the flags (its own code is never run on data).
    """
    path = Path(config.train.pretrained_dir) / config.train.pretrained_model_name
    model = build_model(config.model) if config.infer.saved_checkpoint == "torchscript" else None
    if model is not None:
        load_torchscript_weights(model, path)
        return LoadedModel(model.to(device).eval(), config, None, weights_checksum(model.state_dict()))
    content = load_checkpoint(path)
    trained = stored_config(content, str(path)) if isinstance(content, dict) else None
    if trained is not None:
        preprocessing = {key: getattr(trained.data, key) for key in PREPROCESSING_KEYS}
        train = config.train
        if train.precision == "auto" and runs_natively(trained.train.precision, device):
            train = dataclasses.replace(train, precision=trained.train.precision)
        config = dataclasses.replace(config, model=trained.model, train=train,
                                     data=dataclasses.replace(config.data, **preprocessing))
        print(f"using the architecture and preprocessing stored in {path}")
    model = build_model(config.model)
    load_weights(model, extract_state_dict(content, str(path)), str(path))
    stored = content.get("checksum") if isinstance(content, dict) else None  # verified by load_checkpoint
    checksum = stored if isinstance(stored, str) else weights_checksum(model.state_dict())
    return LoadedModel(model.to(device).eval(), config, stored_card(content), checksum)


def load_members(config: Config, device: torch.device) -> tuple[list[Path], list[LoadedModel]]:
    """The weights files and models of ``config``: the ``--checkpoints`` ensemble's (each file as :func:`load_model`
    reads it, TorchScript told by its content), else the one ``pretrained_dir/pretrained_model_name``. A member
    whose architecture or preprocessing differs from the first's is refused in one line."""
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


def class_map(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` as uint8 for ``(C, X, Y, Z)`` scores, ties to the lower class as argmax does.

    A running maximum over the channels: 6x faster on the CPU than ``argmax`` over the strided
    channel axis (0.14 s against 0.83 s for 14 x 177 x 159 x 169).
    """
    best, labels = scores[0].clone(), torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for channel in range(1, scores.shape[0]):
        labels.masked_fill_(scores[channel] > best, channel)
        torch.maximum(best, scores[channel], out=best)
    return labels


def _voxel_map(image: MetaTensor) -> list[tuple[int, float, float]]:
    """Per scan axis j: (preprocessed axis i, a, b) with ``i_index = a * j_index + b``.

    Orientation, spacing and crop only permute, flip, scale and shift the axes (MONAI's Spacing keeps
    the scan's direction cosines, so tilted scans too), so the map from the scan's voxel indices to
    the preprocessed grid's is axis-aligned.
    """
    scan_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
    to_grid = np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ scan_affine
    linear = to_grid[:3, :3]
    tolerance = 1e-6 * np.abs(linear).max()
    mapping = []
    for j in range(3):
        rows = np.flatnonzero(np.abs(linear[:, j]) > tolerance)
        if len(rows) != 1:
            break
        mapping.append((int(rows[0]), float(linear[rows[0], j]), float(to_grid[rows[0], 3])))
    if sorted(i for i, _, _ in mapping) != [0, 1, 2]:
        # Only a preprocessing step that rotates the grid (none of ours does) could get here.
        raise RuntimeError(f"the preprocessed grid is rotated against the scan's (voxel map {linear.tolist()})")
    return mapping


def _linear_weights(count: int, first: int, a: float, b: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower neighbour and weight of the upper one, in a grid padded by one voxel, for ``count`` scan indices."""
    coords = a * torch.arange(first, first + count, dtype=torch.float64) + b + 1.0  # +1: the padding
    coords = coords.clamp(0.0, size + 1.0)
    lower = coords.floor().clamp(max=size).long()
    return lower, (coords - lower).float()


def _crop_box_before_resampling(image: MetaTensor, mapping: list[tuple[int, float, float]],
                                scan_shape: list[int]) -> list[tuple[int, int]] | None:
    """Per scan axis, the ``[start, stop)`` scan voxels of a body crop taken before resampling, else None.

    The crop box's first voxel is the grid's first (resampling keeps the corner); its size is the
    resampling step's input size, which MONAI records with the step.
    """
    steps = [op["class"] for op in image.applied_operations]
    if "CropForeground" not in steps or "SpatialResample" not in steps or \
            steps.index("CropForeground") > steps.index("SpatialResample"):
        return None
    cropped = image.applied_operations[steps.index("SpatialResample")]["orig_size"]  # in grid axis order
    box = []
    for j, (i, a, b) in enumerate(mapping):
        first = int(round(-b / a))  # the scan voxel at grid index 0
        start = first if a > 0 else first - int(cropped[i]) + 1
        box.append((max(0, start), min(scan_shape[j], start + int(cropped[i]))))
    return box


def probabilities_to_scan(probs: torch.Tensor, image: MetaTensor, slab: int = 16,
                          keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Class map ``(X, Y, Z)`` uint8 on the scan's own grid from probabilities ``(C, x, y, z)`` on the
    preprocessed grid of ``image``; with ``keep_probabilities`` also the scan-grid probabilities
    ``(C, X, Y, Z)`` as float16.

    The trilinear interpolation that undoing the preprocessing with MONAI's inverse transforms
    performs, done as three 1-D interpolations over only the scan voxels the crop covers, ``slab``
    scan slices at a time. Beyond the grid's ends: its border values within the scan, or within the
    crop box when the body was cropped before resampling (background outside it); background at
    grid resolution where the crop cut the resampled scan (the reference order).
    """
    mapping = _voxel_map(image)
    scan_shape = [int(n) for n in image.meta["spatial_shape"]]
    grid_shape = probs.shape[1:]
    labels = np.zeros(scan_shape, np.uint8)
    stored = None
    if keep_probabilities:
        stored = np.zeros((probs.shape[0], *scan_shape), np.float16)
        stored[0] = 1.0  # outside the crop: background
    # The scan voxels whose values come from the grid: the rest is background.
    box = _crop_box_before_resampling(image, mapping, scan_shape)
    crop_first = box is not None
    if not crop_first:
        box = []
        for j, (i, a, b) in enumerate(mapping):
            ends = sorted(((-1.0 - b) / a, (grid_shape[i] - b) / a))
            box.append((max(0, int(np.floor(ends[0]))), min(scan_shape[j], int(np.ceil(ends[1])) + 1)))
    if any(stop <= start for start, stop in box):
        return labels, stored
    # One voxel of padding, with the edge values (MONAI resamples with border padding); but in the
    # reference order, where the crop cut the resampled scan, background (the inverse crop pads with it).
    padded = torch.nn.functional.pad(probs[None], (1, 1, 1, 1, 1, 1), mode="replicate")[0]
    for j, (i, a, b) in enumerate(mapping):
        low, high = sorted((b, a * (scan_shape[j] - 1) + b))  # the scan's edges in grid coordinates
        for side, at_scan_edge in ((0, low >= -1.0), (-1, high <= grid_shape[i])):
            if not (at_scan_edge or crop_first):
                face = padded.select(i + 1, side)
                face.zero_()
                face[0] = 1.0
    weights = [_linear_weights(stop - start, start, a, b, grid_shape[i])
               for (start, stop), (i, a, b) in zip(box, mapping)]
    order = [i for i, _, _ in mapping]  # preprocessed axis of scan axes x, y, z
    (x0, x1), (y0, y1), (z0, z1) = box
    for first in range(0, z1 - z0, slab):
        values = padded
        for j in (2, 0, 1):  # scan z first: the slab keeps only the slices it needs
            i = mapping[j][0]
            lower, weight = weights[j]
            if j == 2:
                lower, weight = lower[first:first + slab], weight[first:first + slab]
            shape = [1, 1, 1, 1]
            shape[i + 1] = -1
            weight = weight.view(shape)
            values = values.index_select(i + 1, lower) * (1 - weight) + values.index_select(i + 1, lower + 1) * weight
        values = values.permute(0, *[axis + 1 for axis in order])  # (C, x, y, z) in scan axis order
        z = slice(z0 + first, z0 + first + values.shape[3])
        labels[x0:x1, y0:y1, z] = class_map(values).numpy()
        if stored is not None:
            stored[:, x0:x1, y0:y1, z] = values.numpy()
    return labels, stored


def probabilities_to_picture(probs: torch.Tensor, image: MetaTensor,
                             keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Class map ``(X, Y)`` uint8 in the picture's own size from probabilities ``(C, x, y)`` at the ROI
    size (bilinear, as the picture was resized); with ``keep_probabilities`` those too, float16."""
    size = [int(n) for n in image.meta["spatial_shape"]][:2]
    resized = torch.nn.functional.interpolate(probs[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    labels = class_map(resized).numpy()
    return labels, resized.numpy().astype(np.float16) if keep_probabilities else None


class Predictor:
    """Loads the model (or an ensemble's models: ``--checkpoints``) once and segments any number of scans."""

    def __init__(self, config: Config):
        self.device = pick_device(config.infer.device)
        self.weights_files, members = load_members(config, self.device)
        # The first member's config (architecture, preprocessing, precision) serves all: the others build the
        # same network on the same preprocessing (load_members checked), so one preprocessed image feeds them all.
        self.config = members[0].config
        self.member_checksums = [member.weights_checksum for member in members]
        self.weights_checksum = ensemble_checksum(self.member_checksums)
        self.model_card = ensemble_card(self.weights_files, [member.card for member in members], self.member_checksums)
        print("\n".join(model_card_lines(self.model_card)))
        requested = self.config.train.precision
        stored = requested != config.train.precision
        self.precision = resolve_precision(requested, self.device, self.config.model,
                                           "the training run's setting, from its checkpoint" if stored else "")
        print(self.precision.describe())
        print(describe_model_size(self.config.model))
        self.models: list[nn.Module] = []
        for member in members:
            prepared, self.memory_format = prepare_model(member.model, config.fast, self.device, self.precision.name,
                                                         training=False)
            self.models.append(compile_if_asked(prepared, config.fast))
        self.transform = infer_transforms(self.config)
        model = self.config.model
        self.sw_batch_size = auto_sw_batch_size(config.infer.sw_batch_size, self.device, model.roi_size,
                                                model.feature_size, self.precision.name)
        # Called with the number of windows each forward pass has run (the service's job progress).
        self.on_windows: Callable[[int], None] | None = None

    def window_count(self, image: torch.Tensor) -> int:
        """Windows (all test-time flips and ensemble members included) the networks run on a preprocessed
        ``(1, *spatial)`` image."""
        roi = self.config.model.roi_size
        # As MONAI's sliding window: the image padded to at least one window, then its scan grid.
        size = tuple(max(int(n), r) for n, r in zip(image.shape[1:], roi))
        overlap = (self.config.infer.infer_overlap,) * len(roi)
        slices = dense_patch_slices(size, roi, _get_scan_interval(size, roi, len(roi), overlap))
        flips = 1 + (self.config.model.spatial_dims if self.config.infer.tta else 0)
        return len(slices) * flips * len(self.models)

    def _stitch_device(self, image: torch.Tensor) -> torch.device:
        """Blend windows on the GPU when the class map and its weights fit in a quarter of free memory, else the CPU."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        needed = 2 * 4 * self.config.model.out_channels * image.numel()
        return self.device if needed < torch.cuda.mem_get_info(self.device)[0] // 4 else torch.device("cpu")

    def _window(self, model: nn.Module, window: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(self.device):
            logits = model(window.contiguous(memory_format=self.memory_format))
        if self.on_windows is not None:
            self.on_windows(window.shape[0])
        # The blending buffers are float32 in the default layout: convert both in one pass, not in a
        # strided accumulation per window.
        return logits.to(torch.float32, memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax ``(C, X, Y, Z)`` on CPU for a preprocessed ``(1, X, Y, Z)`` image: an ensemble's is the mean of its
        members' (each with its TTA flips).

        The mean is taken here, on the preprocessed grid, and the argmax once, on the scan's grid
        (:meth:`to_scan`): the way back to the scan is an interpolation whose weights sum to 1, with fixed
        background outside the crop, so the mean here is the mean of the members' probabilities in the scan's own
        geometry.
        """
        total = self._model_probabilities(self.models[0], image)
        for model in self.models[1:]:  # in place: one scan-sized buffer more than a single model needs
            total += self._model_probabilities(model, image)
        return total.div_(len(self.models))

    def _model_probabilities(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """One model's softmax ``(C, X, Y, Z)`` on CPU; TTA averages 3 flips too.

        Windows run on the model's device; they are blended there too when the scan fits, else on the CPU.
        """
        infer = self.config.infer
        dims = self.config.model.spatial_dims
        flips = [()] + ([(axis,) for axis in range(2, 2 + dims)] if infer.tta else [])
        # A bar over the windows when asked, or when a scan holds many windows' worth of voxels.
        progress = infer.sw_progress or image.numel() > LARGE_SCAN_WINDOWS * math.prod(self.config.model.roi_size)
        total, stitch = None, self._stitch_device(image)
        for dims in flips:
            x = image[None].as_tensor() if isinstance(image, MetaTensor) else image[None]
            x = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(x, sw_batch_size=self.sw_batch_size,
                                              predictor=functools.partial(self._window, model),
                                              sw_device=self.device, device=stitch, progress=progress,
                                              **window_settings(self.config))
            probs = torch.softmax(logits, dim=1).cpu()
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        return (total / len(flips))[0]

    def prepare(self, path: Path) -> MetaTensor:
        """The preprocessed image ``(1, x, y, z)`` of the scan at ``path``, or a one-line error naming it."""
        try:
            image = self.transform({"image": str(path)})["image"]
        except Exception as exc:  # MONAI wraps the reader's error (truncated gzip, bad header ...)
            cause = exc.__cause__ or exc
            detail = (str(cause).strip().splitlines() or [""])[0]
            raise UserError(f"{path}: cannot be read ({cause.__class__.__name__}: {detail})") from None
        if not bool(torch.isfinite(image).all()):
            raise UserError(f"{path}: the image has NaN or infinite voxels (btcv-unetr check-data counts them): "
                            "replace them, e.g. by the lowest intensity, and run again")
        return image

    def to_scan(self, probs: torch.Tensor, image: MetaTensor,
                keep_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities) on the scan's grid from ``probs`` on the preprocessed grid of ``image``."""
        if self.config.model.spatial_dims == 2:
            return probabilities_to_picture(probs, image, keep_probabilities)
        return probabilities_to_scan(probs, image, keep_probabilities=keep_probabilities)

    def segment(self, path: Path, keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Native-geometry labels (uint8) and, on request, float16 probabilities ``(C, X, Y, Z)``."""
        image = self.prepare(path)
        return self.to_scan(self.probabilities(image), image, keep_probabilities)

    def provenance(self) -> dict:
        """What this predictor's masks are made with (package version, weights checksum, precision, device,
        overlap, TTA): stored in every mask's header, so that a mask can be traced and made again."""
        infer = self.config.infer
        name = cpu_features().model if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        made_with = mask_provenance(self.weights_checksum, self.precision.name, str(self.device), infer.infer_overlap,
                                    infer.tta, infer.mode, self.model_card, name)
        if len(self.models) > 1:  # weights_sha256 is then the ensemble's (ensemble.ensemble_checksum)
            made_with["ensemble_weights_sha256"] = list(self.member_checksums)
        return made_with


def keep_largest_components(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """MONAI's largest-connected-component filter, per organ (needs scikit-image)."""
    try:
        import skimage  # noqa: F401  (MONAI uses it for connected components on CPU)
    except ImportError:
        raise UserError("--largest_component needs scikit-image: pip install 'btcv-unetr[post]'") from None
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), independent=True)
    return np.asarray(keep(torch.from_numpy(labels)[None])[0]).astype(np.uint8)


def segment_case(predictor: Predictor, case: Case, out_dir: Path, config: Config) -> CaseMetrics | None:
    """Segment one case and write its outputs; returns its metrics when it has a label."""
    infer = config.infer
    started = time.time()
    labels, probabilities = predictor.segment(case.image, keep_probabilities=infer.save_probabilities)
    if infer.largest_component:
        labels = keep_largest_components(labels, predictor.config.model.out_channels)
    picture = predictor.config.model.spatial_dims == 2
    scan_shape = read_volume(case.image).spatial_shape if picture else image_shape(case.image)[:3]
    if labels.shape != tuple(scan_shape):
        raise RuntimeError(f"inverted mask {labels.shape} does not match the input {tuple(scan_shape)}")
    mask_file = mask_path(out_dir, case.name, case.image)
    provenance = predictor.provenance()
    write_mask(labels, case.image, mask_file, provenance=provenance)
    if infer.output_format == "dicom_seg":  # case.image is SimpleITK's NIfTI of the series: the labels' grid
        names = class_names(config.data, predictor.config.model.out_channels)
        write_dicom_seg(labels, nib.load(str(case.image)).affine, case.dicom, names,
                        out_dir / f"{case.name}{SEG_SUFFIX}", provenance=provenance)
    if probabilities is not None:
        atomic_write(out_dir / f"{case.name}_probabilities.npz",
                     lambda tmp: np.savez_compressed(tmp.open("wb"), probabilities=probabilities))
    seconds = time.time() - started
    if infer.overlay and picture:
        from .plots import save_picture_overlay
        save_picture_overlay(np.asarray(read_volume(case.image).data), labels, out_dir / f"{case.name}_overlay.png")
    elif infer.overlay:
        from .plots import save_overlay, to_display_order
        scan = read_volume(case.image)
        image, mask, spacing = to_display_order(np.asarray(scan.data).reshape(scan.shape[:3]), labels, scan.affine)
        save_overlay(image, mask, spacing, out_dir / f"{case.name}_overlay.png", title=case.name)
    print(f"{case.name}: {labels.shape} in {seconds:.1f} s -> {mask_file}")
    if case.label is None:
        return None
    result = score_case(case, labels, predictor.config, infer.hd95)
    result.seconds = seconds
    return result


def score_case(case: Case, labels: np.ndarray, model_config: Config, distances: bool) -> CaseMetrics:
    """Metrics of ``labels`` (the case's mask on its scan's grid) against the case's label file; ``model_config``
    is the model's own (2D or 3D, classes, label map)."""
    picture = model_config.model.spatial_dims == 2
    label = read_volume(case.label)
    truth = np.asarray(label.data).reshape(label.spatial_shape).astype(np.int16)
    if picture and model_config.data.label_map:
        truth = map_values(truth, parse_label_map(model_config.data.label_map))
    spacing = (1.0, 1.0) if picture else tuple(np.linalg.norm(label.affine[:3, :3], axis=0))
    return case_metrics(case.name, labels, truth, spacing, model_config.model.out_channels, distances)


def case_output_names(case: Case, out_dir: Path) -> list[str]:
    """The names of the files :func:`segment_case` may write for ``case``."""
    return [mask_path(out_dir, case.name, case.image).name, f"{case.name}{SEG_SUFFIX}",
            f"{case.name}_probabilities.npz", f"{case.name}_overlay.png"]


def check_distinct_outputs(cases: list[Case], out_dir: Path) -> None:
    """Two inputs whose masks would share one file (``a/case.nii.gz``, ``b/case.nii.gz``) are refused."""
    seen: dict[Path, Case] = {}
    for case in cases:
        target = mask_path(out_dir, case.name, case.image)
        if target in seen:
            raise UserError(f"{seen[target].image} and {case.image} would both write {target}: rename one, "
                            "or segment them into different --output_dir folders")
        seen[target] = case


def remove_part_temporaries(out_dir: Path, part: Part, cases: list[Case], context: Context) -> None:
    """Rank 0 removes the temporaries a killed run left: all of them in a whole run, only its part's cases' in a
    part of a job array (the other parts are writing theirs); the other ranks wait, so that none of theirs goes."""
    if context.is_main:
        names = None if part.whole else {name for case in part.cases(cases)
                                         for name in case_output_names(case, out_dir)}
        remove_stale_temporaries(out_dir, names)
    barrier(context)


def cases_to_segment(cases: list[Case], out_dir: Path, config: Config) -> tuple[list[Case], list[Case]]:
    """``(to segment, kept)``: a case whose outputs exist (mask, and SEG with dicom_seg) is kept unless
    ``--overwrite``; with ``--continue`` only when its mask is complete too (:func:`mask_problem`)."""
    infer = config.infer
    seg = infer.output_format == "dicom_seg"
    todo, kept = [], []
    for case in cases:
        mask = mask_path(out_dir, case.name, case.image)
        written = mask.exists() and (not seg or (out_dir / f"{case.name}{SEG_SUFFIX}").exists())
        problem = mask_problem(mask, case.image) if written and infer.continue_prediction else None
        if written and problem is None and not infer.overwrite:
            print(f"{case.name}: {mask} is complete, kept (--continue)" if infer.continue_prediction else
                  f"{case.name}: {mask} exists, skipped (--overwrite replaces it)")
            kept.append(case)
        else:
            if problem is not None:
                print(f"{case.name}: {mask} is incomplete ({problem}): segmenting it again")
            todo.append(case)
    return todo, kept


def load_predictor_if_needed(predictor: Predictor | None, todo: list[Case], kept: list[Case], config: Config,
                             context: Context) -> Predictor | None:
    """``predictor``, else one loaded when a case is to be segmented, or (``--continue``) a kept mask scored."""
    scoring = config.infer.continue_prediction and any(case.label is not None for case in kept)
    if predictor is not None or not (todo or scoring):
        return predictor
    # Every rank loads the same model: rank 0 alone prints its card.
    with contextlib.nullcontext() if context.is_main else contextlib.redirect_stdout(io.StringIO()):
        return Predictor(config)


def segment_cases(predictor: Predictor | None, todo: list[Case], out_dir: Path, config: Config,
                  stop_on_error: bool, progress: bool) -> tuple[list[CaseMetrics], list[str]]:
    """Segment ``todo``; returns the metrics of the labelled cases and the one-line errors of the failed ones
    (``stop_on_error``: the first error is raised)."""
    # The model's own config (a checkpoint carries it) says what it takes: 2D or 3D, colour channels.
    expected = Expected(predictor.config.model.spatial_dims, predictor.config.model.in_channels) if todo else None
    results, failures = [], []
    for case in tqdm(todo, desc="cases", unit="case", disable=len(todo) < 2 or not progress):
        try:
            check_image(case.image, expected)
            result = segment_case(predictor, case, out_dir, config)
        except UserError as exc:
            if stop_on_error:
                raise
            print(f"{case.name}: failed: {exc}", file=sys.stderr)
            failures.append(str(exc))
            continue
        if result is not None:
            results.append(result)
    return results, failures


def score_kept(predictor: Predictor | None, kept: list[Case], out_dir: Path, config: Config) -> list[CaseMetrics]:
    """``--continue``: the metrics of the kept masks of labelled cases, read from their files (no seconds)."""
    results = []
    for case in kept:
        if case.label is not None:
            mask = read_volume(mask_path(out_dir, case.name, case.image))
            labels = np.asarray(mask.data).reshape(mask.spatial_shape)
            results.append(score_case(case, labels, predictor.config, config.infer.hd95))
    return results


Gathered = tuple[list[CaseMetrics], list[str], int | None]  # a process's metrics, failures, and classes


def report(gathered: list[Gathered], cases: list[Case], out_dir: Path, config: Config, part: Part) -> dict | None:
    """Rank 0: every process's metrics in the order of ``cases`` (as one process lists them), written to
    ``metrics.csv`` and ``summary.json`` by a whole run, printed by a part; then the failed cases, if any,
    as a one-line error. Returns the summary (None without labelled cases)."""
    order = {case.name: index for index, case in enumerate(cases)}
    results = sorted((result for metrics, _, _ in gathered for result in metrics), key=lambda r: order[r.case])
    failures = [failure for _, failed, _ in gathered for failure in failed]
    summary = None
    if results:
        classes = next(count for _, _, count in gathered if count is not None)
        names = class_names(config.data, classes)
        if part.whole:
            summary = write_reports(out_dir, results, classes, names)
        else:  # the other parts' cases are not known here
            summary = summarise(results, classes, names)
            print(f"{part}: the table covers this part's cases; once every part is done, the same command with "
                  "--continue instead of --num_parts/--part_id writes the report over all cases")
        print(format_summary(summary))
        if not math.isnan(summary["mean_organ_dice"]):
            print(f"Overall Mean Dice: {summary['mean_organ_dice']:.4f}")
    if failures:
        print("\n".join(["failed cases:"] + failures), file=sys.stderr)
        raise UserError(f"{len(failures)} of {len(part.cases(cases))} case(s) failed (listed above); the others "
                        "were written")
    return summary


def run_inference(config: Config, predictor: Predictor | None = None, context: Context | None = None) -> dict | None:
    """Segment every case, or this process's share of them (``--num_parts``/``--part_id``, torchrun's ranks:
    :class:`~btcv_unetr.infer_parts.Part`); finished masks are kept unless ``--overwrite`` (``--continue``: checked,
    and scored), failed cases listed at the end. Returns the summary on rank 0 (None elsewhere, or unlabelled).

    ``predictor`` is one already loaded (from ``config``); by default it is loaded when a case needs it.
    ``context`` is this process's torchrun world (default: this process alone).

    Every output is written to a temporary name and renamed, so an interrupted run leaves complete
    masks only, and running the same command again segments the rest.
    """
    context = context or Context(0, 1, 0, torch.device("cpu"))
    out_dir = Path(config.infer.output_dir)
    part = Part.of(config.infer, context)
    with held_output_folder(out_dir, part, context), tempfile.TemporaryDirectory() as scratch:
        cases = find_cases(config, Path(scratch))
        check_distinct_outputs(cases, out_dir)
        if config.infer.output_format == "dicom_seg":
            check_seg_inputs(cases)
        remove_part_temporaries(out_dir, part, cases, context)
        todo, kept = cases_to_segment(part.mine(cases), out_dir, config)
        predictor = load_predictor_if_needed(predictor, todo, kept, config, context)
        # One process stops at a lone case's error; ranks collect theirs, so that rank 0 reports them all.
        results, failures = segment_cases(predictor, todo, out_dir, config,
                                          stop_on_error=len(cases) == 1 and not context.distributed,
                                          progress=context.is_main)
        if config.infer.continue_prediction:
            results += score_kept(predictor, kept, out_dir, config)
        classes = predictor.config.model.out_channels if predictor is not None else None
        gathered = gather_objects((results, failures, classes), context)
        return report(gathered, cases, out_dir, config, part) if context.is_main else None


def infer_worker(context: Context, config: Config) -> None:
    """One torchrun rank: its share of the cases (and on the CPU of the machine's cores), into the output
    folder all ranks share."""
    if context.device.type == "cpu":
        share_cpu_threads(local_world_size(context))
    run_inference(config, context=context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "infer")


def run(args: argparse.Namespace) -> int:
    config = resolve_pretrained(config_from_args(args), "infer")
    if config.fast.malloc_tuning and pick_device(config.infer.device).type == "cpu":
        keep_freed_memory()
    try:
        if under_torchrun():  # torchrun --nproc_per_node N test.py ...: each rank segments its share
            launch(infer_worker, config)
        else:
            run_inference(config)
    except KeyboardInterrupt:
        print("interrupted: the masks written so far are complete; run the same command again to segment the rest",
              file=sys.stderr)
        return 130
    return 0

