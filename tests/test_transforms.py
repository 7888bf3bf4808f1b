import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from btcv_unetr.data import load_config_split
from btcv_unetr.transforms import infer_transforms, train_transforms, val_transforms

from conftest import tiny_config

NO_AUGMENTATION = {"RandFlipd_prob": 0.0, "RandRotate90d_prob": 0.0, "RandScaleIntensityd_prob": 0.0,
                   "RandShiftIntensityd_prob": 0.0}


@pytest.fixture
def entry(phantom_dir):
    return load_config_split(tiny_config(phantom_dir).data, "training")[0]


def test_train_chain_gives_roi_crops_with_scaled_intensity(phantom_dir, entry):
    config = tiny_config(phantom_dir, data=NO_AUGMENTATION)
    samples = train_transforms(config)(entry)
    assert len(samples) == config.data.num_samples == 2
    for sample in samples:
        assert sample["image"].shape == sample["label"].shape == (1, 32, 32, 32)
        assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
        assert set(torch.unique(sample["label"]).tolist()) <= set(range(14))


def test_positive_crops_contain_organs(phantom_dir, entry):
    config = tiny_config(phantom_dir, data={"pos": 1.0, "neg": 0.0, "num_samples": 4})
    samples = train_transforms(config)(entry)
    assert all(int((s["label"] > 0).sum()) > 0 for s in samples)


def test_scans_smaller_than_the_roi_are_padded(phantom_dir, entry):
    # At 16 mm spacing the phantom is about 25 x 20 x 20 voxels after the foreground crop.
    config = tiny_config(phantom_dir, model={"roi_x": 64, "roi_y": 64, "roi_z": 64},
                         data={"space_x": 16.0, "space_y": 16.0, "space_z": 16.0})
    samples = train_transforms(config)(entry)
    assert all(s["image"].shape == (1, 64, 64, 64) for s in samples)


def test_validation_chain_resamples_to_ras_at_target_spacing(phantom_dir, entry):
    config = tiny_config(phantom_dir)
    out = val_transforms(config)(entry)
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor) and image.shape == label.shape and image.shape[0] == 1
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert np.allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0), config.data.pixdim)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    names = [op["class"] for op in image.applied_operations]
    assert names == ["Orientation", "CropForeground", "SpatialResample"]  # what inversion needs (crop first)
    reference_order = val_transforms(tiny_config(phantom_dir, fast={"crop_before_resampling": False}))(entry)
    assert [op["class"] for op in reference_order["image"].applied_operations] == \
        ["Orientation", "SpatialResample", "CropForeground"]


def test_inverting_the_validation_chain_restores_the_scan_geometry(phantom_dir, entry):
    original = nib.load(entry["label"])
    chain = val_transforms(tiny_config(phantom_dir))
    out = chain(entry)
    restored = chain.inverse({"image": out["image"], "label": out["label"]})["label"]
    assert tuple(restored.shape[1:]) == original.shape
    assert np.allclose(restored.affine.numpy(), original.affine, atol=1e-4)
    # Nearest-neighbour round trip through 6 mm voxels keeps most labels where they were.
    agreement = (restored[0].numpy().astype(np.uint8) == np.asarray(original.dataobj)).mean()
    assert agreement > 0.95


def test_inference_chain_needs_no_label(phantom_dir, entry):
    out = infer_transforms(tiny_config(phantom_dir))({"image": entry["image"]})
    assert set(out) == {"image"} and out["image"].ndim == 4


def _rare_class_volume() -> dict:
    """A 64^3 label with a large organ (class 1) in the far half and a 3^3 rare one (class 13) in a corner."""
    label = torch.zeros(1, 64, 64, 64)
    label[:, 40:60, 8:56, 8:56] = 1
    label[:, 4:7, 4:7, 4:7] = 13
    return {"image": label.clone() / 13, "label": label}


@pytest.mark.parametrize("sampler", ["classes", "posneg"])
def test_class_balanced_crops_show_a_rare_class_as_often_as_the_others(sampler):
    """'classes' centres a third of the crops on each present class (0, 1, 13): the 27-voxel organ is in
    at least about a third of them; the reference's pos/neg sampler almost never shows it."""
    from monai.transforms import Compose
    from btcv_unetr.transforms import random_crop
    config = tiny_config(data={"crop_sampler": sampler, "num_samples": 4})
    crops = Compose(random_crop(config)).set_random_state(seed=0)
    shown, total = 0, 0
    for _ in range(40):
        for crop in crops(_rare_class_volume()):
            assert tuple(crop["label"].shape) == (1, 32, 32, 32)
            shown += bool((crop["label"] == 13).any())
            total += 1
    share = shown / total
    if sampler == "classes":
        assert share > 0.28
    else:
        assert share < 0.1
