"""btcv_unetr.inference.evaluate: metrics on hand-made masks with answers worked out by hand, NaN for absent
classes, reports that JSON and CSV readers take, and files paired by case name across formats."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from btcv_unetr.data.images import write_mask
from btcv_unetr.errors import UserError
from btcv_unetr.inference.evaluate import (
    CaseMetrics,
    case_metrics,
    evaluate_folders,
    format_summary,
    match_key,
    summarise,
    write_reports,
)
from btcv_unetr.labels import BTCV_LABELS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecations inside its metrics


def _cubes(shift: int, shape=(12, 10, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A 4 x 4 x 4 cube of class 1 (label) and the same cube moved ``shift`` voxels along the first axis."""
    label, prediction = np.zeros(shape, np.int16), np.zeros(shape, np.int16)
    label[2:6, 3:7, 3:7] = 1
    prediction[2 + shift:6 + shift, 3:7, 3:7] = 1
    return prediction, label


def test_a_one_voxel_shift_scores_as_worked_out_by_hand_in_the_labels_spacing():
    """Overlap 48 of 64 voxels each: Dice 2*48/128 = 0.75, IoU 48/80 = 0.6; the surfaces are at most one voxel
    apart, 2 mm along the first axis, so HD95 is 2 mm (not 1: the spacing counts) and every surface point lies
    within the 2 mm NSD tolerance; 32 of 1200 voxels differ."""
    prediction, label = _cubes(1)
    result = case_metrics("c", prediction, label, (2.0, 1.0, 1.0), num_classes=3)
    assert result.dice[0] == pytest.approx(0.75) and result.iou[0] == pytest.approx(0.6)
    assert result.hd95[0] == pytest.approx(2.0) and result.nsd[0] == pytest.approx(1.0)
    assert result.accuracy == pytest.approx(1 - 32 / 1200)


def test_a_three_voxel_shift_leaves_the_far_faces_outside_the_nsd_tolerance():
    """Overlap 16: Dice 32/128 = 0.25, IoU 16/112. Each cube has 56 surface voxels; its far face (16) is 3 mm
    from the other's surface, the rest within 2 mm: NSD (40 + 40) / 112 = 5/7 and HD95 3 mm."""
    prediction, label = _cubes(3)
    result = case_metrics("c", prediction, label, (1.0, 1.0, 1.0), num_classes=2)
    assert result.dice == [pytest.approx(0.25)] and result.iou == [pytest.approx(1 / 7)]
    assert result.hd95 == [pytest.approx(3.0)] and result.nsd == [pytest.approx(5 / 7)]


def test_a_class_absent_from_the_label_is_nan_even_when_predicted_and_distances_can_be_skipped():
    prediction, label = _cubes(0)
    prediction[8:10, :2, :2] = 2  # a false positive of a class the label does not have
    result = case_metrics("c", prediction, label, (1.0, 1.0, 1.0), num_classes=3)
    assert result.dice[0] == 1.0 and result.hd95[0] == 0.0
    assert all(math.isnan(values[1]) for values in (result.dice, result.iou, result.hd95, result.nsd))
    assert result.accuracy == pytest.approx(1 - 8 / 1200)  # the false positive's voxels still count as wrong
    quick = case_metrics("c", prediction, label, (1.0, 1.0, 1.0), num_classes=3, distances=False)
    assert quick.dice[0] == 1.0 and math.isnan(quick.dice[1])
    assert quick.hd95 == [] and quick.nsd == []  # no distances at all, not a NaN for the absent class alone
    summary = summarise([quick], 3)  # --no_hd95 with an absent class: a table without distance columns
    assert summary["organs"]["class 1"] == {"dice": 1.0, "iou": 1.0}
    assert math.isnan(summary["organs"]["class 2"]["dice"])


def test_training_validation_and_evaluate_score_alike():
    """Both score with btcv_unetr.metrics: the same masks give the same Dice, IoU and accuracy, to the bit."""
    import torch

    from btcv_unetr.train.loop import case_scores
    rng = np.random.default_rng(0)
    predicted, label = rng.integers(0, 5, (12, 10, 8)), rng.integers(0, 4, (12, 10, 8))  # class 4 absent from label
    dice, iou, accuracy = case_scores(torch.from_numpy(predicted)[None, None], torch.from_numpy(label)[None, None], 5)
    scored = case_metrics("case", predicted.astype(np.uint8), label.astype(np.int16), (1, 1, 1), 5, distances=False)
    np.testing.assert_array_equal(dice[0].numpy(), np.float32(scored.dice))  # NaN for class 4 in both
    np.testing.assert_array_equal(iou[0].numpy(), np.float32(scored.iou))
    assert math.isnan(scored.dice[3]) and float(accuracy[0]) == scored.accuracy == float(np.mean(predicted == label))


def test_masks_of_different_shapes_are_refused_naming_the_case():
    with pytest.raises(UserError) as refused:
        case_metrics("img0035", np.zeros((4, 4, 2), np.int16), np.zeros((4, 4, 3), np.int16), (1, 1, 1), 3)
    assert str(refused.value) == "img0035: prediction shape (4, 4, 2) differs from label shape (4, 4, 3)"


def _two_cases() -> list[CaseMetrics]:
    """Class 1 found in both cases, class 2 missed in the second and absent from the first, class 3 absent."""
    nan = math.nan
    return [CaseMetrics("a", [0.8, nan, nan], [2.0, nan, nan], [0.9, nan, nan], 1.5, [0.6, nan, nan], 0.9),
            CaseMetrics("b", [0.6, 0.0, nan], [4.0, math.inf, nan], [0.7, 0.0, nan], 2.5, [0.4, 0.0, nan], 0.7)]


def test_means_leave_absent_classes_out_and_a_missed_organ_in():
    summary = summarise(_two_cases(), 4, names=["liver", "spleen", "aorta"])
    assert summary["cases"] == 2 and list(summary["organs"]) == ["liver", "spleen", "aorta"]
    liver, spleen, aorta = summary["organs"].values()
    assert liver == pytest.approx({"dice": 0.7, "iou": 0.5, "hd95_mm": 3.0, "nsd": 0.8})
    assert spleen["dice"] == 0.0 and spleen["hd95_mm"] == math.inf
    assert all(math.isnan(value) for value in aorta.values())
    assert summary["mean_organ_dice"] == pytest.approx(0.35)  # (0.7 + 0.0) / 2: the aorta is left out
    assert summary["mean_case_dice"] == pytest.approx((0.8 + 0.3) / 2)
    assert summary["mean_iou"] == pytest.approx(0.25) and summary["accuracy"] == pytest.approx(0.8)


def test_without_distances_or_iou_the_summary_has_no_such_keys():
    results = [CaseMetrics("a", [1.0, 0.5])]
    summary = summarise(results, 3)
    assert summary["organs"] == {"class 1": {"dice": 1.0}, "class 2": {"dice": 0.5}}
    assert "mean_iou" not in summary and "accuracy" not in summary
    lines = format_summary(summary).splitlines()
    assert [line.split() for line in lines] == [["class", "Dice"], ["class", "1", "1.0000"], ["class", "2", "0.5000"],
                                                ["mean", "organ", "Dice", "0.7500", "(1", "cases)"]]
    ends = {line.index(value) + len(value) for line, value in zip(lines, ("Dice", "1.0000", "0.5000", "0.7500"))}
    assert len(ends) == 1  # one column


def test_reports_are_a_row_per_case_and_class_and_strict_json(tmp_path):
    summary = write_reports(tmp_path, _two_cases(), 4, names=["liver", "spleen", "aorta"])
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["case"], row["organ"]) for row in rows] == [(c, o) for c in "ab" for o in ("liver", "spleen", "aorta")]
    assert rows[0] == {"case": "a", "organ": "liver", "dice": "0.80000", "iou": "0.60000", "hd95_mm": "2.000",
                       "nsd": "0.90000", "seconds": "1.50"}
    assert rows[4]["hd95_mm"] == "inf" and rows[5]["dice"] == "nan"

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    stored = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert stored["organs"]["aorta"] == {"dice": None, "iou": None, "hd95_mm": None, "nsd": None}
    assert stored["organs"]["spleen"]["hd95_mm"] == "inf"
    assert stored["mean_organ_dice"] == pytest.approx(summary["mean_organ_dice"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "summary.json"]  # no temporaries


@pytest.mark.parametrize("prediction, label", [
    ("img0035_seg.nii.gz", "label0035.nii.gz"), ("img0035_seg.nii.gz", "img0035.nii.gz"),
    ("case_0004_seg.png", "case_0004.png"), ("scan_seg.nrrd", "scan.mha"), ("image12_seg.nii", "seg12.nii.gz"),
])
def test_predictions_pair_with_labels_by_case_name(prediction, label):
    assert match_key(Path("out") / prediction) == match_key(Path("labelsTr") / label)


def test_reports_name_the_classes_given_else_btcvs_organs_else_numbers():
    """Without names the report takes data.datalist.label_names' fallback (the one every report shares)."""
    assert list(summarise([], 3, ["animal", "boundary"])["organs"]) == ["animal", "boundary"]
    assert list(summarise([], 14)["organs"]) == list(BTCV_LABELS[1:]) and next(iter(summarise([], 14)["organs"])) \
        == "spleen"
    assert list(summarise([], 3)["organs"]) == ["class 1", "class 2"]


def _label_file(folder: Path, name: str, labels: np.ndarray, affine: np.ndarray) -> Path:
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), folder / name)
    return folder / name


def test_an_nrrd_prediction_is_scored_against_a_nifti_label_in_the_labels_spacing(tmp_path):
    prediction, label = _cubes(1)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    label_path = _label_file(tmp_path / "labels", "label0007.nii.gz", label, affine)
    (tmp_path / "pred").mkdir()
    write_mask(prediction, label_path, tmp_path / "pred" / "img0007_seg.nrrd")  # the label's geometry, as NRRD
    (results,) = evaluate_folders(tmp_path / "pred", tmp_path / "labels", num_classes=2, distances=True)
    assert results.case == "img0007"
    assert results.dice == [pytest.approx(0.75)] and results.hd95 == [pytest.approx(2.0)]


def test_folder_mistakes_are_one_line(tmp_path):
    prediction, label = _cubes(0)
    _label_file(tmp_path / "labels", "label0007.nii.gz", label, np.eye(4))
    _label_file(tmp_path / "pred", "img0007_seg.nii.gz", prediction, np.diag([1.0, 1.0, 1.5, 1.0]))
    _label_file(tmp_path / "other", "img0008_seg.nii.gz", prediction, np.eye(4))
    cases = [((tmp_path / "pred", tmp_path / "labels"), "img0007_seg.nii.gz: affine differs from its label"),
             ((tmp_path / "other", tmp_path / "labels"), "no prediction in"),
             ((tmp_path / "none", tmp_path / "labels"), f"not a folder: {tmp_path / 'none'}"),
             ((tmp_path / "pred", tmp_path / "labels.txt"), "not a folder of masks nor a datalist .json")]
    for (pred_dir, labels), expected in cases:
        with pytest.raises(UserError) as refused:
            evaluate_folders(pred_dir, labels, num_classes=2, distances=False)
        assert expected in str(refused.value) and "\n" not in str(refused.value)
