"""Ensembles at inference: several checkpoints' softmax probabilities averaged before the one argmax.

Members are tiny models with seeded random weights (different seeds: different probabilities); the
oracle of an ensemble is its members as single predictors, their probabilities averaged by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from serving import run_job

from btcv_unetr import cli
from btcv_unetr.config.schema import Config
from btcv_unetr.data.images import mask_provenance
from btcv_unetr.errors import UserError
from btcv_unetr.inference.ensemble import ensemble_card, ensemble_checksum, member_files
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.io.card import NO_CARD, model_card_lines
from btcv_unetr.io.checkpoint import load_checkpoint
from btcv_unetr.serve.command import predictor_config
from btcv_unetr.testing.app import in_process_service
from btcv_unetr.testing.checkpoints import seeded_checkpoint

# The members' preprocessing: at 10 mm a phantom is two 32^3 windows (18 at the tiny config's 6 mm), which keeps
# the many passes of these tests short; inference takes the spacing from the checkpoints.
COARSE = {"space_x": 10.0, "space_y": 10.0, "space_z": 10.0}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two checkpoints of the tiny model, seeds 1 and 2, as training writes them (config and card inside)."""
    folder = tmp_path_factory.mktemp("members")
    return [seeded_checkpoint(folder / f"seed{seed}" / "model.pt", tiny_config(data=COARSE), seed=seed)
            for seed in (1, 2)]


@pytest.fixture(scope="module")
def scan(phantom_dir) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))


def _config(weights: list[Path] | Path, **infer) -> Config:
    """CPU, float32: one file as --pretrained_dir/--pretrained_model_name, a list as --checkpoints."""
    settings = {"device": "cpu", "overlay": False, "hd95": False, **infer}
    if isinstance(weights, Path):
        return tiny_config(train={"pretrained_dir": str(weights.parent), "pretrained_model_name": weights.name,
                                  "precision": "fp32"}, infer=settings)
    return tiny_config(train={"precision": "fp32"}, infer={**settings, "checkpoints": [str(w) for w in weights]})


def _members(weights: list[Path], image: torch.Tensor, **infer) -> tuple[list[torch.Tensor], Predictor]:
    """The oracle's parts: each member's probabilities as a single predictor's, and the last such predictor."""
    singles = [Predictor(_config(path, **infer)) for path in weights]
    return [single.probabilities(image) for single in singles], singles[-1]


def test_an_ensemble_of_one_is_that_model(members, scan):
    single, ensemble = Predictor(_config(members[0])), Predictor(_config(members[:1]))
    image = single.prepare(scan)
    probabilities = ensemble.probabilities(image)
    assert torch.equal(probabilities, single.probabilities(image))
    labels, _ = ensemble.to_scan(probabilities, image, keep_probabilities=False)
    assert labels.tobytes() == single.segment(scan)[0].tobytes()
    # Nothing marks it as an ensemble: the same card and provenance, so the same mask file.
    assert ensemble.model_card == single.model_card and ensemble.provenance() == single.provenance()
    assert ensemble.window_count(image) == single.window_count(image)


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_of_two_is_the_mean_of_their_probabilities(members, scan, tta):
    """With TTA each member averages its flips first: the ensemble is then the mean of the members' TTA."""
    ensemble = Predictor(_config(members, tta=tta))
    image = ensemble.prepare(scan)
    (first, second), single = _members(members, image, tta=tta)
    expected = (first + second) / 2
    probabilities = ensemble.probabilities(image)
    assert probabilities.shape == (14, *image.shape[1:])
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    assert (probabilities - first).abs().max() > 1e-3  # the second member counts
    # The argmax once, on the scan's grid, of the mean: as the member's own inversion of the mean gives it.
    labels, stored = ensemble.to_scan(probabilities, image, keep_probabilities=True)
    oracle, _ = single.to_scan(expected, image, keep_probabilities=False)
    assert labels.shape == nib.load(scan).shape and np.array_equal(labels, oracle)
    assert np.allclose(stored.astype(np.float32).sum(0), 1.0, atol=1e-2)
    assert ensemble.window_count(image) == 2 * single.window_count(image)


def test_tta_changes_the_ensemble(members, scan):
    plain, flipped = Predictor(_config(members)), Predictor(_config(members, tta=True))
    image = plain.prepare(scan)
    assert (plain.probabilities(image) - flipped.probabilities(image)).abs().max() > 1e-4


def test_the_card_and_the_provenance_name_the_members(members):
    ensemble = Predictor(_config(members))
    checksums = [load_checkpoint(path)["checksum"] for path in members]
    assert ensemble.member_checksums == checksums and ensemble.weights_files == members
    made_with = ensemble.provenance()
    assert made_with["ensemble_weights_sha256"] == checksums
    assert made_with["weights_sha256"] == ensemble_checksum(checksums) not in checksums
    assert made_with["synthetic_training_data"] is False
    card = ensemble.model_card
    assert [(m["file"], m["weights_sha256"]) for m in card["ensemble"]] == [(str(p), c) for p, c in
                                                                           zip(members, checksums)]
    assert "validation_dice" not in card and card["classes"][1] == "spleen"  # the first member's data facts
    lines = model_card_lines(card)
    assert lines[2] == "  ensemble of 2 models, softmax probabilities averaged:"
    # Each member's net: its title, the settings it changed from the defaults (tiny.yaml's), its window.
    net = "UNETR (feature_size 8, hidden_size 96, mlp_dim 192, num_heads 4), ROI 32x32x32"
    assert lines[3] == f"    {members[0]}: {net}, weights {checksums[0][:12]}, validation: none"
    assert [(m["model_name"], m["network"], m["roi_size"]) for m in card["ensemble"]] == [("unetr", "UNETR",
                                                                                          [32, 32, 32])] * 2
    assert made_with["network"] == "ensemble of 2: UNETR x2" and "model_name" not in card
    assert lines[-1].startswith("WARNING: this model's weights are random")


def test_an_ensemble_card_gives_each_member_its_fold_and_validation():
    def card(fold: int, mean: float) -> dict:
        return {"datalist": "folds.json", "classes": ["background", "spleen"], "spacing": [6.0, 6.0, 6.0],
                "fold": fold, "validation": "best", "validation_epoch": 4 + fold, "validation_mean_dice": mean,
                "validation_dice": {"spleen": mean}, "epochs": 9, "steps": 27, "date": "2025-01-01T00:00:00+00:00",
                "precision": "fp32", "package_version": "0.1.0"}
    files = [Path("cv/fold_0/model.pt"), Path("cv/fold_1/model.pt")]
    combined = ensemble_card(files, [card(0, 0.5), card(1, 0.75)], ["a" * 64, "b" * 64])
    assert combined["ensemble"][1] == {"file": "cv/fold_1/model.pt", "weights_sha256": "b" * 64, "fold": 1,
                                       "validation": "best", "validation_epoch": 5, "validation_mean_dice": 0.75}
    assert not {"fold", "validation", "validation_dice", "validation_mean_dice"} & set(combined)
    lines = model_card_lines(combined)
    assert lines[2:5] == ["  ensemble of 2 models, softmax probabilities averaged:",
                          "    cv/fold_0/model.pt: weights aaaaaaaaaaaa, validation (best, epoch 4): mean Dice 0.5000",
                          "    cv/fold_1/model.pt: weights bbbbbbbbbbbb, validation (best, epoch 5): mean Dice 0.7500"]
    # Files without cards (bare state dicts): no card, but the members all the same.
    bare = ensemble_card(files, [None, None], ["a" * 64, "b" * 64])
    assert model_card_lines(bare)[0] == NO_CARD and len(model_card_lines(bare)) == 4
    assert ensemble_card(files[:1], [card(0, 0.5)], ["a" * 64]) == card(0, 0.5)


def test_members_of_other_classes_or_preprocessing_are_refused_in_one_line(members, tmp_path):
    """Their networks may differ (tests/test_mixed_ensemble.py); not what they read or what they output."""
    # crop_before_resampling too: it is preprocessing (config.PREPROCESSING), the voxel grid a model was trained on.
    for section, key, value in (("model", "out_channels", 3), ("data", "space_x", 5.0),
                                ("data", "crop_before_resampling", False)):
        overrides = {"data": COARSE, section: {**(COARSE if section == "data" else {}), key: value}}
        other = seeded_checkpoint(tmp_path / key / "model.pt", tiny_config(**overrides))
        with pytest.raises(UserError) as refused:
            Predictor(_config([members[0], other]))
        first = {"out_channels": 14, "space_x": 10.0, "crop_before_resampling": True}[key]
        assert str(refused.value) == (
            f"{other} cannot join an ensemble with {members[0]}: {key} is {value!r} there and {first!r} here; "
            "ensemble only models of the same preprocessing and classes (their networks may differ)")


def test_a_run_folder_gives_its_folds_models_in_fold_order(members, scan, tmp_path):
    run = tmp_path / "runs" / "cv"
    for fold, source in ((0, members[0]), (1, members[1])):
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(source, run / f"fold_{fold}" / "model.pt")
    (run / "fold_10").mkdir()
    shutil.copy(members[0], run / "fold_10" / "model.pt")
    (run / "logs").mkdir()
    assert member_files([str(run)]) == [run / f"fold_{k}" / "model.pt" for k in (0, 1, 10)]
    shutil.rmtree(run / "fold_10")
    from_folder, from_files = Predictor(_config([run])), Predictor(_config(members))
    image = from_files.prepare(scan)
    assert from_folder.weights_checksum == from_files.weights_checksum
    assert torch.equal(from_folder.probabilities(image), from_files.probabilities(image))


@pytest.mark.parametrize("layout, message", [
    ({}, "{run}: no fold_K folders in it: give a cross-validation run folder or checkpoint files to --checkpoints"),
    ({"fold_0": True, "fold_1": False}, ("{run}/fold_1: no model.pt (the fold has not finished training): finish "
                                         "it, or list the other folds' model.pt files with --checkpoints")),
])
def test_a_run_folder_without_finished_folds_is_one_line(tmp_path, members, layout, message):
    run = tmp_path / "cv"
    run.mkdir()
    for name, finished in layout.items():
        (run / name).mkdir()
        if finished:
            shutil.copy(members[0], run / name / "model.pt")
    with pytest.raises(UserError) as refused:
        member_files([str(run)])
    assert str(refused.value) == message.format(run=run)


def test_a_member_named_twice_or_missing_is_one_line(members, tmp_path):
    with pytest.raises(UserError, match=r"is in --checkpoints twice \(as .*\): name each member once$"):
        member_files([str(members[0]), str(members[1]), str(members[0])])
    with pytest.raises(UserError, match=f"^checkpoint not found: {tmp_path / 'none.pt'} "):
        member_files([str(members[0]), str(tmp_path / "none.pt")])


def test_test_py_takes_checkpoints_and_its_masks_name_the_members(members, scan, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["infer", "--checkpoints", *map(str, members), "--input", str(scan), "--output_dir", str(out),
            "--no-overlay", "--no_hd95", "--device", "cpu", "--precision", "fp32"]
    assert cli.main(argv) == 0
    assert "  ensemble of 2 models, softmax probabilities averaged:" in capsys.readouterr().out.splitlines()
    mask = next(out.glob("*_seg.nii.gz"))
    ensemble = Predictor(_config(members))
    assert np.array_equal(np.asarray(nib.load(mask).dataobj), ensemble.segment(scan)[0])
    assert mask_provenance(mask) == ensemble.provenance()


def test_serve_takes_checkpoints_or_a_run_folder(members, tmp_path):
    ensemble = tiny_config(train={"checkpoint": None}, infer={"checkpoints": [str(m) for m in members]})
    assert predictor_config(ensemble).infer.checkpoints == [str(m) for m in members]
    folder = tiny_config(train={"checkpoint": str(tmp_path)})
    assert predictor_config(folder).infer.checkpoints == [str(tmp_path)]
    both = tiny_config(train={"checkpoint": str(members[0])}, infer={"checkpoints": [str(members[1])]})
    with pytest.raises(UserError, match="^serve: give --checkpoint .* or --checkpoints .*, not both$"):
        predictor_config(both)


def test_the_service_serves_a_run_folders_ensemble(members, scan, tmp_path):
    run = tmp_path / "cv"
    for fold, source in enumerate(members):
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(source, run / f"fold_{fold}" / "model.pt")
    checksums = [load_checkpoint(path)["checksum"] for path in members]
    with in_process_service(run, tmp_path / "jobs") as client:
        info = client.get("/info").json()
        assert [m["weights_sha256"] for m in info["model_card"]["ensemble"]] == checksums
        assert info["provenance"]["ensemble_weights_sha256"] == checksums
        assert "  ensemble of 2 models, softmax probabilities averaged:" in info["model_card"]["lines"]
        job = run_job(client, scan)
        assert job["state"] == "done", job
        assert job["windows_done"] == job["windows_total"] > 0
        mask = tmp_path / "mask.nii.gz"
        mask.write_bytes(client.get(f"/jobs/{job['id']}/mask").content)
    assert mask_provenance(mask)["ensemble_weights_sha256"] == checksums
    ensemble = Predictor(_config([run]))
    assert np.array_equal(np.asarray(nib.load(mask).dataobj), ensemble.segment(scan)[0])
