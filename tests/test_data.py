import json

import pytest
from conftest import tiny_config
from monai.data import CacheDataset, Dataset, PersistentDataset

from btcv_unetr.data.datalist import (
    BUILTIN_DATALISTS,
    base_dir_for,
    case_name,
    load_config_split,
    load_split,
    make_dataset,
    resolve_datalist,
)
from btcv_unetr.errors import UserError
from btcv_unetr.labels import BTCV_LABELS


def test_shipped_btcv_split_is_the_reference_one():
    datalist = json.loads((BUILTIN_DATALISTS / "dataset_0.json").read_text())
    numbers = lambda entries: [int(e["image"][-11:-7]) for e in entries]  # noqa: E731
    assert numbers(datalist["training"]) == [*range(1, 11), *range(21, 35)]
    assert numbers(datalist["validation"]) == list(range(35, 41))
    assert [int(p[-11:-7]) for p in datalist["test"]] == list(range(61, 81))
    assert datalist["training"][0] == {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    assert [datalist["labels"][str(i)] for i in range(14)] == list(BTCV_LABELS)


def test_datalist_found_as_reference_does(tmp_path, monkeypatch):
    (tmp_path / "dataset_0.json").write_text("{}")
    assert resolve_datalist(str(tmp_path), "dataset_0.json") == tmp_path / "dataset_0.json"
    monkeypatch.chdir(tmp_path)
    assert resolve_datalist("/nonexistent", "dataset_0.json") == tmp_path / "dataset_0.json"  # a path
    assert resolve_datalist("/nonexistent", "btcv_folds_5fold.json") == BUILTIN_DATALISTS / "btcv_folds_5fold.json"
    with pytest.raises(UserError, match="datalist 'other.json' not found in /nonexistent"):
        resolve_datalist("/nonexistent", "other.json")


def test_paths_resolve_against_data_dir_else_json_folder(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    path = sub / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a/img.nii.gz", "label": "a/lab.nii.gz"}],
                                "test": ["t/img9.nii.gz", {"image": "t/img10.nii.gz"}]}))
    assert base_dir_for(str(tmp_path), path) == tmp_path
    assert base_dir_for("/nonexistent", path) == sub
    training = load_split(path, "training", tmp_path)
    assert training == [{"image": str(tmp_path / "a/img.nii.gz"), "label": str(tmp_path / "a/lab.nii.gz")}]
    test = load_split(path, "test", sub)
    assert test == [{"image": str(sub / "t/img9.nii.gz")}, {"image": str(sub / "t/img10.nii.gz")}]
    with pytest.raises(UserError, match=r"no 'validation' entries \(it has: training, test\)"):
        load_split(path, "validation", tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "datalist is not valid JSON (line 1"),
    ("[]", "datalist must be a JSON object"),
    ('{"training": {"image": "x"}}', "'training' must be a list"),
    ('{"training": [{"image": "x.nii.gz"}]}', "training[0] must be an object with string 'image' and 'label'"),
    ('{"training": ["x.nii.gz"]}', "training[0] must be an object"),
])
def test_malformed_datalists_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        load_split(path, "training", tmp_path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_dataset_type_follows_the_config(phantom_dir, tmp_path):
    items = load_config_split(tiny_config(phantom_dir).data, "validation")
    identity = lambda x: x  # noqa: E731
    assert type(make_dataset(items, identity, tiny_config(phantom_dir).data)) is CacheDataset
    normal = tiny_config(phantom_dir, data={"use_normal_dataset": True}).data
    assert type(make_dataset(items, identity, normal)) is Dataset
    persistent = tiny_config(phantom_dir, data={"cache_dir": str(tmp_path / "cache")}).data
    assert type(make_dataset(items, identity, persistent)) is PersistentDataset


@pytest.mark.parametrize("path, name", [("/d/imagesTr/img0035.nii.gz", "img0035"), ("x/case.nii", "case"),
                                        ("scan.mha", "scan"), ("a.b.nrrd", "a.b")])
def test_case_name(path, name):
    assert case_name(path) == name


def test_label_names_take_the_datalists_then_btcvs_organs_then_numbers():
    """The one class-name fallback of reports, legends, SEGs and bundles (data.datalist.label_names)."""
    from btcv_unetr.data.datalist import label_names
    assert label_names({"1": "animal", "2": "boundary"}, 3) == ["animal", "boundary"]
    assert label_names({"1": "animal"}, 3) == ["animal", "class 2"]  # a class the datalist leaves unnamed
    assert label_names(None, 14) == list(BTCV_LABELS[1:]) and label_names({"2": "kidney"}, 14)[1] == "kidney"
    assert label_names(["not", "a", "map"], 3) == ["class 1", "class 2"]


def test_voxel_spacing_is_the_column_lengths_of_any_oriented_affine():
    """data.images.voxel_spacing: mm per voxel axis, the same for a turned or mirrored grid; plain floats."""
    import numpy as np

    from btcv_unetr.data.images import voxel_spacing
    assert voxel_spacing(np.diag([-0.7, -0.8, 3.0, 1.0])) == pytest.approx((0.7, 0.8, 3.0))
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 degrees about z
    affine = np.eye(4)
    affine[:3, :3] = turn @ np.diag([0.5, 1.25, 2.0])
    spacing = voxel_spacing(affine)
    assert spacing == pytest.approx((0.5, 1.25, 2.0)) and all(type(s) is float for s in spacing)
