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

Partly annotated data (datalist entries with ``classes``, as ``btcv-unetr import`` writes them for sets
that annotate only some of the 13 organs) trains with the marginal loss (:class:`MarginalLoss`): for each
case, the predicted probabilities of the classes it does not annotate are summed into background before
the cross entropy and the Dice (or Jaccard) term, so an organ the case does not annotate is unknown, not
background (Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised multi-organ
segmentation"; Fang & Yan 2020, "Multi-organ segmentation over partially labeled datasets with
multi-scale feature abstraction").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

from ..config.schema import TrainConfig
from ..data.images import read_volume

MAX_CLASS_WEIGHT = 5.0


def class_volumes(label_paths: Sequence[str], num_classes: int,
                  annotated: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Mean volume (mL; pictures: pixels / 1000) of each class over the label files, ``(num_classes,)``.

    ``annotated``: per file, the ``(num_classes,)`` booleans of the classes it annotates (None: all); a class
    is averaged over the files that annotate it only, so a set that leaves an organ out does not shrink it.
    """
    total, files = np.zeros(num_classes), np.zeros(num_classes)
    for index, path in enumerate(label_paths):
        volume = read_volume(path)  # every format the datalist may name (NIfTI, NRRD, MHA, PNG)
        labels = np.asarray(volume.data).astype(np.int64, copy=False).ravel()
        counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
        known = np.ones(num_classes, bool) if annotated is None else np.asarray(annotated[index], bool)
        voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine, dtype=np.float64)[:3, :3]))) / 1000.0
        total += np.where(known, counts * voxel_ml, 0.0)
        files += known
    return total / np.maximum(files, 1)


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


# The log-probability of a class a case does not annotate, once merged into background: exp() of it is 0.
NEVER = -1.0e4


def unannotated_as_background(labels: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Class maps ``(B, 1, *spatial)`` with the classes a case does not annotate set to 0 (background).

    ``annotated``: ``(B, C)`` booleans, the classes each case annotates.
    """
    labels = labels.long()
    cases = torch.arange(labels.shape[0], device=labels.device).view(-1, *[1] * (labels.dim() - 1))
    return torch.where(annotated.to(labels.device)[cases, labels], labels, torch.zeros_like(labels))


def marginal_log_probabilities(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``(B, C, *spatial)`` in which each case's unannotated classes are merged into background.

    Channel 0 holds ``log(p_0 + sum of p_u)`` over the classes ``u`` the case does not annotate; their own
    channels hold :data:`NEVER` (probability 0); annotated classes keep ``log p_c``. ``annotated``: ``(B, C)``
    booleans, background always counted as annotated.
    """
    known = annotated.to(logits.device, torch.bool).clone()
    known[:, 0] = True
    known = known.view(*known.shape, *[1] * (logits.dim() - 2))
    log_p = torch.log_softmax(logits, dim=1)
    merged_into_background = ~known
    merged_into_background[:, 0] = True
    background = torch.logsumexp(log_p.masked_fill(~merged_into_background, -math.inf), dim=1, keepdim=True)
    return torch.cat([background, log_p[:, 1:].masked_fill(~known[:, 1:], NEVER)], dim=1)


class MarginalLoss(nn.Module):
    """Cross entropy plus a Dice (or Jaccard) term for cases that annotate only some classes: the marginal loss.

    For each case the softmax probabilities of the classes it does not annotate are summed into background
    (:func:`marginal_log_probabilities`), and the loss is computed on those merged probabilities: where the
    label says background, predicting an unannotated organ costs nothing (it may be there), predicting an
    annotated one costs as usual. A label voxel of a class the case does not annotate counts as background.
    The cross entropy averages over voxels; the region term (``region``: MONAI's ``DiceLoss`` on
    probabilities, ``reduction="none"``, its class weights applied) over the (case, class) pairs the case
    annotates, background included. With every class annotated it is the plain loss: MONAI's DiceCE (or the
    class-weighted DiceCE, or CE + Jaccard) of the same settings.
    """

    def __init__(self, region: DiceLoss):
        super().__init__()
        self.region = region

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` ``(B, C, *spatial)``; ``target`` class indices ``(B, 1, *spatial)``; ``annotated`` ``(B, C)``
        booleans, the classes each case annotates (None: all)."""
        if annotated is None:
            annotated = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        annotated = annotated.to(logits.device, torch.bool).clone()
        annotated[:, 0] = True
        log_probs = marginal_log_probabilities(logits, annotated)
        target = unannotated_as_background(target, annotated)
        cross_entropy = F.nll_loss(log_probs, target[:, 0])
        region = self.region(log_probs.exp(), target).flatten(1)  # (B, C)
        # where(), not a product: a smoothing-free term of an absent class may be NaN and must not leak in
        region = torch.where(annotated, region, torch.zeros_like(region)).sum() / annotated.sum()
        return region + cross_entropy


def region_loss(train: TrainConfig, weights: torch.Tensor | None) -> DiceLoss:
    """The Dice (``dice_ce``) or Jaccard (``ce_jaccard``) term of :class:`MarginalLoss`, per case and class,
    on probabilities, with the settings of the plain losses above."""
    jaccard = train.loss == "ce_jaccard"
    return DiceLoss(to_onehot_y=True, softmax=False, squared_pred=not jaccard, jaccard=jaccard,
                    smooth_nr=train.smooth_nr, smooth_dr=train.smooth_dr, weight=weights, reduction="none")


def build_loss(train: TrainConfig, num_classes: int, label_paths: Sequence[str], device: torch.device,
               annotated: Sequence[np.ndarray] | None = None) -> tuple[nn.Module, np.ndarray | None]:
    """The training loss of ``train.loss`` and its class weights (None: unweighted; with ``dice_ce`` the
    reference's DiceCE).

    ``annotated``: per training label file, the ``(num_classes,)`` booleans of the classes it annotates,
    for partly annotated data: the loss is then the :class:`MarginalLoss` of the same settings (it takes the
    batch's ``(B, C)`` booleans as a third argument). None: every file annotates every class.
    """
    if annotated is not None:
        weights = None if train.class_weights == "none" else \
            inverse_sqrt_volume_weights(class_volumes(label_paths, num_classes, annotated))
        tensor = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        return MarginalLoss(region_loss(train, tensor)), weights
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


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's weights of ``heads`` outputs, full resolution first: halving per level, normalised to sum 1
    (3 heads: 4/7, 2/7, 1/7)."""
    raw = [0.5 ** level for level in range(heads)]
    return [weight / sum(raw) for weight in raw]


class DeepSupervisionLoss(nn.Module):
    """The loss over every output head of a deeply supervised network, weighted as nnU-Net weights them.

    Each head's logits are scored against the labels at that head's resolution (nearest-neighbour downsampling
    of the class map, as nnU-Net downsamples its targets); a head already at full resolution (DynUNet upsamples
    its heads' logits) is scored against the labels as they are. The heads come from
    :func:`btcv_unetr.model.architectures.deep_outputs`; a plain tensor (one head) gives ``loss`` itself.
    """

    def __init__(self, loss: nn.Module, spatial_dims: int):
        super().__init__()
        self.loss, self.spatial_dims = loss, spatial_dims

    def forward(self, output: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:
        """``output`` as the network returns it in training; ``target`` class indices ``(B, 1, *spatial)``;
        ``extra``: the loss's further arguments (the annotated classes of partly annotated data)."""
        from ..model.architectures import deep_outputs
        heads = deep_outputs(output, self.spatial_dims)
        total = torch.zeros((), device=target.device)
        for weight, logits in zip(deep_supervision_weights(len(heads)), heads):
            labels = target
            if tuple(logits.shape[2:]) != tuple(target.shape[2:]):
                labels = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest-exact")
            total = total + weight * self.loss(logits.float(), labels, *extra)
        return total
