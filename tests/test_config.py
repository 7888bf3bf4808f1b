import dataclasses

import pytest
import yaml

from btcv_unetr.config.flags import parse_config
from btcv_unetr.config.load import CONFIG_DIR, PRESETS, build_config, config_from_dict
from btcv_unetr.config.schema import SECTIONS, Config
from btcv_unetr.config.validation import ConfigError


def test_defaults_are_the_reference_recipe():
    config = Config()
    assert config.model.roi_size == (96, 96, 96)
    assert (config.model.feature_size, config.model.hidden_size, config.model.mlp_dim,
            config.model.num_heads) == (16, 768, 3072, 12)
    assert (config.model.pos_embed, config.model.norm_name, config.model.res_block) == ("perceptron", "instance", True)
    assert (config.data.a_min, config.data.a_max, config.data.b_min, config.data.b_max) == (-175, 250, 0, 1)
    assert config.data.pixdim == (1.5, 1.5, 2.0)
    assert (config.data.num_samples, config.data.RandFlipd_prob, config.data.RandRotate90d_prob) == (4, 0.2, 0.2)
    assert (config.train.optim_name, config.train.optim_lr, config.train.reg_weight) == ("adamw", 1e-4, 1e-5)
    assert (config.train.warmup_epochs, config.train.max_epochs, config.train.val_every) == (50, 5000, 100)
    assert (config.infer.infer_overlap, config.infer.sw_batch_size) == (0.5, 0)  # 0: automatic, 1 on the CPU


def test_recipe_file_holds_every_key_with_the_default_value():
    recipe = yaml.safe_load((CONFIG_DIR / "btcv_unetr.yaml").read_text())
    assert recipe == Config().to_dict()
    assert parse_config(["--config", str(CONFIG_DIR / "btcv_unetr.yaml")]) == Config()


SHIPPED = sorted(path.name for path in CONFIG_DIR.glob("*.yaml"))


def _expected(*files: str) -> dict[str, dict]:
    """The defaults with the values ``files`` set (read as plain YAML, later files winning)."""
    expected = Config().to_dict()
    for name in files:
        for section, values in yaml.safe_load((CONFIG_DIR / name).read_text()).items():
            expected[section].update(values)
    return expected


def _assert_same(config: Config, expected: dict[str, dict]) -> None:
    """Every key of ``config`` equals ``expected``'s (floats within rounding: 3.0e-3 read as a float)."""
    actual = config.to_dict()
    for section, values in expected.items():
        for key, value in values.items():
            assert actual[section][key] == pytest.approx(value), (section, key, actual[section][key], value)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_loads_by_name_with_every_value_it_sets(name):
    """The file's own values arrive in the Config (none is dropped, renamed or overridden), every other key
    keeps its default; the file names only keys this version has."""
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    defaults = Config().to_dict()
    assert {f"{s}.{k}" for s, values in raw.items() for k in values} <= \
        {f"{s}.{k}" for s, values in defaults.items() for k in values}
    _assert_same(parse_config(["--config", name]), _expected(name))


def test_the_shipped_configs_include_the_2d_ones_and_every_preset():
    assert {"tiny.yaml", "tiny2d.yaml", "shapes2d.yaml", "phantom_demo.yaml", "btcv_unetr.yaml"} <= set(SHIPPED)
    assert {name for name in SHIPPED if name.startswith("preset_")} == {f"preset_{p}.yaml" for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_sets_the_model_size_over_the_config_and_under_the_flags(preset):
    """``--preset`` layers its file over ``--config`` (the tiny config's sizes give way) and under the flags."""
    config = parse_config(["--config", "tiny.yaml", "--preset", preset, "--num_layers", "8"])
    expected = _expected("tiny.yaml", f"preset_{preset}.yaml")
    expected["model"]["num_layers"] = 8
    _assert_same(config, expected)
    assert config.model.roi_size == (32, 32, 32)  # the config's ROI, which the preset does not set


def test_flags_use_reference_names_and_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {feature_size: 32, hidden_size: 384, num_heads: 6}\ntrain: {optim_lr: 1e-3}\n")
    config = parse_config(["--config", str(path), "--feature_size", "8", "--RandFlipd_prob", "0.5",
                           "--dist-url", "tcp://10.0.0.1:1234", "--noamp", "--roi_x", "64"])
    assert config.model.feature_size == 8           # flag beats file
    assert config.model.hidden_size == 384          # file beats default
    assert config.train.optim_lr == 1e-3            # YAML 1.1 reads 1e-3 as a string; accepted as a float
    assert config.data.RandFlipd_prob == 0.5
    assert config.dist.dist_url == "tcp://10.0.0.1:1234"
    assert config.train.precision == "fp32"
    assert config.model.roi_size == (64, 96, 96)


def test_boolean_flags_accept_reference_store_true_form():
    assert parse_config(["--res_block"]).model.res_block is True
    assert parse_config(["--no-res_block"]).model.res_block is False
    assert parse_config(["--use_normal_dataset"]).data.use_normal_dataset is True


@pytest.mark.parametrize("text, message", [
    ("model: {feature_sise: 8}", "unknown config key 'model.feature_sise'"),
    ("model: {space_x: 1.0}", "unknown config key 'model.space_x' (it belongs in 'data')"),
    ("feature_size: 8", "unknown config section 'feature_size' (did you mean model.feature_size?)"),
    ("model: {feature_size: eight}", "config key 'feature_size': expected int, got str 'eight'"),
    ("model: {feature_size: 8.5}", "config key 'feature_size': expected int, got float 8.5"),
    ("model: {res_block: 1}", "config key 'res_block': expected bool, got int 1"),
    ("train: {optim_name: rmsprop}", "config key 'optim_name': 'rmsprop' is not one of adam, adamw, sgd"),
    ("model: {roi_x: 100}", "config key 'roi_x': 100 must be a positive multiple of 16"),
    ("model: {hidden_size: 100}", "config key 'hidden_size': 100 is not divisible by num_heads=12"),
    ("data: {a_min: 300}", "config key 'a_max': 250.0 must be greater than a_min=300.0"),
    ("infer: {infer_overlap: 1.0}", "config key 'infer_overlap': 1.0 must be in [0, 1)"),
    ("data: {RandFlipd_prob: 2}", "config key 'RandFlipd_prob': 2.0 must be between 0 and 1"),
    ("data: {use_normal_dataset: true, cache_dir: /tmp/c}", "'use_normal_dataset' and 'cache_dir' exclude"),
    ("model: [1, 2]", "section 'model' must be a mapping"),
    ("model: {a: [", "not valid YAML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(path)])
    assert message in str(error.value)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        parse_config(["--config", "nope.yaml"])


def test_bad_flag_type_exits_with_argparse_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--max_epochs", "many"])
    assert exit_info.value.code == 2
    assert "--max_epochs: invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--optim_name", "rmsprop"], ["infer", "--no_such_flag"],
                                  ["train", "--class_weights", "inverse"]])
def test_bad_flag_on_the_command_line_is_one_line(argv, capsys):
    from btcv_unetr import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("btcv-unetr") and ": error: " in err
    assert argv[-1] in err and "(--help lists the flags)" in err


def test_round_trip_through_plain_dict_and_yaml(tmp_path):
    config = build_config([{"model": {"feature_size": 8}, "train": {"seed": 3, "max_steps": 10}}])
    assert config_from_dict(config.to_dict()) == config
    path = tmp_path / "resolved.yaml"
    config.save(path)
    assert parse_config(["--config", str(path)]) == config
    with pytest.raises(ConfigError, match="unknown config key 'model.colour'"):
        config_from_dict({"model": {"colour": 1}})


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--no-malloc_tuning" in text and "30% faster" in text and "--feature_size" in text


@pytest.mark.parametrize("argv, owners", [
    (["infer", "--warmup_epochs", "3"], "train, crossval"), (["infer", "--micro_batch", "2"], "train, crossval"),
    (["train", "--input", "scan.nii.gz"], "infer"), (["train", "--no-tta"], "infer, serve, crossval"),
    (["export", "--out", "x.pt", "--optim_lr=0.1"], "train, crossval"),
    (["export", "--out", "x.pt", "--split", "test"], "infer"),
])
def test_a_flag_of_another_command_is_refused_naming_its_commands(argv, owners, capsys):
    """A config flag the command would ignore stops it, and the line says which commands take it."""
    from btcv_unetr import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    flag = next(word for word in argv[1:] if word.startswith("-") and word not in ("--out",)).split("=")[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{flag} is not a flag of '{argv[0]}' (it is one of: {owners})" in err


def test_reference_test_py_flags_are_still_accepted():
    """The reference's test.py took its loader's training flags: test.py accepts them (unused)."""
    from btcv_unetr import cli
    parser = cli.build_parser()
    args = parser.parse_args(["infer", "--RandFlipd_prob", "0.2", "--RandRotate90d_prob", "0.2", "--workers", "8",
                              "--distributed", "--infer_overlap", "0.5", "--saved_checkpoint", "ckpt",
                              "--pretrained_dir", "./pretrained_models/", "--res_block", "--conv_block"])
    assert (args.RandFlipd_prob, args.workers, args.distributed, args.infer_overlap) == (0.2, 8, True, 0.5)


def test_each_command_lists_only_its_flags():
    from btcv_unetr.cli import CONFIG_FLAGS
    from btcv_unetr.config.flags import command_fields
    names = {command: {f.name for fields in command_fields(CONFIG_FLAGS[command]).values() for f in fields}
             for command in ("train", "infer", "export")}
    assert {"warmup_epochs", "optim_lr", "micro_batch", "infer_overlap", "overwrite"} <= names["train"]
    assert not {"input", "tta", "output_dir", "split"} & names["train"]
    assert {"input", "tta", "pretrained_dir", "precision", "a_min", "space_z"} <= names["infer"]
    assert not {"warmup_epochs", "optim_lr", "max_epochs", "logdir", "micro_batch", "num_samples"} & names["infer"]
    assert names["export"] == {"checkpoint", "pretrained", "overwrite", "infer_overlap", "mode"} | \
        {f.name for f in dataclasses.fields(SECTIONS["model"])}
