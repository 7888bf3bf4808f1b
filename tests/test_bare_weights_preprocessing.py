"""Weights without stored preprocessing (a bare state dict, as the released UNETR_model_best_acc.pth is) run with the
reference recipe's preprocessing and blending, said in one line, unless the user set them; our checkpoints and
TorchScript files keep what they keep."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.inferers import sliding_window_inference

from btcv_unetr import cli
from btcv_unetr.config.flags import parse_config
from btcv_unetr.config.schema import DataConfig, InferConfig
from btcv_unetr.data.transforms import infer_transforms
from btcv_unetr.inference import batch
from btcv_unetr.inference.export import export
from btcv_unetr.inference.loader import with_reference_settings
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.io.bundle import read_bundle
from btcv_unetr.model.build import build_model
from btcv_unetr.model.pretrained import REFERENCE_INFERENCE, REFERENCE_PREPROCESSING
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.testing.checkpoints import seeded_checkpoint

LINE = "stores no preprocessing (a bare state dict, as the released reference weights are): using the reference " \
       "recipe's, which such weights were trained with: "
BOTH = "crop_before_resampling False (the whole scan resampled first), mode constant (windows weighed equally); " \
       "to override, give --crop_before_resampling --mode gaussian"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A seeded bare state dict of the tiny model, our checkpoint and our TorchScript export of it, and a scan."""
    folder = tmp_path_factory.mktemp("bare_weights")
    torch.manual_seed(0)
    model = build_model(tiny_config().model).eval()
    torch.save(model.state_dict(), folder / "bare.pth")
    export(model, torch.rand(1, 1, 32, 32, 32), "torchscript", folder / "exported.pt", tiny_config().model)
    scan = folder / "scan.nii.gz"
    nib.save(generate_case(seed=11, index=1, size=48).image, scan)
    return {"bare": folder / "bare.pth", "ours": seeded_checkpoint(folder / "run" / "model.pt", tiny_config()),
            "torchscript": folder / "exported.pt", "scan": scan}


def infer(files, tmp_path, monkeypatch, capsys, weights: Path, *flags: str) -> tuple[Predictor, list[str]]:
    """``test.py`` run in this process on the scan; returns its predictor and the lines about stored preprocessing."""
    made: list[Predictor] = []

    class Recorded(Predictor):
        def __init__(self, config):
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(batch, "Predictor", Recorded)
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    weights_flags = flags if "--pretrained" in flags else ("--pretrained_dir", str(weights.parent),
                                                           "--pretrained_model_name", weights.name, *flags)
    argv = ["infer", "--config", "tiny.yaml", *weights_flags, "--input", str(files["scan"]), "--output_dir", str(out),
            "--precision", "fp32", "--no-overlay", "--no_hd95"]
    assert cli.main(argv) == 0
    assert (out / files["scan"].name.replace(".nii.gz", "_seg.nii.gz")).is_file()
    (predictor,) = made
    return predictor, [line for line in capsys.readouterr().out.splitlines() if "stores no preprocessing" in line]


def settings(predictor: Predictor) -> tuple[bool, str]:
    return predictor.config.data.crop_before_resampling, predictor.config.infer.mode


def test_a_bare_state_dict_gets_the_reference_preprocessing_in_one_line(files, tmp_path, monkeypatch, capsys):
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["bare"])
    assert settings(predictor) == (False, "constant")
    assert lines == [f"{files['bare']} {LINE}{BOTH}"]
    assert predictor.provenance()["mode"] == "constant"  # each mask's header says how it was blended


def test_released_weights_given_as_a_pretrained_file_get_it_too(files, tmp_path, monkeypatch, capsys):
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["bare"], "--pretrained", str(files["bare"]))
    assert settings(predictor) == (False, "constant") and len(lines) == 1


@pytest.mark.parametrize("flags, expected, said", [
    (("--crop_before_resampling",), (True, "constant"),
     "mode constant (windows weighed equally); to override, give --mode gaussian"),
    (("--mode", "gaussian"), (False, "gaussian"),
     "crop_before_resampling False (the whole scan resampled first); to override, give --crop_before_resampling"),
    (("--crop_before_resampling", "--mode", "gaussian"), (True, "gaussian"), None),
    (("--no-crop_before_resampling", "--mode", "constant"), (False, "constant"), None),
])
def test_flags_the_user_gives_win(files, tmp_path, monkeypatch, capsys, flags, expected, said):
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["bare"], *flags)
    assert settings(predictor) == expected
    assert lines == ([f"{files['bare']} {LINE}{said}"] if said else [])


def test_values_a_yaml_file_sets_win(files, tmp_path, monkeypatch, capsys):
    """tiny.yaml with the two settings written into its sections, as a user would."""
    text = (Path(__file__).parent.parent / "btcv_unetr" / "configs" / "tiny.yaml").read_text()
    text = text.replace("data:\n", "data:\n  crop_before_resampling: true\n", 1)
    text = text.replace("infer:\n", "infer:\n  mode: gaussian\n", 1)
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(text)
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["bare"], "--config", str(yaml_file))
    assert settings(predictor) == (True, "gaussian") and lines == []


@pytest.mark.parametrize("stored", [True, False])
def test_our_checkpoint_keeps_its_stored_preprocessing(files, tmp_path, monkeypatch, capsys, stored):
    path = files["ours"] if stored else seeded_checkpoint(tmp_path / "reference_order" / "model.pt",
                                                          tiny_config(data={"crop_before_resampling": False}))
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, path)
    assert settings(predictor) == (stored, "gaussian") and lines == []


def test_our_torchscript_export_is_unchanged(files, tmp_path, monkeypatch, capsys):
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["torchscript"],
                             "--saved_checkpoint", "torchscript")
    assert settings(predictor) == (True, "gaussian") and lines == []


def test_a_bundle_states_its_crop_order_and_blending(files, tmp_path, monkeypatch, capsys):
    """A bundle's weights are a bare state dict: its transforms' order and its inferer say what it was made with.
    Exported from our checkpoint, it keeps the checkpoint's; exported from bare weights, the reference's."""
    ours, bare = tmp_path / "ours_bundle", tmp_path / "bare_bundle"
    assert cli.main(["export", "--checkpoint", str(files["ours"]), "--bundle", str(ours)]) == 0
    assert cli.main(["export", "--config", "tiny.yaml", "--checkpoint", str(files["bare"]), "--bundle", str(bare)]) == 0
    for folder, crop_first, mode in ((ours, True, "gaussian"), (bare, False, "constant")):
        values = read_bundle(folder).values
        assert values["data"]["crop_before_resampling"] is crop_first and values["infer"] == {"mode": mode}
    capsys.readouterr()
    predictor, lines = infer(files, tmp_path, monkeypatch, capsys, files["bare"], "--pretrained", str(ours))
    assert settings(predictor) == (True, "gaussian") and lines == []
    predictor, _ = infer(files, tmp_path, monkeypatch, capsys, files["bare"], "--pretrained", str(ours), "--mode",
                         "constant")
    assert settings(predictor) == (True, "constant")  # the blending the user asks for wins over the bundle's


def test_an_all_air_scan_keeps_its_grid_in_the_reference_order(files, tmp_path, monkeypatch, capsys):
    """MONAI's default crop would cut a scan with nothing above air to an empty image: it is kept whole, and the
    bare weights segment it (the reference order is their default now)."""
    scan = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 24), -1000, np.int16), np.diag([6.0, 6.0, 6.0, 1.0])), scan)
    image = infer_transforms(tiny_config(data={"crop_before_resampling": False}))({"image": str(scan)})["image"]
    assert tuple(image.shape) == (1, 40, 40, 24)
    predictor, lines = infer({**files, "scan": scan}, tmp_path, monkeypatch, capsys, files["bare"])
    assert settings(predictor) == (False, "constant") and len(lines) == 1
    assert nib.load(next(tmp_path.glob("out*/air_seg.nii.gz"))).shape == (40, 40, 24)


def test_a_2d_model_is_left_alone():
    """The reference recipe is one for CT volumes; a picture is resized to a single window."""
    config = tiny_config(model={"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": 64, "roi_y": 64})
    assert with_reference_settings(config, Path("w.pth")) is config


def test_the_reference_differs_from_our_defaults_in_these_two_only():
    """The reference's preprocessing is this project's default but for the crop order, and its blending is MONAI's
    default mode (its test.py names none): the line names exactly what changes."""
    differing = {key for key, value in REFERENCE_PREPROCESSING.items() if getattr(DataConfig(), key) != value}
    assert differing == {"crop_before_resampling"}
    monai_default = inspect.signature(sliding_window_inference).parameters["mode"].default
    assert REFERENCE_INFERENCE == {"mode": str(monai_default)} == {"mode": "constant"}
    assert InferConfig().mode == "gaussian"


def test_explicit_keys_are_known_and_never_saved():
    config = parse_config(["--mode", "constant", "--space_x", "2"])
    assert {"mode", "space_x"} <= config.explicit and "crop_before_resampling" not in config.explicit
    assert "explicit" not in config.to_dict() and config == dataclasses.replace(config, explicit=frozenset())
    assert dataclasses.replace(config, infer=config.infer).explicit == config.explicit  # kept through replace
