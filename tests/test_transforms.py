import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.data import MetaTensor

from btcv_unetr.data.datalist import load_config_split, make_dataset
from btcv_unetr.data.transforms import infer_transforms, train_transforms, val_transforms

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
    reference_order = val_transforms(tiny_config(phantom_dir, data={"crop_before_resampling": False}))(entry)
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

    from btcv_unetr.data.transforms import random_crop
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


def _scan_with_two_rare_organs(folder) -> dict:
    """A 64^3 scan at the tiny config's 6 mm spacing, all body (preprocessing keeps the 64^3 grid): a 16^3
    organ (class 1) in the middle and two 3^3 ones in opposite corners (class 13 low, class 7 high)."""
    label = np.zeros((64, 64, 64), np.uint8)
    label[24:40, 24:40, 24:40] = 1
    label[4:7, 4:7, 4:7] = 13
    label[57:60, 57:60, 57:60] = 7
    image = np.where(label > 0, 120, 40).astype(np.int16)  # soft tissue HU, all above a_min
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    paths = {"image": folder / "img.nii.gz", "label": folder / "lab.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return {key: str(path) for key, path in paths.items()}


def _share_of_crops_showing(sampler: str, entry: dict, classes=(13, 7), draws: int = 50) -> dict[int, float]:
    """Drawn as training draws them: the chain in training's own dataset (make_dataset: loaded, resampled and the
    class indices found once, cached, then only the random steps per draw). 8 crops per draw: 400 crops, enough
    that a share is known to +-0.02."""
    config = tiny_config(data={"crop_sampler": sampler, "num_samples": 8})
    assert config.data.crop_sampler == sampler
    dataset = make_dataset([entry], train_transforms(config).set_random_state(seed=0), config.data)
    shown, total = dict.fromkeys(classes, 0), 0
    for _ in range(draws):
        for crop in dataset[0]:
            assert tuple(crop["image"].shape) == tuple(crop["label"].shape) == (1, *config.model.roi_size)
            for value in classes:
                shown[value] += bool((crop["label"] == value).any())
            total += 1
    return {value: count / total for value, count in shown.items()}


def test_the_whole_training_chain_with_classes_shows_each_present_class_in_its_equal_share(tmp_path):
    """crop_sampler=classes: each of 4 present classes (0, 1, 7, 13) centres about 1/4 of the crops, so each
    27-voxel organ is in 0.25 +- 0.08 of the 400 ROI-sized crops; posneg shows either in under 0.08."""
    entry = _scan_with_two_rare_organs(tmp_path)
    present = np.unique(np.asarray(nib.load(entry["label"]).dataobj))
    assert present.tolist() == [0, 1, 7, 13]
    balanced = _share_of_crops_showing("classes", entry)
    # A crop centred on the middle organ or on background near the middle reaches neither corner, so the
    # share is 1/4 plus the few background centres within 16 voxels of a corner (about 1% of crops).
    for share in balanced.values():
        assert abs(share - 1 / len(present)) < 0.08, balanced
    assert abs(balanced[13] - balanced[7]) < 0.1, balanced  # equal ratios, not a favoured class
    reference = _share_of_crops_showing("posneg", entry)
    assert all(share < 0.08 for share in reference.values()), reference


def test_a_third_of_a_hue_turn_sends_red_to_green_and_keeps_greys():
    from btcv_unetr.data.transforms import rotate_hue
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.6, 0.9]]).T[:, :, None]
    turned = rotate_hue(colours, 1 / 3)
    assert torch.allclose(turned[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # red -> green
    assert torch.allclose(turned[:, 1, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # green -> blue
    assert torch.allclose(turned[:, 2, 0], colours[:, 2, 0], atol=1e-6)  # grey stays grey
    muted = torch.tensor([0.4, 0.5, 0.6])[:, None, None]  # stays inside the colour cube: no clipping
    assert torch.allclose(rotate_hue(rotate_hue(muted, 0.07), -0.07), muted, atol=1e-6)
    assert torch.allclose(turned.sum(0), colours.sum(0), atol=1e-6)  # a rotation about grey keeps R+G+B


def test_random_hue_turns_stay_within_their_range_and_leave_grayscale_alone():
    from btcv_unetr.data.transforms import RandHueRotated
    transform = RandHueRotated(keys="image", max_turn=0.05).set_random_state(seed=3)
    rgb = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    turns = []
    for _ in range(50):
        out = transform({"image": rgb})["image"]
        turns.append(transform.turns)
        assert out.shape == rgb.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert max(abs(t) for t in turns) <= 0.05 and len(set(turns)) == 50
    assert not torch.equal(out, rgb)
    gray = torch.rand(1, 8, 8)
    assert torch.equal(transform({"image": gray})["image"], gray)
