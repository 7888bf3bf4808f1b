import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from btcv_unetr.data.checks import check_data

AFFINE = np.diag([-0.8, -0.8, 3.0, 1.0])


def _save(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path.name


@pytest.fixture
def good_volume():
    image = np.full((8, 8, 6), -1000, np.int16)
    image[2:6, 2:6, 1:5] = 60
    label = np.zeros((8, 8, 6), np.uint8)
    label[3:5, 3:5, 2:4] = 6
    return image, label


def _write_case(root, name, image, label, label_affine=AFFINE):
    _save(root / f"imagesTr/{name}.nii.gz", image)
    _save(root / f"labelsTr/{name}.nii.gz", label, label_affine)
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}


def test_a_clean_dataset_passes(tmp_path, good_volume):
    entry = _write_case(tmp_path, "ok", *good_volume)
    _save(tmp_path / "imagesTs/t.nii.gz", good_volume[0])
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry], "validation": [entry],
                                                 "test": ["imagesTs/t.nii.gz"]}))
    problems, counts = check_data(str(tmp_path), "d.json", num_classes=14)
    assert problems == [] and counts == {"training": 1, "validation": 1, "test": 1}


def test_every_problem_is_reported_at_once_with_its_file(tmp_path, good_volume):
    image, label = good_volume
    entries = [_write_case(tmp_path, "ok", image, label)]
    entries.append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/ok.nii.gz"})
    truncated = _write_case(tmp_path, "truncated", image, label)
    raw = (tmp_path / truncated["image"]).read_bytes()
    (tmp_path / truncated["image"]).write_bytes(raw[: len(raw) // 2])
    entries.append(truncated)
    entries.append(_write_case(tmp_path, "flat", image[:, :, 0], label[:, :, 0]))
    entries.append(_write_case(tmp_path, "four_d", np.stack([image, image], -1), label))
    entries.append(_write_case(tmp_path, "shape", image, label[:, :, :4]))
    entries.append(_write_case(tmp_path, "affine", image, label, np.diag([-0.8, -0.8, 2.0, 1.0])))
    bad_values = label.copy()
    bad_values[0, 0, 0] = 20
    entries.append(_write_case(tmp_path, "values", image, bad_values))
    nan_image = image.astype(np.float32)
    nan_image[0, 0, :2] = np.nan
    nan_image[1, 1, 1] = np.inf
    entries.append(_write_case(tmp_path, "nan", nan_image, label))
    (tmp_path / "d.json").write_text(json.dumps({"training": entries}))

    problems, _ = check_data(str(tmp_path), "d.json", num_classes=14)
    lines = sorted(str(p) for p in problems)
    root = str(tmp_path)
    expected = [
        f"{root}/imagesTr/flat.nii.gz: image is 2D with shape (8, 8), expected a 3D volume",
        f"{root}/imagesTr/four_d.nii.gz: image is 4D with shape (8, 8, 6, 2), expected a 3D volume",
        f"{root}/imagesTr/missing.nii.gz: file not found",
        f"{root}/imagesTr/nan.nii.gz: 3 NaN or infinite voxels",
        f"{root}/labelsTr/affine.nii.gz: affine differs from the image's by up to 1 mm "
        f"({root}/imagesTr/affine.nii.gz)",
        f"{root}/labelsTr/flat.nii.gz: image is 2D with shape (8, 8), expected a 3D volume",
        f"{root}/labelsTr/shape.nii.gz: label shape (8, 8, 4) differs from image shape (8, 8, 6) "
        f"({root}/imagesTr/shape.nii.gz)",
        f"{root}/labelsTr/values.nii.gz: label values 20 outside 0..13",
    ]
    assert [line for line in lines if "truncated" not in line] == expected
    truncated_lines = [line for line in lines if "truncated.nii.gz" in line]
    assert len(truncated_lines) == 1
    assert truncated_lines[0].startswith(f"{root}/imagesTr/truncated.nii.gz: unreadable or truncated file (")


@pytest.mark.parametrize("content, message", [
    ('{"training": []}', "datalist has no 'training' entries"),
    ('{"training": [{"image": 3, "label": "x"}]}', "training[0] must be an object with string"),
    ("not json", "datalist is not valid JSON"),
])
def test_empty_or_malformed_datalists(tmp_path, content, message):
    (tmp_path / "d.json").write_text(content)
    problems, _ = check_data(str(tmp_path), "d.json", num_classes=14)
    assert len(problems) == 1 and message in str(problems[0])


def test_cli_exit_codes_and_output(phantom_dir, tmp_path):
    command = [sys.executable, "-m", "btcv_unetr", "check-data", "--data_dir"]
    ok = subprocess.run(command + [str(phantom_dir), "--json_list", "dataset.json"], capture_output=True, encoding="utf-8")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "check-data: OK, 3 training, 1 validation, 1 test entries"
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    bad = subprocess.run(command + [str(tmp_path), "--json_list", "d.json"], capture_output=True, encoding="utf-8")
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [f"{tmp_path}/a.nii.gz: file not found", f"{tmp_path}/b.nii.gz: file not found",
                                       "check-data: 2 problem(s) found; fix them and run again"]
    assert "Traceback" not in bad.stderr


def test_gzip_garbage_is_unreadable_not_a_crash(tmp_path, good_volume):
    entry = _write_case(tmp_path, "c", *good_volume)
    (tmp_path / entry["label"]).write_bytes(gzip.compress(b"this is not a nifti header"))
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry]}))
    problems, _ = check_data(str(tmp_path), "d.json", num_classes=14)
    assert len(problems) == 1 and "unreadable or truncated file" in str(problems[0])
