"""Overlap metrics of class maps, one definition for training's validation and for ``evaluate``/``test.py``.

    overlap_scores   Dice and IoU per case and class 1..N-1 (MONAI's), NaN where the label lacks the class
    pixel_accuracy   the share of voxels (pixels) whose class is right, background included
    nan_mean         the mean of the values that are defined (absent classes are NaN)

Training validates on preprocessed crops, ``evaluate`` on masks in each scan's own grid; both score here, so a
model's validation Dice and its masks' Dice are the same computation. The surface distances (HD95, surface Dice)
are ``evaluate``'s alone (``btcv_unetr.inference.evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou


def overlap_scores(predicted: torch.Tensor, label: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of the class maps ``predicted`` and ``label`` ``(B, 1, *spatial)`` (integer classes), per case
    and class 1..classes-1: two float32 ``(B, classes - 1)`` tensors on their device, NaN where a case's label lacks
    the class (an organ that is absent is left out of the means, as the reference does), 0 where only the
    prediction lacks it.

    One class at a time on boolean masks: memory stays at two masks whatever the number of classes (a one-hot of a
    full-resolution CT with 14 classes is gigabytes). Voxel counts are exact integers, so the scores are those of
    MONAI's ``DiceMetric``/``MeanIoU`` on one-hot tensors, to the last bit, below 2^24 voxels per class.
    """
    dice, iou = [], []
    for organ in range(1, classes):
        guess, truth = predicted == organ, label == organ
        dice.append(compute_dice(guess, truth, include_background=True, ignore_empty=True))
        iou.append(compute_iou(guess, truth, include_background=True, ignore_empty=True))
    if not dice:
        empty = torch.empty(predicted.shape[0], 0, device=predicted.device)
        return empty, empty.clone()
    return torch.cat(dice, dim=1).float(), torch.cat(iou, dim=1).float()


def pixel_accuracy(predicted: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The share of voxels whose class is right, per case, ``(B,)`` float64, of class maps ``(B, 1, *spatial)``:
    the exact count divided by the voxels (float64, as numpy's mean of the same masks)."""
    right = (predicted == label).flatten(1).sum(1)
    return right.double() / predicted[0].numel()


def nan_mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (absent classes), NaN if none is."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
