"""The precision rule per machine (capabilities mocked both ways), its reason, where it is stored and reused."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, tiny_net_config

from btcv_unetr import cli
from btcv_unetr.config.flags import parse_config
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.model.build import build_model
from btcv_unetr.runtime import precision
from btcv_unetr.runtime.precision import CpuFeatures, Precision, resolve_precision

CPU = torch.device("cpu")
AVX2 = CpuFeatures("AMD EPYC (AVX2)", "AVX2", avx512_bf16=False, amx_bf16=False, arm_bf16=False)
ZEN5 = CpuFeatures("AMD EPYC (Zen 5)", "AVX512", avx512_bf16=True, amx_bf16=False, arm_bf16=False)
XEON_AMX = CpuFeatures("Intel Xeon (AMX)", "AVX512", avx512_bf16=True, amx_bf16=True, arm_bf16=False)
# The flags are there, but torch runs its AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, or a build without AVX-512).
FLAGS_WITHOUT_KERNELS = dataclasses.replace(ZEN5, capability="AVX2")
GRAVITON = CpuFeatures("Neoverse-V1", "SVE256", avx512_bf16=False, amx_bf16=False, arm_bf16=True)


@pytest.fixture
def machine(monkeypatch, tmp_path_factory):
    """``machine(features, probe_speedup)`` makes this process see that CPU; the probe is counted. Each call
    starts with an empty precision cache of its own (a new machine has decided nothing yet)."""
    calls = []

    def set_machine(features: CpuFeatures, speedup: float = 3.0):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        monkeypatch.setattr(precision, "cpu_features", lambda: features)

        def probe(*shapes):
            calls.append(shapes)
            return speedup
        monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
        return calls
    return set_machine


@pytest.mark.parametrize("features, speedup, name, reason", [
    (AVX2, 3.0, "fp32", "this CPU has no bfloat16 instructions (AVX2)"),
    (FLAGS_WITHOUT_KERNELS, 3.0, "fp32", "this CPU has no bfloat16 instructions (AVX2)"),
    (ZEN5, 3.0, "bf16", "this CPU computes bfloat16 natively (AVX512-BF16; probe: 3.0x float32)"),
    (XEON_AMX, 4.0, "bf16", "this CPU computes bfloat16 natively (AMX; probe: 4.0x float32)"),
    (GRAVITON, 2.0, "bf16", "this CPU computes bfloat16 natively (ARM BF16; probe: 2.0x float32)"),
    (ZEN5, 1.05, "fp32", "this CPU has AVX512-BF16, but bfloat16 was not faster on this model's layers "
                         "(probe: 1.05x float32)"),
])
def test_auto_on_the_cpu(machine, features, speedup, name, reason):
    calls = machine(features, speedup)
    chosen = resolve_precision("auto", CPU, tiny_config().model)
    assert (chosen.name, chosen.reason) == (name, reason)
    assert chosen.describe() == f"precision {name}: {reason}"
    # The probe runs only where bfloat16 is native, on the model's own layer shapes (8 features, 8 tokens).
    assert calls == ([(8, 96, 192, 8, 3)] if features.native_bf16 else [])


@pytest.mark.parametrize("capability, name, scaled", [((9, 0), "bf16", False), ((8, 0), "bf16", False),
                                                      ((7, 5), "fp16", True)])
def test_auto_on_a_gpu(monkeypatch, capability, name, scaled):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = resolve_precision("auto", torch.device("cuda", 0), tiny_config().model)
    assert chosen.name == name and chosen.device_type == "cuda"
    assert ("gradient scaler" in chosen.reason) and (("no gradient scaler" in chosen.reason) != scaled)


def test_only_float16_has_a_gradient_scaler():
    assert not Precision("bf16", "test").scaler.is_enabled()
    assert not Precision("fp32", "test").scaler.is_enabled()
    assert Precision("fp16", "test").dtype == torch.float16 and not Precision("fp32", "test").enabled
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Precision("auto", "test")


@pytest.mark.parametrize("spatial_dims, conv, shape", [(3, torch.nn.Conv3d, (1, 8, 48, 48, 48)),
                                                       (2, torch.nn.Conv2d, (1, 8, 333, 333))])
def test_the_probe_times_the_models_own_layers_in_its_dimensions(spatial_dims, conv, shape):
    (convolution, volume), (linear, tokens) = precision.probe_layers(8, 32, 64, 27, spatial_dims)
    assert type(convolution) is conv and convolution.kernel_size == (3,) * spatial_dims
    assert tuple(volume.shape) == shape and convolution(volume).shape == volume.shape
    assert (linear.in_features, linear.out_features) == (32, 64) and tuple(tokens.shape) == (27, 32)


def test_auto_probes_a_2d_model_with_its_2d_layers(machine):
    calls = machine(ZEN5)
    model = tiny_config(model={"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": 64, "roi_y": 64}).model
    assert resolve_precision("auto", CPU, model).name == "bf16"
    assert calls == [(8, 96, 192, 16, 2)]  # 64 / 16 = 4 patches a side: 16 tokens


def test_bf16_forced_on_an_avx2_cpu_warns_and_still_runs(machine, capsys):
    machine(AVX2)
    chosen = resolve_precision("bf16", CPU, tiny_config().model)
    err = capsys.readouterr().err
    assert chosen.name == "bf16" and chosen.reason == "asked for (--precision bf16)"
    assert "warning: precision bf16 has no fast kernels on this CPU (AVX2)" in err and "--precision auto" in err
    model = build_model(tiny_config(model={"feature_size": 4, "roi_x": 16, "roi_y": 16, "roi_z": 16}).model).eval()
    with torch.inference_mode(), chosen.autocast(CPU):
        out = model(torch.rand(1, 1, 16, 16, 16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_flags_and_old_settings_map_to_a_precision():
    assert parse_config([]).train.precision == "auto"
    assert parse_config(["--noamp"]).train.precision == "fp32"
    assert parse_config(["--precision", "bf16"]).train.precision == "bf16"
    from btcv_unetr.config.load import config_from_dict
    old = parse_config([]).to_dict()
    old["train"].pop("precision")
    for amp, name in ((False, "fp32"), (True, "auto")):
        old["train"]["amp"] = amp  # the key before the precision setting existed
        assert config_from_dict(old).train.precision == name


def _train(phantom_dir, logdir, *flags):
    argv = ["train", "--config", "tiny.yaml", "--data_dir", str(phantom_dir), "--json_list", "dataset.json",
            "--logdir", str(logdir), "--max_epochs", "1", *flags]
    assert cli.main(argv) == 0


def test_training_prints_and_stores_the_choice_and_inference_reuses_it(machine, phantom_dir, trained_run, tmp_path,
                                                                     capsys):
    machine(AVX2)
    _train(phantom_dir, tmp_path / "auto")
    line = "precision fp32: this CPU has no bfloat16 instructions (AVX2)"
    assert capsys.readouterr().out.count(line) == 1
    config_text = (tmp_path / "auto" / "config.yaml").read_text()
    assert config_text.startswith(f"# {line} (resolved on this machine)\n")
    assert yaml.safe_load(config_text)["train"]["precision"] == "auto"  # the setting as asked
    state = torch.load(tmp_path / "auto" / "model_final.pt", weights_only=True)
    assert state["precision"] == {"name": "fp32", "reason": "this CPU has no bfloat16 instructions (AVX2)"}

    # A run trained at an explicit fp32 (the session's trained run) on a machine where auto would pick bf16:
    # inference keeps fp32 ...
    machine(ZEN5)
    infer = {"pretrained_dir": str(trained_run), "pretrained_model_name": "model_final.pt"}
    predictor = Predictor(tiny_config(phantom_dir, train=infer))
    assert (predictor.precision.name, predictor.precision.reason) == ("fp32", "the training run's setting, from its "
                                                                              "checkpoint")
    # ... unless the flag says otherwise; and a run trained at auto is resolved afresh on this machine.
    assert Predictor(tiny_config(phantom_dir, train={**infer, "precision": "bf16"})).precision.name == "bf16"
    infer["pretrained_dir"] = str(tmp_path / "auto")
    assert Predictor(tiny_config(phantom_dir, train=infer)).precision.name == "bf16"


def test_a_stored_precision_that_is_slow_here_falls_back_to_auto(machine, phantom_dir, tmp_path):
    trained = tiny_config(phantom_dir, train={"precision": "bf16"})  # e.g. trained on a GPU or a Zen 5
    torch.save({"state_dict": build_model(trained.model).state_dict(), "config": trained.to_dict()},
               tmp_path / "model.pt")
    machine(AVX2)  # the checkpoint moves to a laptop
    predictor = Predictor(tiny_config(phantom_dir, train={"pretrained_dir": str(tmp_path),
                                                          "pretrained_model_name": "model.pt"}))
    assert predictor.precision.describe() == "precision fp32: this CPU has no bfloat16 instructions (AVX2)"


def test_unknown_precision_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--precision", "fp8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "argument --precision: invalid choice: 'fp8'" in err.strip().splitlines()[-1]


def _cache_file():
    return precision.cache_folder() / "precision.json"


def test_the_probe_decides_once_per_machine_and_later_starts_read_the_decision(machine, monkeypatch):
    calls = machine(ZEN5, 3.0)
    model = tiny_config().model
    first = resolve_precision("auto", CPU, model)
    path = _cache_file()
    assert first.name == "bf16" and len(calls) == 1
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    stored = json.loads(path.read_text())["decisions"]
    assert list(stored) == [precision.decision_key(ZEN5, (8, 96, 192, 8, 3))]
    assert stored[list(stored)[0]]["precision"] == "bf16" and stored[list(stored)[0]]["speedup"] == 3.0

    def no_probe(*shape):
        raise AssertionError("the probe ran although the decision is kept")
    monkeypatch.setattr(precision, "probe_bf16_speedup", no_probe)
    again = resolve_precision("auto", CPU, model)
    day = stored[list(stored)[0]]["decided"][:10]
    assert (again.name, again.reason) == ("bf16", f"this CPU computes bfloat16 natively (AVX512-BF16; probe on {day}: "
                                                  f"3.0x float32, kept in {path})")
    # An explicit setting is not the cache's business: it neither reads nor changes it.
    assert resolve_precision("fp32", CPU, model).reason == "asked for (--precision fp32)"
    assert json.loads(path.read_text())["decisions"] == stored


def test_a_probe_that_chose_fp32_is_kept_too(machine, monkeypatch):
    machine(ZEN5, 1.05)
    assert resolve_precision("auto", CPU, tiny_config().model).name == "fp32"
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda *shape: 4.0)  # a faster moment of a noisy machine
    again = resolve_precision("auto", CPU, tiny_config().model)
    assert again.name == "fp32" and again.reason.endswith(f"1.05x float32, kept in {_cache_file()})")


def test_each_model_shape_and_cpu_has_its_own_decision(machine, monkeypatch):
    calls = machine(ZEN5, 3.0)
    resolve_precision("auto", CPU, tiny_config().model)
    resolve_precision("auto", CPU, tiny_config(model={"feature_size": 16}).model)
    resolve_precision("auto", CPU, tiny_config(model={"feature_size": 16}).model)
    assert calls == [(8, 96, 192, 8, 3), (16, 96, 192, 8, 3)]
    zen4 = dataclasses.replace(ZEN5, model="AMD EPYC (Zen 4)")
    monkeypatch.setattr(precision, "cpu_features", lambda: zen4)
    resolve_precision("auto", CPU, tiny_config().model)
    assert len(calls) == 3 and len(json.loads(_cache_file().read_text())["decisions"]) == 3


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1, "decisions": {"x": {"precision": "fp8"}}}',
                                     "\udcff"])
def test_a_corrupt_cache_is_ignored_with_one_warning_and_rewritten(machine, capsys, content):
    calls = machine(ZEN5, 3.0)
    path = _cache_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert resolve_precision("auto", CPU, tiny_config().model).name == "bf16" and len(calls) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path}: unreadable precision cache")
    assert list(json.loads(path.read_text())["decisions"]) == [precision.decision_key(ZEN5, calls[0])]
    resolve_precision("auto", CPU, tiny_config().model)
    assert len(calls) == 1 and capsys.readouterr().err == ""


def test_a_cache_that_cannot_be_written_costs_one_warning_not_the_run(machine, monkeypatch, tmp_path, capsys):
    machine(ZEN5, 3.0)
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made inside a file
    assert resolve_precision("auto", CPU, tiny_config().model).name == "bf16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cannot keep the precision decision in {blocker}")
    assert "XDG_CACHE_HOME" in err[0] and "--precision" in err[0]


def test_the_tests_and_their_processes_use_a_temporary_cache_not_the_users():
    import subprocess

    from conftest import TEST_CACHE_HOME
    script = "from btcv_unetr.runtime.cache import cache_folder; print(cache_folder())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(Path(TEST_CACHE_HOME) / "btcv-unetr")


def test_the_probe_leaves_the_random_state_alone():
    """A seeded run initialises the same weights whether its precision came from the probe or the cache."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    precision.probe_layers(8, 96, 192, 8)
    assert torch.equal(torch.rand(3), expected)


def test_another_network_is_probed_with_its_own_forward_once_per_network_shape(machine, monkeypatch):
    """On a bfloat16 CPU a SegResNet's decision comes from the network probe the caller gives (its own forward),
    kept per network shape like UNETR's; without a probe it stays float32 and says why."""
    machine(ZEN5, 3.0)
    segresnet = tiny_net_config("segresnet").model
    probed = []

    def network_probe(name, settings):
        probed.append((name, json.loads(settings)["init_filters"]))
        return 2.5
    chosen = resolve_precision("auto", CPU, segresnet, network_probe=network_probe)
    assert (chosen.name, chosen.reason) == ("bf16", "this CPU computes bfloat16 natively (AVX512-BF16; probe: 2.5x "
                                                    "float32)")
    assert resolve_precision("auto", CPU, segresnet, network_probe=network_probe).name == "bf16"
    wider = tiny_net_config("segresnet", model={"init_filters": 16}).model
    resolve_precision("auto", CPU, wider, network_probe=network_probe)
    assert probed == [("segresnet", 8), ("segresnet", 16)]
    assert len(json.loads(_cache_file().read_text())["decisions"]) == 2
    unprobed = resolve_precision("auto", CPU, tiny_net_config("dynunet").model)
    assert (unprobed.name, unprobed.reason) == ("fp32", "float32: no bfloat16 probe was given for dynunet "
                                                        "(--precision bf16 asks for it)")


def test_the_network_probe_times_the_networks_own_forward_and_leaves_the_random_state():
    from btcv_unetr.model.speed import network_bf16_speedup
    config = tiny_net_config("dynunet").model
    state = torch.random.get_rng_state()
    speedup = network_bf16_speedup(*precision.probe_shape(config))
    assert speedup > 0 and torch.equal(torch.random.get_rng_state(), state)
