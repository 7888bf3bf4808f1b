"""The three transform chains (train, validation, inference), built from the config in one place.

All are MONAI dictionary transforms on MetaTensors, so every spatial step (orientation, spacing,
foreground crop, padding) is recorded in ``applied_operations`` and can be inverted later to write
masks in the input scan's own geometry.

Train:      load (NaN and infinite voxels refused: the window would clip them into plausible values)
            -> RAS -> resample -> window -> crop to body -> pad to ROI -> random pos/neg crops
            -> flips, 90-degree turns, intensity scale and shift.
            (With ``data.crop_before_resampling``, the default, the body box is found first and only
            it is resampled: load -> RAS -> crop to body -> resample -> window.)
Validation: the same deterministic prefix on image and label.
Inference:  the same deterministic prefix on the image only.

2D pictures (``spatial_dims: 2``), pixels in (x: columns, y: rows) order:
Train:      load -> stored mask values to classes (--label_map) -> 0..1 (by the file's own bit depth: 8 or 16
            bits) -> random resized crop ->
            rotation, left-right flip (--hflip_prob; the datalist's mirror_pairs trade labels), brightness,
            contrast and hue -> ImageNet mean/std.
Validation: load -> 0..1 -> resize to the ROI -> mean/std. Inference: the same on the image only;
            the prediction is resized back to the picture's own size (``infer``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
from monai import transforms as mt
from monai.data import MetaTensor

from ..config.schema import Config
from ..config.validation import parse_label_map
from ..errors import UserError
from .checks import non_finite_problem
from .datalist import mirror_pairs
from .images import PICTURE_SCALE_KEY, SimpleITKReader

IMAGE_LABEL = ("image", "label")
# ImageNet statistics, the usual normalisation of pictures; grayscale takes their mean.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Above:
    """``x > threshold``, or everywhere when no voxel is (a picklable crop criterion for loader workers).

    A scan with nothing above the threshold (all air, constant, NaN) is kept whole rather than cropped
    to an empty box that nothing downstream could resample.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        above = x > self.threshold
        return above if bool(above.any()) else torch.ones_like(above)


class NonFiniteVoxels(UserError):
    """An image holds NaN or infinite voxels; the message counts them (the caller names the file)."""


class RefuseNonFinited(mt.MapTransform):
    """Raises :class:`NonFiniteVoxels` when an image holds a NaN, +inf or -inf voxel, as read (before the
    intensity window, which clips an infinite voxel into a plausible one, and before the body crop, which may
    drop a NaN outside the body). All three alike: the model can use none of them."""

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            image = data[key]
            plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            if not bool(torch.isfinite(plain).all()):
                raise NonFiniteVoxels(non_finite_problem(plain.cpu().numpy()))
        return data


class PictureToUnitd(mt.MapTransform):
    """A picture's values to 0..1 by its file's own bit depth (0..255 for 8 bits, 0..65535 for 16: the
    ``picture_scale`` SimpleITKReader stores), so an 8-bit and a 16-bit copy of a picture are the same input."""

    def __call__(self, data: dict) -> dict:
        result = dict(data)
        for key in self.key_iterator(result):
            image = result[key]
            meta = getattr(image, "meta", {})
            scale = float(meta.get(PICTURE_SCALE_KEY, 255.0))
            result[key] = (image / scale).clamp(0.0, 1.0)
        return result


def _loader(keys: list[str]) -> mt.LoadImaged:
    """MONAI's loader with our SimpleITK reader.

    MONAI also builds a fallback reader for each installed library; with pydicom installed (the
    ``dicom`` extra) its nvImageCodec DICOM reader warns and logs at every build that its GPU decoder
    is missing, about files this loader never gives it.
    """
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return mt.LoadImaged(keys=keys, reader=SimpleITKReader(), ensure_channel_first=True, image_only=True)
    finally:
        plugin_log.setLevel(level)


def preprocessing(config: Config, keys: Sequence[str] = IMAGE_LABEL) -> list[mt.MapTransform]:
    """Deterministic steps shared by all chains; ``keys`` are ``("image",)`` or ``("image", "label")``."""
    data = config.data
    keys = list(keys)
    interpolation = ["bilinear" if key == "image" else "nearest" for key in keys]
    load = [_loader(keys), RefuseNonFinited(keys="image"),
            mt.Orientationd(keys=keys, axcodes=data.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    resample = mt.Spacingd(keys=keys, pixdim=data.pixdim, mode=interpolation)
    window = mt.ScaleIntensityRanged(keys="image", a_min=data.a_min, a_max=data.a_max,
                                     b_min=data.b_min, b_max=data.b_max, clip=True)
    if config.data.crop_before_resampling:
        # The body box (HU above a_min) at the scan's own resolution; only it is resampled, which is
        # most of the preprocessing time of a 512 x 512 scan (the body fills about a third of it).
        crop = mt.CropForegroundd(keys=keys, source_key="image", select_fn=Above(data.a_min), allow_smaller=True,
                                  start_coord_key=None, end_coord_key=None)
        return [*load, crop, resample, window]
    # Reference order. Air is below a_min, so after windowing it is b_min and the crop keeps the body. The
    # criterion is MONAI's default (x > 0), but a scan with nothing above it is kept whole: the default crops an
    # all-air scan to an empty image (weights without stored preprocessing take this order: inference/loader.py).
    crop = mt.CropForegroundd(keys=keys, source_key="image", select_fn=Above(0.0), allow_smaller=True,
                              start_coord_key=None, end_coord_key=None)
    return [*load, resample, window, crop]


def picture_loading(config: Config, keys: Sequence[str]) -> list[mt.MapTransform]:
    """2D: read the picture (and mask), mask values to classes, colours to 0..1 by the file's bit depth."""
    keys = list(keys)
    steps = [_loader(keys)]
    if config.data.label_map is not None and "label" in keys:
        mapping = parse_label_map(config.data.label_map)
        steps.append(mt.MapLabelValued(keys="label", orig_labels=list(mapping), target_labels=list(mapping.values())))
    steps.append(PictureToUnitd(keys="image"))
    return steps


def picture_normalisation(config: Config) -> mt.MapTransform:
    channels = config.model.in_channels
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
    return mt.NormalizeIntensityd(keys="image", subtrahend=mean, divisor=std, channel_wise=True)


def rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """RGB ``(3, ...)`` in 0..1 with its hue turned by ``turns`` of a full circle: a rotation about the
    grey axis of the colour cube, so greys stay grey and a third of a turn sends red to green."""
    angle = 2.0 * math.pi * turns
    axis = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=torch.float64)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]],
                         dtype=torch.float64)
    rotation = math.cos(angle) * torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + \
        (1.0 - math.cos(angle)) * torch.outer(axis, axis)
    turned = (rotation.to(image.dtype) @ image.reshape(3, -1)).reshape(image.shape)
    return turned.clamp(0.0, 1.0)


class RandHueRotated(mt.RandomizableTransform, mt.MapTransform):
    """Turns the hue of RGB pictures (``(3, X, Y)``, 0..1) by a random fraction of a circle in
    ``[-max_turn, max_turn]``; single-channel pictures pass unchanged. MONAI has brightness and
    contrast jitter but no hue jitter."""

    def __init__(self, keys: str | Sequence[str], max_turn: float, prob: float = 1.0):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys)
        self.max_turn = max_turn
        self.turns = 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.turns = float(self.R.uniform(-self.max_turn, self.max_turn))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        result = dict(data)
        if not self._do_transform:
            return result
        for key in self.key_iterator(result):
            image = result[key]
            if image.shape[0] == 3:
                turned = image.clone()
                turned[:] = rotate_hue(torch.as_tensor(image), self.turns)
                result[key] = turned
        return result


class RandMirrord(mt.RandFlipd):
    """MONAI's random flip, and when it flips, each ``(left, right)`` class pair of ``pairs`` trades labels in
    ``label_key``: a face's left eye, mirrored onto the right, is then labelled "right eye" (left and right are
    the viewer's). Without pairs it is ``RandFlipd``, drawing the same random numbers."""

    def __init__(self, keys: Sequence[str], prob: float, spatial_axis: int, pairs: Sequence[tuple[int, int]] = (),
                 label_key: str = "label"):
        super().__init__(keys=keys, prob=prob, spatial_axis=spatial_axis)
        self.pairs, self.label_key = tuple(pairs), label_key

    def __call__(self, data, lazy: bool | None = None):
        result = super().__call__(data, lazy)
        if self._do_transform and self.pairs and self.label_key in result:
            label = result[self.label_key]
            swapped = label.clone()
            for left, right in self.pairs:
                swapped[label == left] = right
                swapped[label == right] = left
            result[self.label_key] = swapped
        return result


def picture_train_transforms(config: Config) -> mt.Compose:
    data, keys = config.data, list(IMAGE_LABEL)
    modes = ("bilinear", "nearest")
    jitter = data.color_jitter
    return mt.Compose([
        *picture_loading(config, keys),
        mt.RandScaleCropd(keys=keys, roi_scale=data.min_crop_scale, max_roi_scale=1.0, random_size=True),
        mt.Resized(keys=keys, spatial_size=config.model.roi_size, mode=modes),
        mt.RandRotated(keys=keys, range_x=math.radians(data.rotate_degrees), prob=1.0 if data.rotate_degrees else 0.0,
                       mode=modes, padding_mode="zeros"),
        # Axis 0 is x: a left-right flip; the datalist's mirror_pairs (shapes2d's faces) swap left and right classes.
        RandMirrord(keys=keys, prob=data.hflip_prob, spatial_axis=0, pairs=mirror_pairs(data)),
        mt.RandScaleIntensityd(keys="image", factors=jitter, prob=1.0 if jitter else 0.0),
        mt.RandAdjustContrastd(keys="image", gamma=(1.0 - jitter, 1.0 + jitter), prob=1.0 if jitter else 0.0),
        RandHueRotated(keys="image", max_turn=data.hue_jitter, prob=1.0 if data.hue_jitter else 0.0),
        picture_normalisation(config),
    ])


def picture_eval_transforms(config: Config, keys: Sequence[str]) -> mt.Compose:
    """Validation (image and label) and inference (image): the whole picture resized to the ROI."""
    modes = ["bilinear" if key == "image" else "nearest" for key in keys]
    return mt.Compose([*picture_loading(config, keys),
                       mt.Resized(keys=list(keys), spatial_size=config.model.roi_size, mode=modes),
                       picture_normalisation(config)])


def train_transforms(config: Config) -> mt.Compose:
    if config.model.spatial_dims == 2:
        return picture_train_transforms(config)
    data = config.data
    keys = list(IMAGE_LABEL)
    roi = config.model.roi_size
    return mt.Compose([
        *preprocessing(config, keys),
        # The random crops raise when the image is smaller than the ROI: pad small scans first.
        mt.SpatialPadd(keys=keys, spatial_size=roi),
        *random_crop(config),
        mt.RandFlipd(keys=keys, prob=data.RandFlipd_prob, spatial_axis=0),
        mt.RandFlipd(keys=keys, prob=data.RandFlipd_prob, spatial_axis=1),
        mt.RandFlipd(keys=keys, prob=data.RandFlipd_prob, spatial_axis=2),
        mt.RandRotate90d(keys=keys, prob=data.RandRotate90d_prob, max_k=data.rotate90_max_k),
        mt.RandScaleIntensityd(keys="image", factors=data.scale_intensity_factor,
                               prob=data.RandScaleIntensityd_prob),
        mt.RandShiftIntensityd(keys="image", offsets=data.shift_intensity_offset,
                               prob=data.RandShiftIntensityd_prob),
    ])


def random_crop(config: Config) -> list[mt.MapTransform]:
    """``num_samples`` ROI crops: reference pos/neg sampling, or every class equally often.

    For 'classes' the voxel indices of each class are computed once, before the first random
    transform, so a cached dataset keeps them and each epoch only draws centres.
    """
    data, keys, roi = config.data, list(IMAGE_LABEL), config.model.roi_size
    if data.crop_sampler == "posneg":
        return [mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=data.pos, neg=data.neg,
                                          num_samples=data.num_samples, image_key="image", image_threshold=0)]
    classes = config.model.out_channels
    return [mt.ClassesToIndicesd(keys="label", num_classes=classes),
            mt.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=roi, num_classes=classes,
                                       ratios=[1] * classes, num_samples=data.num_samples,
                                       indices_key="label_cls_indices", warn=False),
            mt.DeleteItemsd(keys="label_cls_indices")]


def val_transforms(config: Config) -> mt.Compose:
    if config.model.spatial_dims == 2:
        return picture_eval_transforms(config, IMAGE_LABEL)
    return mt.Compose(preprocessing(config, IMAGE_LABEL))


def infer_transforms(config: Config) -> mt.Compose:
    if config.model.spatial_dims == 2:
        return picture_eval_transforms(config, ("image",))
    return mt.Compose(preprocessing(config, ("image",)))
