"""Per-case, per-class metrics (Dice, IoU and pixel accuracy: ``btcv_unetr.metrics``, as training validates; MONAI's
HD95 and normalised surface Dice) and their reports.

``btcv-unetr evaluate --pred DIR --label DIR|DATALIST.json`` scores any predictions, ours or another tool's,
matching files by case name (``img0035_seg.nii.gz`` <-> ``label0035.nii.gz`` / ``img0035.nii.gz``), volumes
(NIfTI, NRRD, MHA) or 2D masks (PNG). Distances are in mm, computed in each label's own voxel spacing
(pixels for pictures).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.validation import parse_label_map
from ..data.datalist import LABELLED_SPLITS, case_name, label_names, read_datalist, split_entries
from ..data.images import is_image_file, read_volume, voxel_spacing
from ..errors import UserError
from ..files import atomic_write, atomic_write_json
from ..metrics import nan_mean, overlap_scores, pixel_accuracy

NSD_TOLERANCE_MM = 2.0

# The config flags of ``evaluate``: the classes, the label map and whether distances are computed.
EVALUATE_FLAGS: CommandFlags = {"model": ("out_channels",), "data": ("label_map",), "infer": ("hd95",)}


@dataclass
class CaseMetrics:
    """Metrics of one case; one value per organ (classes 1..N-1), NaN where the organ is absent from the label."""

    case: str
    dice: list[float]
    hd95: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: float = math.nan
    iou: list[float] = field(default_factory=list)
    accuracy: float = math.nan  # share of voxels (pixels) whose class is right, background included


def _class_map(classes: np.ndarray) -> torch.Tensor:
    """An integer class map ``(*spatial)`` as a tensor ``(1, 1, *spatial)`` sharing its memory where torch can
    compare its dtype (unsigned types wider than 8 bits are widened: torch has no comparisons for them)."""
    if classes.dtype.kind == "u" and classes.dtype.itemsize > 1:
        classes = classes.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(classes))[None, None]


def case_metrics(case: str, prediction: np.ndarray, label: np.ndarray, spacing: Sequence[float], num_classes: int,
                 distances: bool = True) -> CaseMetrics:
    """Score integer label maps of the same shape; one organ at a time so memory stays at two masks."""
    if prediction.shape != label.shape:
        raise UserError(f"{case}: prediction shape {prediction.shape} differs from label shape {label.shape}")
    spacing = [float(s) for s in spacing]  # MONAI refuses numpy scalars (nibabel's zooms)
    predicted, truth_map = _class_map(prediction), _class_map(label)
    dice, iou = (scores[0].tolist() for scores in overlap_scores(predicted, truth_map, num_classes))
    hd95, nsd = [], []  # without distances they stay empty
    for organ in range(1, num_classes if distances else 1):
        truth, guess = truth_map == organ, predicted == organ
        if not truth.any():  # an organ absent from the label: left out of the means
            hd95.append(math.nan)
            nsd.append(math.nan)
        elif guess.any():
            hd95.append(float(compute_hausdorff_distance(guess, truth, include_background=True, percentile=95,
                                                         spacing=spacing)))
            nsd.append(float(compute_surface_dice(guess, truth, [NSD_TOLERANCE_MM], include_background=True,
                                                  spacing=spacing)))
        else:  # an organ missed entirely: no surface to measure from
            hd95.append(math.inf)
            nsd.append(0.0)
    return CaseMetrics(case, dice, hd95, nsd, iou=iou, accuracy=float(pixel_accuracy(predicted, truth_map)[0]))


def summarise(results: Sequence[CaseMetrics], num_classes: int, names: Sequence[str] | None = None) -> dict:
    """Per-organ means over cases (absent organs left out) and the mean organ Dice, as the reference reports.
    ``names``: of classes 1..N-1 (default: :func:`~btcv_unetr.data.datalist.label_names`' fallback)."""
    organs = list(names) if names is not None else label_names(None, num_classes)
    summary: dict = {"cases": len(results), "organs": {}}
    for index, organ in enumerate(organs):
        entry = {"dice": nan_mean([r.dice[index] for r in results])}
        if all(r.iou for r in results) and results:
            entry["iou"] = nan_mean([r.iou[index] for r in results])
        if all(r.hd95 for r in results) and results:
            entry["hd95_mm"] = nan_mean([r.hd95[index] for r in results])
            entry["nsd"] = nan_mean([r.nsd[index] for r in results])
        summary["organs"][organ] = entry
    summary["mean_organ_dice"] = nan_mean([e["dice"] for e in summary["organs"].values()])
    summary["mean_case_dice"] = nan_mean([nan_mean(r.dice) for r in results])
    if all(r.iou for r in results) and results:
        summary["mean_iou"] = nan_mean([e["iou"] for e in summary["organs"].values()])
        summary["accuracy"] = nan_mean([r.accuracy for r in results])
    return summary


def format_summary(summary: dict) -> str:
    """The per-class table (Dice, IoU, and the distances when computed) and the means under it."""
    width = max(len("mean organ Dice"), *(len(name) for name in summary["organs"])) + 2
    distances = any("hd95_mm" in e for e in summary["organs"].values())
    overlap = "mean_iou" in summary
    lines = [f"{'class':<{width}}{'Dice':>8}" + (f"{'IoU':>8}" if overlap else "")
             + (f"{'HD95':>10}{'NSD':>8}" if distances else "")]
    for name, entry in summary["organs"].items():
        line = f"{name:<{width}}{entry['dice']:>8.4f}" + (f"{entry['iou']:>8.4f}" if overlap else "")
        if distances:
            line += f"{entry['hd95_mm']:>10.2f}{entry['nsd']:>8.4f}"
        lines.append(line)
    lines.append(f"{'mean organ Dice':<{width}}{summary['mean_organ_dice']:>8.4f}   ({summary['cases']} cases)")
    if overlap:
        lines.append(f"{'mean IoU':<{width}}{summary['mean_iou']:>8.4f}")
        lines.append(f"{'pixel accuracy':<{width}}{summary['accuracy']:>8.4f}   (background included)")
    return "\n".join(lines)


def write_reports(out_dir: Path, results: Sequence[CaseMetrics], num_classes: int,
                  names: Sequence[str] | None = None) -> dict:
    """``metrics.csv`` (a row per case and organ) and ``summary.json``; returns the summary."""
    organs = list(names) if names is not None else label_names(None, num_classes)

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case", "organ", "dice", "iou", "hd95_mm", "nsd", "seconds"])
            for r in results:
                for index, organ in enumerate(organs):
                    iou = r.iou[index] if r.iou else math.nan
                    hd95 = r.hd95[index] if r.hd95 else math.nan
                    nsd = r.nsd[index] if r.nsd else math.nan
                    writer.writerow([r.case, organ, f"{r.dice[index]:.5f}", f"{iou:.5f}", f"{hd95:.3f}", f"{nsd:.5f}",
                                     f"{r.seconds:.2f}"])

    atomic_write(out_dir / "metrics.csv", write_csv)
    summary = summarise(results, num_classes, names)
    atomic_write_json(out_dir / "summary.json", _json_safe(summary))
    return summary


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    return value


def match_key(path: Path) -> str:
    """Key that pairs a prediction with its label: the case name without ``_seg`` and the img/label prefix."""
    name = case_name(path).removesuffix("_seg")
    return re.sub(r"^(img|image|label|seg)", "", name)


def _mask_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def label_files(source: Path) -> list[Path]:
    """Label files from a folder, or from every labelled entry of a datalist JSON."""
    if source.is_dir():
        return _mask_files(source)
    if source.is_file() and source.suffix == ".json":
        content = read_datalist(source)
        return [Path(entry["label"]) for split in LABELLED_SPLITS
                for entry in split_entries(content, split, source.parent)]
    raise UserError(f"--label {source}: not a folder of masks nor a datalist .json")


def evaluate_folders(pred_dir: Path, label_source: Path, num_classes: int, distances: bool,
                     label_map: dict[int, int] | None = None) -> list[CaseMetrics]:
    if not pred_dir.is_dir():
        raise UserError(f"not a folder: {pred_dir}")
    labels = {match_key(p): p for p in label_files(label_source)}
    predictions = {match_key(p): p for p in _mask_files(pred_dir) if "_overlay" not in p.name}
    common = sorted(set(labels) & set(predictions))
    if not common:
        raise UserError(f"no prediction in {pred_dir} matches a label in {label_source} by case name")
    results = []
    for key in common:
        label, prediction = read_volume(labels[key]), read_volume(predictions[key])
        if not np.allclose(label.affine, prediction.affine, atol=1e-3):
            raise UserError(f"{predictions[key]}: affine differs from its label {labels[key]}")
        truth = np.asarray(label.data).reshape(label.spatial_shape).astype(np.int16)
        if label_map is not None:
            truth = map_values(truth, label_map)
        picture = len(label.spatial_shape) == 2
        spacing = (1.0, 1.0) if picture else voxel_spacing(label.affine)
        results.append(case_metrics(case_name(predictions[key]).removesuffix("_seg"),
                                    np.asarray(prediction.data).reshape(prediction.spatial_shape).astype(np.int16),
                                    truth, spacing, num_classes, distances))
    return results


def map_values(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Stored mask values to classes (``--label_map``); values not in ``mapping`` become background."""
    lookup = np.zeros(max(int(labels.max()), max(mapping)) + 1, dtype=np.int16)
    for stored, target in mapping.items():
        lookup[stored] = target
    return lookup[np.clip(labels, 0, None)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pred``, ``--label``, ``--out``, and the config's flags of ``evaluate`` (:data:`EVALUATE_FLAGS`):
    ``--out_channels``, ``--label_map``, ``--no_hd95``."""
    parser.add_argument("--pred", required=True, help="folder of predicted masks (NIfTI, NRRD, MHA; PNG in 2D)")
    parser.add_argument("--label", required=True, help="folder of ground-truth masks (NIfTI, NRRD, MHA; PNG in 2D), "
                        "or a datalist .json (paths relative to it; its labels name the classes)")
    parser.add_argument("--out", default=None, help="folder for metrics.csv and summary.json (default: --pred)")
    add_config_arguments(parser, EVALUATE_FLAGS)


def report_names(label_source: Path, num_classes: int) -> list[str]:
    """Names of classes 1..N-1 for the report: a datalist ``--label``'s ``labels``, else the fallback."""
    labels = read_datalist(label_source).get("labels") if label_source.suffix == ".json" and \
        label_source.is_file() else None
    return label_names(labels, num_classes)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    classes = config.model.out_channels
    label_map = parse_label_map(config.data.label_map) if config.data.label_map else None
    results = evaluate_folders(Path(args.pred), Path(args.label), classes, config.infer.hd95, label_map)
    summary = write_reports(Path(args.out or args.pred), results, classes, report_names(Path(args.label), classes))
    print(format_summary(summary))
    return 0
