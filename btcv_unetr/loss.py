"""The training loss: MONAI's DiceCE as the reference recipe sets it (or CE + soft Jaccard), with optional
class weights.

``class_weights: inverse_sqrt_volume`` weights each organ's Dice term by
``sqrt(median organ volume / organ volume)``, clipped to ``[1, MAX_CLASS_WEIGHT]``, from the training
labels. Why: with a softmax, the Dice gradient of a class is proportional to its probability, and the
cross entropy drives the probability of a class of a few hundred voxels (the adrenal glands) near zero
everywhere before the network has features for it; the class may then never be learned in a short
run. A larger Dice weight lifts it out of that. The cross entropy stays unweighted: weighting it moves
the decision boundary between classes of similar intensity (on the phantoms the kidneys lost 0.06 Dice
to the veins, and the demo's mean fell from 0.794 to 0.747, when it was weighted too).

``loss: ce_jaccard`` replaces the Dice term by the soft Jaccard (IoU) loss of each class,
``1 - sum(p g) / (sum p + sum g - sum(p g))`` over the softmax probabilities ``p`` and the one-hot target
``g`` (MONAI's ``DiceLoss(jaccard=True)``, probabilities not squared), averaged over crops and classes,
plus the same unweighted cross entropy. The class weights weight its Jaccard terms as they weight Dice's.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from .config import TrainConfig

MAX_CLASS_WEIGHT = 5.0


def class_volumes(label_paths: Sequence[str], num_classes: int) -> np.ndarray:
    """Mean volume (mL) of each class over the label files, ``(num_classes,)``."""
    total = np.zeros(num_classes)
    for path in label_paths:
        image = nib.load(path)
        labels = np.asarray(image.dataobj).astype(np.int64, copy=False).ravel()
        counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
        total += counts * float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    return total / max(len(label_paths), 1)


def inverse_sqrt_volume_weights(volumes: np.ndarray) -> np.ndarray:
    """``sqrt(median organ volume / volume)`` clipped to ``[1, MAX_CLASS_WEIGHT]``; background (0) gets 1.

    A class that never occurs gets the largest weight (it cannot add a gradient anyway).
    """
    organs = volumes[1:]
    median = float(np.median(organs[organs > 0])) if np.any(organs > 0) else 1.0
    with np.errstate(divide="ignore"):
        ratio = np.sqrt(median / organs)
    return np.concatenate([[1.0], np.clip(ratio, 1.0, MAX_CLASS_WEIGHT)])


class ClassWeightedDiceCELoss(nn.Module):
    """MONAI's Dice loss with per-class weights plus an unweighted cross entropy (their sum, as DiceCE).

    The weighted Dice term is ``mean(weight_c * dice_loss_c)``, as MONAI weights it. The weights are not
    rescaled to a mean of 1: on the phantoms that weakened the Dice term against the cross entropy and
    cost 0.03 mean Dice (0.761 against 0.794 after the demo's 900 steps).
    """

    def __init__(self, weights: torch.Tensor, smooth_nr: float, smooth_dr: float):
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=smooth_nr,
                             smooth_dr=smooth_dr, weight=weights)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, C, X, Y, Z)``; ``target`` class indices ``(B, 1, X, Y, Z)``."""
        return self.dice(logits, target) + self.cross_entropy(logits, target[:, 0].long())


class CEJaccardLoss(nn.Module):
    """Cross entropy plus the soft Jaccard (IoU) loss of each class (their sum), optionally class-weighted.

    The Jaccard term is MONAI's ``DiceLoss(jaccard=True)``: per crop and class
    ``1 - (2 I + smooth_nr) / (2 (P + G - I) + smooth_dr)`` with ``I = sum(p g)``, ``P = sum p``, ``G = sum g``
    over the spatial axes (2D or 3D), then ``mean(weight_c * jaccard_c)``. The cross entropy is unweighted.
    """

    def __init__(self, weights: torch.Tensor | None, smooth_nr: float, smooth_dr: float):
        super().__init__()
        self.jaccard = DiceLoss(to_onehot_y=True, softmax=True, jaccard=True, squared_pred=False,
                                smooth_nr=smooth_nr, smooth_dr=smooth_dr, weight=weights)
        self.cross_entropy = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, C, *spatial)``; ``target`` class indices ``(B, 1, *spatial)``."""
        return self.jaccard(logits, target) + self.cross_entropy(logits, target[:, 0].long())


def build_loss(train: TrainConfig, num_classes: int, label_paths: Sequence[str],
               device: torch.device) -> tuple[nn.Module, np.ndarray | None]:
    """The training loss of ``train.loss`` and its class weights (None: unweighted; with ``dice_ce`` the
    reference's DiceCE)."""
    if train.class_weights == "none":
        if train.loss == "ce_jaccard":
            return CEJaccardLoss(None, train.smooth_nr, train.smooth_dr), None
        return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=train.smooth_nr,
                          smooth_dr=train.smooth_dr), None
    weights = inverse_sqrt_volume_weights(class_volumes(label_paths, num_classes))
    tensor = torch.tensor(weights, dtype=torch.float32, device=device)
    if train.loss == "ce_jaccard":
        return CEJaccardLoss(tensor, train.smooth_nr, train.smooth_dr), weights
    return ClassWeightedDiceCELoss(tensor, train.smooth_nr, train.smooth_dr), weights
