"""The three transform chains (train, validation, inference), built from the config in one place.

All are MONAI dictionary transforms on MetaTensors, so every spatial step (orientation, spacing,
foreground crop, padding) is recorded in ``applied_operations`` and can be inverted later to write
masks in the input scan's own geometry.

Train:      load -> RAS -> resample -> window -> crop to body -> pad to ROI -> random pos/neg crops
            -> flips, 90-degree turns, intensity scale and shift.
            (With ``fast.crop_before_resampling``, the default, the body box is found first and only
            it is resampled: load -> RAS -> crop to body -> resample -> window.)
Validation: the same deterministic prefix on image and label.
Inference:  the same deterministic prefix on the image only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai import transforms as mt

from .config import Config
from .images import SimpleITKReader

IMAGE_LABEL = ("image", "label")


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


def preprocessing(config: Config, keys: Sequence[str] = IMAGE_LABEL) -> list[mt.MapTransform]:
    """Deterministic steps shared by all chains; ``keys`` are ``("image",)`` or ``("image", "label")``."""
    data = config.data
    keys = list(keys)
    interpolation = ["bilinear" if key == "image" else "nearest" for key in keys]
    load = [mt.LoadImaged(keys=keys, reader=SimpleITKReader(), ensure_channel_first=True, image_only=True),
            mt.Orientationd(keys=keys, axcodes=data.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    resample = mt.Spacingd(keys=keys, pixdim=data.pixdim, mode=interpolation)
    window = mt.ScaleIntensityRanged(keys="image", a_min=data.a_min, a_max=data.a_max,
                                     b_min=data.b_min, b_max=data.b_max, clip=True)
    if config.fast.crop_before_resampling:
        # The body box (HU above a_min) at the scan's own resolution; only it is resampled, which is
        # most of the preprocessing time of a 512 x 512 scan (the body fills about a third of it).
        crop = mt.CropForegroundd(keys=keys, source_key="image", select_fn=Above(data.a_min), allow_smaller=True,
                                  start_coord_key=None, end_coord_key=None)
        return [*load, crop, resample, window]
    # Reference order. Air is below a_min, so after windowing it is b_min and the crop keeps the body.
    crop = mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True,
                              start_coord_key=None, end_coord_key=None)
    return [*load, resample, window, crop]


def train_transforms(config: Config) -> mt.Compose:
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
    return mt.Compose(preprocessing(config, IMAGE_LABEL))


def infer_transforms(config: Config) -> mt.Compose:
    return mt.Compose(preprocessing(config, ("image",)))
