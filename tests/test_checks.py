import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from btcv_unetr import cli
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
        (f"{root}/imagesTr/nan.nii.gz: 3 NaN or infinite voxels (2 NaN, 1 infinite): replace them, e.g. by the "
         "lowest intensity"),
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


def test_cli_exit_codes_and_output(phantom_dir, tmp_path, capsys):
    """A clean dataset passes with status 0; problems give status 1, each on its line."""
    assert cli.main(["check-data", "--data_dir", str(phantom_dir), "--json_list", "dataset.json"]) == 0
    assert capsys.readouterr().out.strip() == "check-data: OK, 3 training, 1 validation, 1 test entries"
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    assert cli.main(["check-data", "--data_dir", str(tmp_path), "--json_list", "d.json"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{tmp_path}/a.nii.gz: file not found", f"{tmp_path}/b.nii.gz: file not found",
                                "check-data: 2 problem(s) found; fix them and run again"]
    assert "Traceback" not in err


def test_gzip_garbage_is_unreadable_not_a_crash(tmp_path, good_volume):
    entry = _write_case(tmp_path, "c", *good_volume)
    (tmp_path / entry["label"]).write_bytes(gzip.compress(b"this is not a nifti header"))
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry]}))
    problems, _ = check_data(str(tmp_path), "d.json", num_classes=14)
    assert len(problems) == 1 and "unreadable or truncated file" in str(problems[0])


# ---------------------------------------------------------------- issue 22: duplicates, bit depths, non-finite, names


def test_a_file_listed_twice_in_a_split_is_a_problem_with_its_count_and_is_read_once(tmp_path, good_volume,
                                                                                     monkeypatch):
    from btcv_unetr.data import checks
    entry = _write_case(tmp_path, "ok", *good_volume)
    other = _write_case(tmp_path, "other", *good_volume)
    same = {"image": "imagesTr/../imagesTr/ok.nii.gz", "label": entry["label"]}  # the same file, spelled otherwise
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry] * 3 + [same, other], "validation": [other],
                                                 "test": ["imagesTr/other.nii.gz"] * 2}))
    reads = []
    read = checks.read_volume
    monkeypatch.setattr(checks, "read_volume", lambda path, *a: reads.append(str(path)) or read(path, *a))
    problems, counts = check_data(str(tmp_path), "d.json", num_classes=14)
    assert [str(p) for p in problems] == [
        f"{tmp_path}/imagesTr/ok.nii.gz: listed 4 times in 'training': list each case once",
        f"{tmp_path}/imagesTr/other.nii.gz: listed 2 times in 'test': list each case once"]
    assert counts == {"training": 5, "validation": 1, "test": 2}
    # The four listings of ok.nii.gz (and its label) are read once; other.nii.gz once as a labelled entry, once as
    # a test entry (another entry: no label).
    assert sorted(reads) == sorted([str(tmp_path / path) for path in (entry["image"], entry["label"], other["image"],
                                                                      other["label"], other["image"])])


def test_a_file_in_training_and_validation_is_a_note_not_a_problem(tmp_path, good_volume):
    from btcv_unetr.data.checks import SPLITS, data_notes
    from btcv_unetr.data.datalist import read_datalist, split_entries
    entry = _write_case(tmp_path, "ok", *good_volume)
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    problems, _ = check_data(str(tmp_path), "d.json", num_classes=14)
    content = read_datalist(tmp_path / "d.json")
    notes = data_notes([(split, e) for split in SPLITS for e in split_entries(content, split, tmp_path)])
    assert problems == [] and notes == [
        (f"1 image(s) are in both 'training' and 'validation' (e.g. {tmp_path}/imagesTr/ok.nii.gz): validation then "
         "scores cases the model trains on, and its Dice overstates")]


def _pictures(root, depths):
    import SimpleITK as sitk
    entries = []
    for index, bits in enumerate(depths):
        grey = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
        picture = grey.astype(np.uint16) * 257 if bits == 16 else grey
        sitk.WriteImage(sitk.GetImageFromArray(picture), str(root / f"p{index}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8), np.uint8)), str(root / f"m{index}.png"))
        entries.append({"image": f"p{index}.png", "label": f"m{index}.png"})
    (root / "d.json").write_text(json.dumps({"training": entries}))
    return ["check-data", "--data_dir", str(root), "--json_list", "d.json", "--spatial_dims", "2",
            "--in_channels", "1"]


@pytest.mark.parametrize("depths, note", [
    ((8, 8), None),
    ((16, 16), ("note: 2 training picture(s) are 16-bit (e.g. {root}/p0.png): each picture is scaled by its own "
                "bit depth")),
    ((8, 16, 16), ("note: 2 training picture(s) are 16-bit (e.g. {root}/p1.png), 1 of fewer bits: each picture is "
                   "scaled by its own bit depth")),
])
def test_check_data_notes_16_bit_training_pictures_and_passes(tmp_path, depths, note, capsys):
    status = cli.main(_pictures(tmp_path, depths))
    stdout, stderr = capsys.readouterr()
    assert status == 0, stdout + stderr
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert notes == ([] if note is None else [notes[0]]) and (note is None or notes[0].startswith(
        note.format(root=tmp_path)))
    assert stdout.splitlines()[-1] == f"check-data: OK, {len(depths)} training, 0 validation, 0 test entries"


def test_nan_and_both_infinities_are_counted_alike():
    from btcv_unetr.data.checks import non_finite_problem
    data = np.zeros((4, 4), np.float32)
    data[0, :2], data[1, 0], data[2, :3] = np.nan, np.inf, -np.inf
    assert non_finite_problem(data) == "6 NaN or infinite voxels (2 NaN, 4 infinite): replace them, e.g. by the " \
                                       "lowest intensity"
    assert non_finite_problem(np.zeros(3, np.float32)) is None and non_finite_problem(np.zeros(3, np.int16)) is None


def test_a_problem_line_shows_control_characters_escaped():
    from btcv_unetr.data.checks import Problem
    from btcv_unetr.errors import UserError, one_line
    assert str(Problem("/d/img\nerror: all fine.nii.gz", "file not found")) == \
        "/d/img\\nerror: all fine.nii.gz: file not found"
    assert one_line("a\rb\tc\x1b[2K\u2028d\u202ee ") == "a\\rb\\tc\\x1b[2K\\u2028d\\u202ee"
    assert one_line(one_line("x\ny")) == one_line("x\ny") == "x\\ny"
    assert str(UserError("scan\nerror: forged")) == "scan\\nerror: forged"


def test_a_dataset_caches_each_listed_file_once(tmp_path):
    from monai.transforms import Lambda

    from btcv_unetr.config.schema import DataConfig
    from btcv_unetr.data.datalist import make_dataset, unique_items
    seen = []

    def transform(item):
        seen.append(item["image"])
        return {**item, "loaded": True}

    items = [{"image": "/d/a.nii.gz", "label": "/d/la.nii.gz"}, {"image": "/d/b.nii.gz", "label": "/d/lb.nii.gz"},
             {"image": "/d/x/../a.nii.gz", "label": "/d/la.nii.gz"}] + [{"image": "/d/a.nii.gz",
                                                                         "label": "/d/la.nii.gz"}] * 3
    assert unique_items(items)[1] == [0, 1, 0, 0, 0, 0]
    dataset = make_dataset(items, Lambda(transform), DataConfig(workers=0))  # a Transform: MONAI caches its output
    assert sorted(seen) == ["/d/a.nii.gz", "/d/b.nii.gz"]  # each cached once
    assert len(dataset) == 6 and [dataset[i]["image"] for i in range(6)] == ["/d/a.nii.gz", "/d/b.nii.gz"] + \
        ["/d/a.nii.gz"] * 4


def test_a_sheared_scan_is_a_problem_to_segment_and_a_note_to_train_on(tmp_path, good_volume):
    """Training and validation resample a sheared scan onto perpendicular axes: a note. In 'test', test.py would
    segment it and cannot map the mask back: a problem, as test.py refuses it (its axes 11 degrees apart)."""
    from btcv_unetr.data.checks import SPLITS, data_notes
    from btcv_unetr.data.datalist import read_datalist, split_entries
    sheared = np.array([[-0.8, -0.16, 0, 0], [0, -0.8, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]])
    image, label = good_volume
    _save(tmp_path / "imagesTr/tilted.nii.gz", image, sheared)
    _save(tmp_path / "labelsTr/tilted.nii.gz", label, sheared)
    entry = {"image": "imagesTr/tilted.nii.gz", "label": "labelsTr/tilted.nii.gz"}
    why = "its affine is sheared (voxel axes 11 degrees from perpendicular, a tilted acquisition exported as is)"
    (tmp_path / "train.json").write_text(json.dumps({"training": [entry]}))
    assert check_data(str(tmp_path), "train.json", num_classes=14)[0] == []
    content = read_datalist(tmp_path / "train.json")
    notes = data_notes([(split, e) for split in SPLITS for e in split_entries(content, split, tmp_path)])
    assert len(notes) == 1 and notes[0].startswith(f"{tmp_path}/imagesTr/tilted.nii.gz: test.py refuses this scan, "
                                                   f"training and validation resample it: {why}"), notes
    (tmp_path / "test.json").write_text(json.dumps({"training": [entry], "test": [{"image": entry["image"]}]}))
    problems = [str(p) for p in check_data(str(tmp_path), "test.json", num_classes=14)[0]]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path}/imagesTr/tilted.nii.gz: {why}"), problems


@pytest.mark.parametrize("shape, three_d", [((8, 8, 6), True), ((8, 8, 6, 1), True), ((8, 8, 6, 1, 1), False),
                                           ((8, 8, 6, 2), False), ((8, 8), False)])
def test_a_volume_is_3d_with_at_most_one_singleton_axis_after_its_three(shape, three_d):
    """MONAI reads (X, Y, Z, 1) as a channel; a 5th axis, even of 1, fails its Orientation."""
    from btcv_unetr.data.checks import is_3d
    assert is_3d(shape) == three_d
