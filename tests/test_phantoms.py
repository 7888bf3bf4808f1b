import json

import nibabel as nib
import numpy as np
import pytest

from btcv_unetr import cli
from btcv_unetr.labels import BTCV_LABELS
from btcv_unetr.synthetic.phantoms import generate_case, write_dataset


def _canonical(image):
    return np.asarray(nib.as_closest_canonical(image).dataobj)


def test_every_organ_is_present_with_plausible_intensity():
    case = generate_case(seed=0, index=1, size=128)
    image, label = _canonical(case.image), _canonical(case.label)
    assert set(np.unique(label)) == set(range(len(BTCV_LABELS)))
    liver, aorta, background = image[label == 6].mean(), image[label == 8].mean(), image[label == 0]
    assert 60 < liver < 160 and 130 < aorta < 250
    assert background.min() <= -1000  # air outside the body
    assert -150 < np.median(background[background > -500]) < 100  # fat and muscle inside it


def test_organs_sit_at_anatomical_positions():
    case = generate_case(seed=1, index=2, size=128)
    label = _canonical(case.label)  # RAS voxel order: +x right, +y anterior, +z superior
    centre = {k: np.argwhere(label == k).mean(0) for k in range(1, 14)}
    assert centre[6][0] > centre[1][0]             # liver to the right of the spleen
    assert centre[2][0] > centre[3][0]             # right kidney right of the left one
    assert centre[2][1] < centre[6][1]             # kidneys posterior to the liver
    assert centre[8][1] < centre[11][1]            # aorta posterior to the pancreas
    assert centre[12][2] > centre[2][2] and centre[13][2] > centre[3][2]  # adrenals above kidneys
    volume_ml = {k: (label == k).sum() * np.prod(case.label.header.get_zooms()) / 1000 for k in (6, 12)}
    assert 800 < volume_ml[6] < 3000 and volume_ml[12] < 20


def test_geometry_is_scanner_like_and_image_label_agree():
    cases = [generate_case(seed=3, index=i, size=512) for i in (1, 2, 3)]
    for case in cases:
        image, label = case.image, case.label
        assert image.shape[:2] == (512, 512) and 40 <= image.shape[2] <= 200
        sx, sy, sz = image.header.get_zooms()
        assert 0.6 <= sx == sy <= 0.95 and 2.5 <= sz <= 5.0
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert np.array_equal(image.affine, label.affine) and image.shape == label.shape
        assert not np.allclose(image.affine[:3, :3], np.eye(3))
    assert ("L", "P", "S") in {nib.aff2axcodes(generate_case(seed=0, index=i, size=32).image.affine)
                               for i in range(1, 9)}


def test_same_seed_same_case_and_cases_do_not_depend_on_count(tmp_path):
    first, second = generate_case(5, 2, 64), generate_case(5, 2, 64)
    assert np.array_equal(np.asarray(first.image.dataobj), np.asarray(second.image.dataobj))
    assert np.array_equal(first.image.affine, second.image.affine)
    assert not np.array_equal(np.asarray(generate_case(6, 2, 64).label.dataobj), np.asarray(first.label.dataobj))


def test_dataset_layout_and_datalist(tmp_path):
    path = write_dataset(tmp_path, cases=5, seed=0, size=48, test_cases=2, progress=False)
    datalist = json.loads(path.read_text())
    assert [e["image"] for e in datalist["training"]] == [f"imagesTr/img000{i}.nii.gz" for i in range(1, 5)]
    assert datalist["validation"] == [{"image": "imagesTr/img0005.nii.gz", "label": "labelsTr/label0005.nii.gz"}]
    assert datalist["test"] == ["imagesTs/img0006.nii.gz", "imagesTs/img0007.nii.gz"]
    assert datalist["labels"]["11"] == "pancreas" and len(datalist["labels"]) == 14
    for entry in datalist["training"] + datalist["validation"]:
        assert (tmp_path / entry["image"]).is_file() and (tmp_path / entry["label"]).is_file()
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind
    written = nib.load(tmp_path / "imagesTr/img0002.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(generate_case(0, 2, 48).image.dataobj))


def test_the_command_writes_a_dataset_and_a_bad_count_is_one_line(tmp_path, capsys):
    """``btcv-unetr phantoms`` writes a dataset; a bad count is one line and status 2, with no folder made. (The
    module entry point ``python -m btcv_unetr`` runs as a real process in the service's tests: tests/serving.py.)"""
    assert cli.main(["phantoms", "--out", str(tmp_path), "--cases", "2", "--test_cases", "0", "--size", "32"]) == 0
    assert json.loads((tmp_path / "dataset.json").read_text())["training"]
    capsys.readouterr()
    assert cli.main(["phantoms", "--out", str(tmp_path / "x"), "--cases", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: phantoms: --cases must be >= 2 and --test_cases >= 0"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", [32, 64])
def test_small_sizes_keep_the_anatomy(size):
    case = generate_case(seed=0, index=1, size=size)
    assert case.image.shape[:2] == (size, size)
    extent = np.array(case.image.shape) * np.array(case.image.header.get_zooms())
    assert 300 < extent[0] < 500  # same field of view in mm as the full-size case
