"""``btcv-unetr import``: each layout built small by the test from phantoms (32^3), imported, checked with
check-data; a tiny training on a partly annotated import; partial annotation in training and validation;
``--download`` against a loopback HTTP server."""

import csv
import functools
import hashlib
import http.server
import json
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.data.checks import check_data
from btcv_unetr.labels import label_map
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.train import loop as train

# The sources' own names, spelt as they spell them (BTCV class -> name): the tables under test are not reused.
TOTALSEGMENTATOR_FILES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus",
                          6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava",
                          10: "portal_vein_and_splenic_vein", 11: "pancreas", 12: "adrenal_gland_right",
                          13: "adrenal_gland_left"}
AMOS_LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
               "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
               "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
               "15": "prostate/uterus"}
# BTCV class -> AMOS value (BTCV's portal and splenic veins: AMOS has none, they are background there)
BTCV_TO_AMOS = {**{c: c for c in range(1, 10)}, 10: 0, 11: 10, 12: 11, 13: 12}
ALL_ORGANS = list(range(1, 14))


@pytest.fixture(scope="module")
def scans():
    """Three phantom CTs with their BTCV labels, 32 x 32 x 32 (in their own storage orientations)."""
    cases = [generate_case(11, index, 32) for index in (1, 2, 3)]
    return [(case.image.slicer[:, :, :32], case.label.slicer[:, :, :32]) for case in cases]


def _labels(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj).astype(np.int64)


def _save(array: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """A uint8 label (or mask) on ``like``'s grid."""
    _save_image(nib.Nifti1Image(array.astype(np.uint8), like.affine), path)


def _save_image(image: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _remap(labels: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(labels)
    for source, target in table.items():
        out[labels == source] = target
    return out


def _import(*argv) -> int:
    return cli.main(["import", *map(str, argv)])


def _datalist(out: Path) -> dict:
    content = json.loads((out / "dataset.json").read_text())
    assert content["labels"] == label_map()
    assert check_data(str(out), "dataset.json", 14)[0] == []  # check-data passes on the import
    return content


def _imported(out: Path, entry: dict) -> nib.Nifti1Image:
    return nib.load(out / entry["label"])


def _duodenum(labels: np.ndarray) -> np.ndarray:
    """A 3^3 block of background near the first corner: a structure BTCV does not segment."""
    mask = np.zeros(labels.shape, bool)
    mask[1:4, 1:4, 1:4] = True
    assert not labels[mask].any()
    return mask


def test_totalsegmentator_masks_become_one_btcv_label_map(scans, tmp_path):
    src, out = tmp_path / "Totalsegmentator_dataset_v201", tmp_path / "out"
    for index, (ct, label) in enumerate(scans):
        subject = src / f"s{index:04d}"
        subject.mkdir(parents=True)
        nib.save(ct, subject / "ct.nii.gz")
        for klass, structure in TOTALSEGMENTATOR_FILES.items():
            if not (index == 1 and structure == "esophagus"):  # s0001 has no esophagus mask
                _save(_labels(label) == klass, label, subject / "segmentations" / f"{structure}.nii.gz")
        _save(_duodenum(_labels(label)), label, subject / "segmentations" / "duodenum.nii.gz")
    (src / "meta.csv").write_text("image_id;age;gender;institute;study_type;split\n"
                                  "s0000;60;m;A;ct abdomen;train\ns0001;55;f;B;ct thorax;train\n"
                                  "s0002;70;f;A;ct abdomen;val\n")
    assert _import("totalsegmentator", src, "--out", out) == 0
    datalist = _datalist(out)
    assert [e["label"] for e in datalist["training"]] == ["labels/s0000.nii.gz", "labels/s0001.nii.gz"]
    assert [e["label"] for e in datalist["validation"]] == ["labels/s0002.nii.gz"]
    assert datalist["training"][0]["image"] == str((src / "s0000" / "ct.nii.gz").resolve())
    assert "classes" not in datalist["training"][0]  # all 13 annotated
    assert datalist["training"][1]["classes"] == [c for c in ALL_ORGANS if c != 5]
    for index, entry in enumerate(datalist["training"] + datalist["validation"]):
        imported, (ct, label) = _imported(out, entry), scans[index]
        expected = _labels(label) if index != 1 else _remap(_labels(label), {c: c for c in ALL_ORGANS if c != 5})
        np.testing.assert_array_equal(_labels(imported), expected)
        np.testing.assert_allclose(imported.affine, ct.affine, atol=1e-4)
        assert imported.get_data_dtype() == np.uint8


def test_amos_keeps_its_names_and_splits_and_leaves_mri_out(scans, tmp_path):
    src, out = tmp_path / "amos22", tmp_path / "out"
    listing = {"training": [], "validation": [], "test": []}
    for (ct, label), name, split, folder in zip(scans + scans[:1], ("amos_0001", "amos_0002", "amos_0003",
                                                                    "amos_0540"),
                                                ("training", "training", "validation", "training"),
                                                ("Tr", "Tr", "Va", "Tr")):
        amos = _remap(_labels(label), BTCV_TO_AMOS)
        amos[_duodenum(amos)] = 13
        _save_image(ct, src / f"images{folder}" / f"{name}.nii.gz")
        _save(amos, label, src / f"labels{folder}" / f"{name}.nii.gz")
        listing[split].append({"image": f"./images{folder}/{name}.nii.gz", "label": f"./labels{folder}/{name}.nii.gz"})
    _save_image(scans[1][0], src / "imagesTs" / "amos_0004.nii.gz")
    listing["test"].append({"image": "./imagesTs/amos_0004.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"name": "AMOS", "modality": {"0": "CT"}, "labels": AMOS_LABELS,
                                                  **listing}))
    assert _import("amos", src, "--out", out) == 0
    datalist = _datalist(out)
    assert [Path(e["label"]).name for e in datalist["training"]] == ["amos_0001.nii.gz", "amos_0002.nii.gz"]
    assert [Path(e["label"]).name for e in datalist["validation"]] == ["amos_0003.nii.gz"]
    assert datalist["test"] == [{"image": str((src / "imagesTs" / "amos_0004.nii.gz").resolve())}]
    without_veins = [c for c in ALL_ORGANS if c != 10]
    for index, entry in enumerate(datalist["training"] + datalist["validation"]):
        assert entry["classes"] == without_veins
        expected = _remap(_labels(scans[index][1]), {c: c for c in without_veins})  # veins and duodenum: 0
        np.testing.assert_array_equal(_labels(_imported(out, entry)), expected)


def _msd_task(root: Path, scans, cases: int = 3) -> Path:
    """A Task07_Pancreas folder: pancreas 1, a cancer (2) inside it."""
    task = root / "Task07_Pancreas"
    training = []
    for index, (ct, label) in enumerate(scans[:cases]):
        pancreas = (_labels(label) == 11).astype(np.uint8)
        inside = np.argwhere(pancreas)[:3]
        pancreas[tuple(inside.T)] = 2
        _save_image(ct, task / "imagesTr" / f"pancreas_{index}.nii.gz")
        _save(pancreas, label, task / "labelsTr" / f"pancreas_{index}.nii.gz")
        training.append({"image": f"./imagesTr/pancreas_{index}.nii.gz",
                         "label": f"./labelsTr/pancreas_{index}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({
        "name": "Pancreas", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": cases, "training": training, "test": []}))
    return task


def test_decathlon_pancreas_folds_its_cancer_into_the_organ(scans, tmp_path):
    out = tmp_path / "out"
    assert _import("msd", _msd_task(tmp_path, scans), "--out", out) == 0
    datalist = _datalist(out)
    assert [Path(e["label"]).name for e in datalist["training"]] == ["pancreas_0.nii.gz", "pancreas_2.nii.gz"]
    assert [Path(e["label"]).name for e in datalist["validation"]] == ["pancreas_1.nii.gz"]  # held out: the middle
    for entry in datalist["training"] + datalist["validation"]:
        assert entry["classes"] == [11]
        index = int(Path(entry["label"]).name[len("pancreas_")])
        np.testing.assert_array_equal(_labels(_imported(out, entry)), (_labels(scans[index][1]) == 11) * 11)


def test_nnunet_v2_labels_are_mapped_by_name(scans, tmp_path):
    src, out = tmp_path / "Dataset042_Abdomen", tmp_path / "out"
    labels = {"background": 0, "Liver": 1, "kidney_left": 2, "Right Kidney": 3, "duodenum": 4}
    for index, (ct, label) in enumerate(scans):
        source = _remap(_labels(label), {6: 1, 3: 2, 2: 3})
        source[_duodenum(source)] = 4
        _save_image(ct, src / "imagesTr" / f"abd_{index:03d}_0000.nii.gz")
        _save(source, label, src / "labelsTr" / f"abd_{index:03d}.nii.gz")
    _save_image(scans[0][0], src / "imagesTs" / "abd_009_0000.nii.gz")
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    assert _import("nnunet", src, "--out", out) == 0
    datalist = _datalist(out)
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    assert datalist["test"] == [{"image": str((src / "imagesTs" / "abd_009_0000.nii.gz").resolve())}]
    for entry in datalist["training"] + datalist["validation"]:
        assert entry["classes"] == [2, 3, 6]
        index = int(Path(entry["label"]).name[len("abd_"):len("abd_000")])
        expected = _remap(_labels(scans[index][1]), {2: 2, 3: 3, 6: 6})
        np.testing.assert_array_equal(_labels(_imported(out, entry)), expected)


def test_a_tiny_training_runs_on_a_partly_annotated_import(scans, tmp_path):
    """Decathlon pancreas only: the loss is the marginal one, validation scores the pancreas alone."""
    out = tmp_path / "out"
    assert _import("msd", _msd_task(tmp_path, scans), "--out", out) == 0
    argv = ["train", "--config", "tiny.yaml", "--data_dir", str(out), "--json_list", "dataset.json",
            "--logdir", str(tmp_path / "run"), "--max_epochs", "1"]
    assert cli.main(argv) == 0
    row = next(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert row["pancreas"] != "nan" and row["liver"] == "nan" and row["spleen"] == "nan"
    assert float(row["mean_dice"]) == pytest.approx(float(row["pancreas"]), abs=1e-5)


def test_validation_scores_only_the_organs_a_case_annotates():
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1          # an annotated organ, half found
    label[0, 0, 3, :2] = 2       # voxels of an organ the case does not annotate
    predicted = torch.zeros_like(label)
    predicted[0, 0, :1] = 1
    predicted[0, 0, 2] = 2       # that organ predicted where the label says background
    annotated = torch.tensor([[True, True, False]])
    dice, iou, accuracy = train.case_scores(predicted, label, 3, annotated)
    assert dice[0, 0] == pytest.approx(2 * 16 / (16 + 32)) and torch.isnan(dice[0, 1]) and torch.isnan(iou[0, 1])
    assert accuracy[0] == pytest.approx(1 - 16 / 64)  # only the missed half of organ 1 is wrong
    dice, _, accuracy = train.case_scores(predicted, label, 3)
    assert dice[0, 1] == 0.0 and accuracy[0] < 1 - 16 / 64


def test_training_gives_each_crop_its_annotated_classes_to_the_loss():
    from btcv_unetr.distributed import Context
    from btcv_unetr.model.build import build_model
    from btcv_unetr.runtime.precision import Precision
    from btcv_unetr.train.optim import build_optimizer
    seen = []

    def loss_fn(logits, target, annotated=None):
        seen.append(annotated)
        return logits.mean() * 0.0

    tiny = tiny_config(fast={"micro_batch": 1})  # one crop per pass: each pass gets its own row
    model = build_model(tiny.model)
    annotated = torch.tensor([[True] * 14, [True, False] * 7])
    batch = {"image": torch.zeros(2, 1, 32, 32, 32), "label": torch.zeros(2, 1, 32, 32, 32), "annotated": annotated}
    train.train_one_epoch(model, [batch], loss_fn, build_optimizer(model, tiny.train), Precision("fp32", "test"),
                          Context(0, 1, 0, torch.device("cpu")), 0, None, 0, tiny.fast)
    assert torch.equal(torch.cat(seen), annotated)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 (no proxy): yields (folder, base URL)."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _served_task(scans, tmp_path, served: Path, base: str, monkeypatch, md5: str | None = None) -> None:
    """Task09_Spleen.tar (two spleen cases) served at ``base``, MONAI's table pointing at it."""
    from monai.apps.datasets import DecathlonDataset
    task = tmp_path / "build" / "Task09_Spleen"
    training = []
    for index, (ct, label) in enumerate(scans[:2]):
        _save_image(ct, task / "imagesTr" / f"spleen_{index}.nii.gz")
        _save(_labels(label) == 1, label, task / "labelsTr" / f"spleen_{index}.nii.gz")
        training.append({"image": f"./imagesTr/spleen_{index}.nii.gz", "label": f"./labelsTr/spleen_{index}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": "Spleen", "labels": {"0": "background", "1": "spleen"},
                                                   "training": training, "test": []}))
    with tarfile.open(served / "Task09_Spleen.tar", "w") as tar:
        tar.add(task, arcname="Task09_Spleen")
    monkeypatch.setitem(DecathlonDataset.resource, "Task09_Spleen", f"{base}/Task09_Spleen.tar")
    monkeypatch.setitem(DecathlonDataset.md5, "Task09_Spleen",
                        md5 or hashlib.md5((served / "Task09_Spleen.tar").read_bytes()).hexdigest())


def test_download_fetches_a_decathlon_task_checked_against_its_md5(scans, tmp_path, loopback, monkeypatch):
    served, base = loopback
    _served_task(scans, tmp_path, served, base, monkeypatch)
    data, out = tmp_path / "data", tmp_path / "out"
    assert _import("msd", data / "Task09_Spleen", "--download", "--out", out) == 0
    assert [p.name for p in data.iterdir()] == ["Task09_Spleen"]  # no archive or temporary folder left
    datalist = _datalist(out)
    assert len(datalist["training"]) == 1 and len(datalist["validation"]) == 1
    assert all(entry["classes"] == [1] for entry in datalist["training"] + datalist["validation"])
    assert datalist["training"][0]["image"].startswith(str((data / "Task09_Spleen").resolve()))


def test_download_with_a_wrong_checksum_is_refused_and_keeps_nothing(scans, tmp_path, loopback, monkeypatch, capsys):
    served, base = loopback
    _served_task(scans, tmp_path, served, base, monkeypatch, md5="0" * 32)
    data = tmp_path / "data"
    assert _import("msd", data / "Task09_Spleen", "--download", "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "does not match its MD5 " + "0" * 32 in error and "nothing was kept" in error
    assert list(data.iterdir()) == [] and not (tmp_path / "out").exists()


def _one_line_error(capsys, *argv) -> str:
    """The one error line (after the progress bar, if the cases had started)."""
    assert _import(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(line.startswith("cases: ") for line in lines[:-1]), lines
    return lines[-1]


def test_an_unknown_layout_is_one_line(scans, tmp_path, capsys):
    task = _msd_task(tmp_path, scans, cases=2)
    assert "not a TotalSegmentator dataset folder" in _one_line_error(capsys, "totalsegmentator", task, "--out",
                                                                      tmp_path / "o1")
    assert "pancreas_0_0000.nii.gz: not an nnU-Net raw dataset" in _one_line_error(capsys, "nnunet", task, "--out",
                                                                                   tmp_path / "o2")
    assert "label 2 'cancer' is not one of AMOS's structures" in _one_line_error(capsys, "amos", task, "--out",
                                                                                  tmp_path / "o3")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: not a Decathlon task folder (no dataset.json)" in _one_line_error(capsys, "msd", empty, "--out",
                                                                                       tmp_path / "o4")
    (empty / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    assert "no labelsTr/*.nii.gz files: not an nnU-Net raw dataset" in _one_line_error(capsys, "nnunet", empty,
                                                                                       "--out", tmp_path / "o6")
    assert "--download fetches only the Decathlon tasks" in _one_line_error(capsys, "amos", empty, "--download",
                                                                            "--out", tmp_path / "o5")


def test_sources_that_cannot_map_by_name_are_one_line(scans, tmp_path, capsys):
    task = _msd_task(tmp_path, scans, cases=2)
    content = json.loads((task / "dataset.json").read_text())
    (task / "dataset.json").write_text(json.dumps({**content, "labels": {"0": "background", "1": "Vessel",
                                                                         "2": "Tumour"}}))
    assert "are not those of a Decathlon task with BTCV organs" in _one_line_error(capsys, "msd", task, "--out",
                                                                                   tmp_path / "o1")
    nnunet = tmp_path / "Dataset001_Pancreas"
    _save_image(scans[0][0], nnunet / "imagesTr" / "p_000_0000.nii.gz")
    _save(np.full((32, 32, 32), 2), scans[0][1], nnunet / "labelsTr" / "p_000.nii.gz")
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "pancreas": 1}}))
    message = _one_line_error(capsys, "nnunet", nnunet, "--out", tmp_path / "o2")
    assert "p_000.nii.gz: label values 2 are not named in the dataset's dataset.json labels" in message
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                     "labels": {"background": 0, "liver": 1}}))
    assert "2 input channels (CT, PET); the model takes one CT channel" in _one_line_error(capsys, "nnunet", nnunet,
                                                                                          "--out", tmp_path / "o3")


def test_a_mask_on_another_grid_is_one_line(scans, tmp_path, capsys):
    ct, label = scans[0]
    subject = tmp_path / "ts" / "s0000"
    subject.mkdir(parents=True)
    nib.save(ct, subject / "ct.nii.gz")
    _save(np.zeros((16, 16, 16)), label, subject / "segmentations" / "liver.nii.gz")
    assert "liver.nii.gz: mask grid (16, 16, 16) differs from its CT's (32, 32, 32)" in _one_line_error(
        capsys, "totalsegmentator", tmp_path / "ts", "--out", tmp_path / "out")


def test_nnunet_names_match_whatever_their_word_order_case_and_punctuation(tmp_path):
    from btcv_unetr.data.importers import label_names, nnunet_mapping
    from btcv_unetr.errors import UserError
    names = {0: "background", 1: "Kidney (R)", 2: "Adrenal_Gland_Left", 3: "IVC", 4: "portal_vein_and_splenic_vein",
             5: "Gall Bladder", 6: "colon"}
    values, mapping, _ = nnunet_mapping(names, tmp_path / "dataset.json")
    assert values == {0: 0, 1: 2, 2: 13, 3: 9, 4: 10, 5: 4, 6: 0} and mapping["colon"] == "background"
    # a tumour lies in the set's only organ; with several organs it could be in any: background
    values, _, notes = nnunet_mapping({0: "background", 1: "liver", 2: "Tumor"}, tmp_path / "dataset.json")
    assert values == {0: 0, 1: 6, 2: 6} and "folded into liver" in notes[0]
    values, _, _ = nnunet_mapping({0: "background", 1: "liver", 2: "spleen", 3: "tumour"}, tmp_path / "dataset.json")
    assert values == {0: 0, 1: 6, 2: 1, 3: 0}
    assert label_names({"labels": {"background": 0, "liver": 1}}, tmp_path) == {0: "background", 1: "liver"}
    with pytest.raises(UserError, match="label 'whole tumour' is \\[1, 2\\], not one value"):
        label_names({"labels": {"background": 0, "whole tumour": [1, 2]}}, tmp_path)


def test_check_data_refuses_classes_that_are_not_the_models(scans, tmp_path):
    ct, label = scans[0]
    _save_image(ct, tmp_path / "ct.nii.gz")
    _save(_labels(label) == 1, label, tmp_path / "label.nii.gz")
    entry = {"image": "ct.nii.gz", "label": "label.nii.gz", "classes": [1, 14]}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    problems = [str(problem) for problem in check_data(str(tmp_path), "dataset.json", 14)[0]]
    expected = (f"{tmp_path / 'label.nii.gz'}: its datalist entry's 'classes' 14 are not classes 1..13 of this model: "
                "fix the datalist or --out_channels")
    assert problems == [expected]  # the entry in both splits is one file, checked (and reported) once
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{**entry, "classes": "spleen"}]}))
    problems = [str(problem) for problem in check_data(str(tmp_path), "dataset.json", 14)[0]]
    assert len(problems) == 1 and "training[0] 'classes' must be a list of class numbers" in problems[0]
