"""Config keys that moved or went (issue 21): older YAML files and flags keep working, each key in its one place.

crop_before_resampling moved from the speed switches (fast) to the preprocessing (data), overwrite from infer to
general, model.model_name went (--model_name stays a reference flag); check-data and evaluate take the config's
flags like every other command.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from btcv_unetr import cli
from btcv_unetr.cli import CONFIG_FLAGS
from btcv_unetr.config.flags import parse_config
from btcv_unetr.config.load import build_config
from btcv_unetr.config.migration import migrate
from btcv_unetr.config.schema import PREPROCESSING, SECTIONS, FastConfig
from btcv_unetr.config.validation import ConfigError
from btcv_unetr.inference.command import REFERENCE_TEST_EXTRAS

OLD_KEYS = {"model": {"model_name": "unetr", "feature_size": 8},
            "fast": {"crop_before_resampling": False, "compile": False},
            "infer": {"overwrite": True, "tta": True}}


def test_an_old_yaml_file_loads_with_each_moved_key_in_its_new_section(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(OLD_KEYS))
    config = parse_config(["--config", str(old)])
    assert config.data.crop_before_resampling is False and config.general.overwrite is True
    assert (config.model.feature_size, config.infer.tta) == (8, True)  # the keys that stayed are read as before


def test_migrate_moves_keys_and_a_value_given_in_the_new_place_wins():
    # model_name, dropped while UNETR was the only network, is kept again (issue 28): an old file's "unetr" stands.
    assert migrate(OLD_KEYS) == {"model": {"model_name": "unetr", "feature_size": 8}, "fast": {"compile": False},
                                 "infer": {"tta": True},
                                 "data": {"crop_before_resampling": False}, "general": {"overwrite": True}}
    both = migrate({"fast": {"crop_before_resampling": False}, "data": {"crop_before_resampling": True}})
    assert both["data"] == {"crop_before_resampling": True}


def test_build_config_reads_old_layers_too_and_still_refuses_unknown_keys(tmp_path):
    assert build_config([{"fast": {"crop_before_resampling": False}}]).data.crop_before_resampling is False
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("fast:\n  crop_before_resamplng: false\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'fast.crop_before_resamplng'"):
        parse_config(["--config", str(wrong)])


def test_no_speed_switch_is_preprocessing():
    """The fast section changes speed only: nothing stored as preprocessing with a checkpoint is in it."""
    fast = {f.name for f in dataclasses.fields(FastConfig)}
    assert "crop_before_resampling" in PREPROCESSING and not fast & set(PREPROCESSING)
    data = {f.name for f in dataclasses.fields(SECTIONS["data"])}
    assert set(PREPROCESSING) <= data


@pytest.mark.parametrize("command", ["train", "infer", "serve"])
def test_crop_before_resampling_keeps_its_flag(command):
    parser = cli.build_parser()
    args, _ = parser.parse_known_args([command, "--no-crop_before_resampling"])
    assert args.crop_before_resampling is False


@pytest.mark.parametrize("command", ["train", "infer", "export", "crossval"])
def test_overwrite_keeps_its_flag_in_the_general_section(command):
    from btcv_unetr.config.flags import config_from_args
    parser = cli.build_parser()
    args, _ = parser.parse_known_args([command, "--overwrite"])
    assert config_from_args(args).general.overwrite is True


@pytest.mark.parametrize("command", ["train", "infer", "export", "serve", "crossval"])
def test_model_name_is_the_reference_flag_that_chooses_the_network(command, capsys):
    parser = cli.build_parser()
    args, unknown = parser.parse_known_args([command, "--model_name", "segresnet"])
    assert not unknown and args.model_name == "segresnet"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--model_name", "swinunetr"])  # the reference's spelling is swin_unetr
    assert "invalid choice: 'swinunetr'" in capsys.readouterr().err
    assert parse_config(["--model_name", "unetr"]) == parse_config([])
    assert parse_config(["--model_name", "swin_unetr"]).model.model_name == "swin_unetr"


def test_reference_test_extras_are_named_per_section_and_marked_unused_in_infers_help():
    for section, names in REFERENCE_TEST_EXTRAS.items():
        assert set(names) <= set(CONFIG_FLAGS["infer"][section])
        assert set(names) <= {f.name for f in dataclasses.fields(SECTIONS[section])}
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["infer"].format_help().split())
    assert help_text.count("accepted as the reference's test.py does; not used by inference") == \
        sum(len(names) for names in REFERENCE_TEST_EXTRAS.values())


def test_check_data_takes_its_flags_from_a_config_file(phantom_dir, tmp_path, capsys):
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump({"data": {"data_dir": str(phantom_dir), "json_list": "dataset.json"}}))
    assert cli.main(["check-data", "--config", str(config)]) == 0
    assert "check-data: OK, 3 training, 1 validation, 1 test entries" in capsys.readouterr().out
    # The flags beat the file: 3 classes are too few for the phantoms' 13 organs.
    assert cli.main(["check-data", "--config", str(config), "--out_channels", "3"]) == 1
    assert "problem(s) found" in capsys.readouterr().out


def test_check_data_and_evaluate_refuse_flags_of_other_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check-data", "--data_dir", "x", "--max_epochs", "3"])
    assert "--max_epochs is not a flag of 'check-data'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--pred", "p", "--label", "l", "--tta"])
    assert "--tta is not a flag of 'evaluate'" in capsys.readouterr().err


def test_evaluate_takes_classes_and_distances_from_a_config_file_and_names_from_the_datalist(tmp_path, capsys):
    import json

    import nibabel as nib
    import numpy as np
    label = np.zeros((8, 8, 8), np.uint8)
    label[1:4, 1:4, 1:4], label[5:7, 5:7, 5:7] = 1, 2
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labels" / "label0001.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "pred" / "img0001_seg.nii.gz")
    datalist = tmp_path / "labels" / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"},
                                    "training": [{"image": "label0001.nii.gz", "label": "label0001.nii.gz"}]}))
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": {"out_channels": 3}, "infer": {"hd95": False}}))
    assert cli.main(["evaluate", "--config", str(config), "--pred", str(tmp_path / "pred"), "--label",
                     str(datalist)]) == 0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["organs"] == {"liver": {"dice": 1.0, "iou": 1.0}, "spleen": {"dice": 1.0, "iou": 1.0}}
    # --no_hd95 (the reference spelling) and --out_channels still work as flags, over the file.
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels"),
                     "--out_channels", "2", "--no_hd95"]) == 0
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["organs"] == \
        {"class 1": {"dice": 1.0, "iou": 1.0}}


def _old_layout(config_dict: dict) -> dict:
    """A config dict as checkpoints stored it before issue 21: crop_before_resampling a speed switch,
    overwrite in infer, model_name in model, no general section."""
    old = {section: dict(values) for section, values in config_dict.items() if section != "general"}
    old["fast"]["crop_before_resampling"] = old["data"].pop("crop_before_resampling")
    old["infer"]["overwrite"] = config_dict["general"]["overwrite"]
    old["model"]["model_name"] = "unetr"
    return old


def test_an_old_checkpoints_config_loads_and_inference_takes_its_crop_order(tmp_path, capsys):
    """crop_before_resampling is preprocessing: the checkpoint's value (here the reference order) wins over the
    flags at inference, as the intensity window and spacing do; an old file needs no warning about it."""
    import torch
    from conftest import tiny_config

    from btcv_unetr.inference.loader import load_model
    from btcv_unetr.io.checkpoint import stored_config
    from btcv_unetr.model.build import build_model
    trained = tiny_config(data={"crop_before_resampling": False}, general={"overwrite": True})
    old = _old_layout(trained.to_dict())
    assert stored_config({"config": old}, "old.pt") == trained
    torch.save({"state_dict": build_model(trained.model).state_dict(), "config": old}, tmp_path / "old.pt")
    asked = tiny_config(train={"pretrained_dir": str(tmp_path), "pretrained_model_name": "old.pt"})
    assert asked.data.crop_before_resampling is True
    loaded = load_model(asked, torch.device("cpu"))
    assert loaded.config.data.crop_before_resampling is False
    assert "ignoring config keys" not in capsys.readouterr().err
