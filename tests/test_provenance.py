"""Model cards in training checkpoints, shown before the masks; provenance in mask headers; plausible volumes."""

from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import __version__, cli
from btcv_unetr.data.images import descrip, mask_provenance, write_mask
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.inference.provenance import provenance
from btcv_unetr.io.card import NO_CARD, card_warning, model_card_lines
from btcv_unetr.io.checkpoint import load_checkpoint, write_checkpoint
from btcv_unetr.labels import BTCV_LABELS, ORGANS, PLAUSIBLE_VOLUMES_ML, volume_flag
from btcv_unetr.model.build import build_model
from btcv_unetr.synthetic.shapes2d import write_dataset as write_pictures
from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.train.card import data_facts

PHANTOM_WARNING = ("WARNING: this model was trained on synthetic phantoms (btcv-unetr phantoms): it is not for real "
                   "scans; its masks of real CT are mostly wrong")


@pytest.fixture
def run(trained_run) -> Path:
    """The session's 2-epoch tiny run on the phantoms (validated after each epoch), in float32; read only."""
    return trained_run


def _infer_config(weights: Path, **infer):
    return tiny_config(train={"pretrained_dir": str(weights.parent), "pretrained_model_name": weights.name},
                       infer={"device": "cpu", "overlay": False, "hd95": False, **infer})


def test_every_training_checkpoint_carries_a_model_card(run):
    best = torch.load(run / "model.pt", weights_only=True)["model_card"]
    final = torch.load(run / "model_final.pt", weights_only=True)["model_card"]
    assert {key: best[key] for key in ("datalist", "data_name", "cases", "synthetic", "generator", "spacing",
                                       "precision", "package_version", "spatial_dims")} == {
        "datalist": "dataset.json", "data_name": "btcv-phantom", "cases": {"training": 3, "validation": 1},
        "synthetic": True, "generator": "btcv-unetr phantoms", "spacing": [6.0, 6.0, 6.0], "precision": "fp32",
        "package_version": __version__, "spatial_dims": 3}
    assert best["classes"] == list(BTCV_LABELS)
    # The net trained (issue 28): its name, its own settings only (tiny.yaml's UNETR), its window.
    assert (best["model_name"], best["network"], best["roi_size"]) == ("unetr", "UNETR", [32, 32, 32])
    assert best["network_settings"] == {"hidden_size": 96, "mlp_dim": 192, "num_heads": 4, "num_layers": 12,
                                        "pos_embed": "perceptron", "norm_name": "instance", "conv_block": True,
                                        "res_block": True, "dropout_rate": 0.0, "feature_size": 8}
    assert best["validation"] == "best" and list(best["validation_dice"]) == list(ORGANS)
    assert (final["validation"], final["validation_epoch"], final["epochs"], final["steps"]) == ("last", 2, 2, 6)
    dice = [value for value in final["validation_dice"].values() if value is not None]
    assert dice and all(0.0 <= value <= 1.0 for value in dice)
    assert final["validation_mean_dice"] == pytest.approx(sum(dice) / len(dice), abs=1e-4)
    # The mean organ Dice the run logged for that validation is the card's.
    logged = {row["epoch"]: float(row["mean_dice"]) for row in csv.DictReader((run / "metrics.csv").open())}
    assert final["validation_mean_dice"] == pytest.approx(logged["2"], abs=1e-4)
    assert best["validation_mean_dice"] == pytest.approx(logged[str(best["validation_epoch"])], abs=1e-4)
    written = datetime.datetime.fromisoformat(final["date"])
    assert written.utcoffset() == datetime.timedelta(0)
    assert json.loads(json.dumps(final)) == final  # plain values only


def test_test_py_prints_the_card_and_the_warning_before_anything_else(run, phantom_dir, tmp_path, capsys):
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    argv = ["infer", "--pretrained_dir", str(run), "--pretrained_model_name", "model.pt", "--input", str(scan),
            "--output_dir", str(tmp_path / "out"), "--no-overlay", "--no_hd95", "--device", "cpu"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    card = lines.index(next(line for line in lines if line.startswith("model card: trained on dataset.json")))
    # the card (data; network; spacing and classes; validation; when written), then the warning
    assert card <= 1 and lines[card + 5] == PHANTOM_WARNING, lines[card:card + 6]
    assert lines[card + 1].startswith("  network: UNETR (feature_size 8, hidden_size 96, mlp_dim 192, num_heads 4)")
    assert '"btcv-phantom", 3 training and 1 validation cases (synthetic, made by btcv-unetr phantoms)' in lines[card]
    assert lines[card + 2].startswith("  spacing 6 x 6 x 6 mm; 14 classes: background, spleen, right kidney")
    assert lines[card + 3].startswith("  validation (best, epoch ")
    assert "precision fp32" in lines[card + 4]
    assert all(not line.endswith("_seg.nii.gz") for line in lines[:card + 5])  # the masks come after


def test_mask_headers_carry_version_checksum_precision_device_overlap_and_tta(run, phantom_dir, tmp_path):
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    predictor = Predictor(_infer_config(run / "model.pt", input=str(scan), output_dir=str(tmp_path),
                                        infer_overlap=0.25, tta=True, precision="fp32"))
    stored = load_checkpoint(run / "model.pt")
    assert predictor.model_card == stored["model_card"] and predictor.weights_checksum == stored["checksum"]
    from btcv_unetr.inference.batch import run_inference
    run_inference(predictor.config, predictor)
    mask = next(tmp_path.glob("*_seg.nii.gz"))
    found = mask_provenance(mask)
    assert {key: found[key] for key in ("package_version", "weights_sha256", "precision", "device", "overlap", "tta",
                                        "synthetic_training_data")} == {
        "package_version": __version__, "weights_sha256": stored["checksum"], "precision": "fp32", "device": "cpu",
        "overlap": 0.25, "tta": True, "synthetic_training_data": True}
    assert found["network"] == "UNETR" and found["networks"] == [{key: stored["model_card"][key] for key in (
        "model_name", "network", "network_settings", "roi_size")}]
    short = nib.load(mask).header["descrip"].tobytes().rstrip(b"\0").decode()
    assert short == (f"btcv-unetr {__version__} w:{stored['checksum'][:12]} fp32 cpu ov 0.25 tta on "
                     "SYNTHETIC-TRAINED")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_masks_carry_it_as_metadata(tmp_path, suffix):
    import SimpleITK as sitk
    scan = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(scan))
    prov = provenance("ab" * 32, "bf16", "cuda:0", 0.5, False, "gaussian", None, "a GPU")
    write_mask(np.ones((5, 4, 3), np.uint8), scan, tmp_path / f"mask{suffix}", provenance=prov)
    assert mask_provenance(tmp_path / f"mask{suffix}") == prov
    write_mask(np.ones((5, 4, 3), np.uint8), scan, tmp_path / f"plain{suffix}")
    assert mask_provenance(tmp_path / f"plain{suffix}") is None


def test_descrip_fits_the_nifti_field_whatever_the_values():
    prov = provenance("f" * 64, "bf16", "cuda:12", 0.625, True, "gaussian", {"synthetic": True, "steps": 5})
    prov["package_version"] = "10.20.30.dev4567+g0123456789abcdef"
    text = descrip(prov)
    assert len(text.encode("ascii")) <= 80
    assert text == "btcv-unetr 10.20.30.dev456~ w:ffffffffffff bf16 cuda:12 ov 0.625 tta on SYNTH"


def test_a_checkpoint_without_a_card_loads_as_before_and_says_so(tmp_path, capsys):
    config = tiny_config()
    torch.manual_seed(0)
    weights = build_model(config.model).state_dict()
    torch.save(weights, tmp_path / "bare.pth")
    torch.save({"state_dict": weights, "config": config.to_dict()}, tmp_path / "old.pt")  # a run before cards
    for name in ("bare.pth", "old.pt"):
        predictor = Predictor(_infer_config(tmp_path / name))
        assert predictor.model_card is None and len(predictor.weights_checksum) == 64
        assert predictor.provenance()["synthetic_training_data"] is None
        assert NO_CARD in capsys.readouterr().out
    assert model_card_lines(None) == [NO_CARD] and card_warning(None) is None


def test_a_card_written_before_the_net_was_a_choice_names_it_from_the_stored_config(tmp_path):
    path = seeded_checkpoint(tmp_path / "model.pt", tiny_config(model={"feature_size": 16}))
    content = torch.load(path, weights_only=True)
    for key in ("model_name", "network", "network_settings", "roi_size"):
        del content["model_card"][key]
    write_checkpoint(path, content)  # sealed again: the card as a run before issue 28 wrote it
    card = Predictor(_infer_config(path)).model_card
    assert (card["model_name"], card["network"]) == ("unetr", "UNETR")
    assert model_card_lines(card)[1] == "  network: UNETR (hidden_size 96, mlp_dim 192, num_heads 4), ROI 32x32x32"


def test_random_weights_say_so(tmp_path):
    content = load_checkpoint(seeded_checkpoint(tmp_path / "model.pt", tiny_config()))
    card = content["model_card"]
    assert card["steps"] == 0 and card["datalist"] is None and card["validation_dice"] == {}
    assert card_warning(card) == ("WARNING: this model's weights are random (it was never trained): "
                                  "its masks mean nothing")
    assert model_card_lines(card)[0] == "model card: not trained on any data (random weights)"


def test_the_card_reads_the_generators_mark_and_does_not_guess_from_names(phantom_dir, tmp_path):
    datalist = json.loads((phantom_dir / "dataset.json").read_text())
    assert (datalist["synthetic"], datalist["generator"]) == (True, "btcv-unetr phantoms")
    unmarked = {key: value for key, value in datalist.items() if key not in ("synthetic", "generator")}
    (tmp_path / "real.json").write_text(json.dumps(unmarked))  # still named "btcv-phantom"
    facts = data_facts(tiny_config(phantom_dir, data={"json_list": str(tmp_path / "real.json")}))
    assert facts["data_name"] == "btcv-phantom" and facts["synthetic"] is False and facts["generator"] is None
    card = {**facts, "steps": 10}
    assert card_warning(card) is None and "(not marked synthetic)" in model_card_lines(card)[0]

    pictures = tmp_path / "pets"
    write_pictures(pictures, cases=2, seed=0, size=32, progress=False)
    marked = json.loads((pictures / "dataset.json").read_text())
    assert (marked["synthetic"], marked["generator"]) == (True, "btcv-unetr shapes2d")
    model = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": 32, "roi_y": 32}
    facts = data_facts(tiny_config(pictures, model=model))
    assert facts["spacing"] is None and facts["classes"][0] == "background" and len(facts["classes"]) == 3
    assert card_warning({**facts, "steps": 1}) == (
        "WARNING: this model was trained on synthetic pictures (btcv-unetr shapes2d): it is not for real pictures; "
        "its masks of real pictures are mostly wrong")


def test_plausible_volume_ranges_cover_the_organs_whose_volume_the_scan_does_not_decide():
    assert set(PLAUSIBLE_VOLUMES_ML) <= set(ORGANS)
    assert set(ORGANS) - set(PLAUSIBLE_VOLUMES_ML) == {"esophagus", "aorta", "inferior vena cava",
                                                       "portal and splenic veins"}
    assert all(0.0 <= low < high for low, high in PLAUSIBLE_VOLUMES_ML.values())


@pytest.mark.parametrize("name, ml, flag", [
    ("liver", 1500.0, None), ("liver", 300.0, "low"), ("liver", 5000.0, "high"),
    ("spleen", 788.9, "high"), ("stomach", 788.9, None), ("gallbladder", 3.0, None), ("gallbladder", 400.0, "high"),
    ("left adrenal gland", 0.5, "low"), ("aorta", 5000.0, None), ("liver", 0.0, None), ("not an organ", 1.0, None),
])
def test_volume_flag(name, ml, flag):
    assert volume_flag(name, ml) == flag
