"""``btcv-unetr export`` of every network of the registry (issue 28): TorchScript and bundle round trips per net, the
ONNX table's refusal lines, and a TorchScript archive whose recorded config and weights disagree."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_NETS, tiny_net_config

from btcv_unetr import cli
from btcv_unetr.errors import UserError
from btcv_unetr.inference import export as export_module
from btcv_unetr.inference.loader import load_model, with_weights_file
from btcv_unetr.io.bundle import read_bundle
from btcv_unetr.io.checkpoint import load_checkpoint
from btcv_unetr.model.architectures import ARCHITECTURES
from btcv_unetr.model.build import build_model
from btcv_unetr.model.pretrained import resolve_pretrained
from btcv_unetr.model.torchscript import load_torchscript_weights
from btcv_unetr.testing.checkpoints import seeded_checkpoint

# One process makes each net's checkpoint, exports and reference logits once (tracing takes seconds).
pytestmark = pytest.mark.xdist_group("test_export_networks")
NETS = [name for name in TINY_NETS if name != "unetr"]  # UNETR's round trips are tests/test_export.py's


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Per net, lazily: its seeded checkpoint, the checkpoint model's logits on one window, and its exports."""
    return {"root": tmp_path_factory.mktemp("nets")}


def _net(made: dict, name: str) -> dict:
    if name not in made:
        config = tiny_net_config(name)
        checkpoint = seeded_checkpoint(made["root"] / name / "model.pt", config, seed=1)
        model = build_model(config.model, config.data.pixdim)
        model.load_state_dict(load_checkpoint(checkpoint)["state_dict"])
        window = torch.rand(1, 1, *config.model.roi_size, generator=torch.Generator().manual_seed(2))
        made[name] = {"config": config, "checkpoint": checkpoint, "window": window, "state": model.state_dict(),
                      # Swin UNETR's 64-voxel forward takes seconds on 2 cores: its round trips compare weights
                      "logits": _logits(model, window) if name != "swin_unetr" else None}
    return made[name]


def _same_network(model: torch.nn.Module, net: dict) -> bool:
    """The checkpoint's weights, and (where computed) its logits on the window."""
    state = model.state_dict()
    same = state.keys() == net["state"].keys() and all(torch.equal(state[k], v) for k, v in net["state"].items())
    return same and (net["logits"] is None or torch.equal(_logits(model, net["window"]), net["logits"]))


def _logits(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(window)


def _exported(made: dict, name: str, kind: str) -> Path:
    """The net's TorchScript file (``kind`` "torchscript") or bundle folder ("bundle"), exported once."""
    net = _net(made, name)
    if kind not in net:
        out = made["root"] / name / ("model_ts.pt" if kind == "torchscript" else "bundle")
        flags = ["--format", "torchscript", "--out", str(out)] if kind == "torchscript" else ["--bundle", str(out)]
        assert cli.main(["export", "--checkpoint", str(net["checkpoint"]), *flags]) == 0
        net[kind] = out
    return net[kind]


def _record(path: Path) -> dict:
    """The model config an export recorded (extra/btcv_unetr_model.json under the archive's one folder)."""
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/extra/btcv_unetr_model.json")]
        return json.loads(archive.read(name))


@pytest.mark.parametrize("name", NETS)
def test_a_torchscript_export_reads_back_as_its_own_network_whatever_the_flags(name, made, capsys):
    """Read as test.py and serve read it (flags of the tiny UNETR): the recorded network is built, the same logits."""
    path, net = _exported(made, name, "torchscript"), _net(made, name)
    record = _record(path)
    assert record["model_name"] == name and record["spacing"] == list(net["config"].data.pixdim)
    capsys.readouterr()
    loaded = load_model(with_weights_file(tiny_net_config("unetr"), path), torch.device("cpu"))
    assert loaded.config.model == net["config"].model
    assert f"using the architecture recorded in {path}" in capsys.readouterr().out
    assert _same_network(loaded.model, net)


@pytest.mark.parametrize("name", ["segresnet", "dynunet"])
def test_the_traced_file_itself_runs_with_the_checkpoint_logits_at_another_batch_size(name, made):
    """torch.jit.load of the export (the file a user's runtime loads): batch 2 although it was traced with 1."""
    path, net = _exported(made, name, "torchscript"), _net(made, name)
    batch = torch.cat([net["window"], net["window"].flip(2)])
    with torch.no_grad():
        logits = torch.jit.load(str(path))(batch)
    assert torch.allclose(logits[:1], net["logits"], atol=1e-5) and logits.shape[0] == 2


def test_resume_jit_takes_the_recorded_net_with_matching_flags_and_refuses_others_in_one_line(made):
    """--resume_jit builds the flags' network: the recorded config must agree (name, settings that shape weights)."""
    path, net = _exported(made, "segresnet", "torchscript"), _net(made, "segresnet")
    model = build_model(net["config"].model, net["config"].data.pixdim)
    load_torchscript_weights(model, net["config"].model, path)
    assert torch.equal(_logits(model, net["window"]), net["logits"])
    with pytest.raises(UserError, match=r"holds a SegResNet \(its recorded config\), the flags build a UNETR: run "
                                        r"with --model_name segresnet"):
        load_torchscript_weights(build_model(tiny_net_config("unetr").model), tiny_net_config("unetr").model, path)
    wider = tiny_net_config("segresnet", model={"init_filters": 16}).model
    with pytest.raises(UserError, match="TorchScript SegResNet was built with --init_filters 8, the flags say "
                                        "--init_filters 16: run with the file's settings"):
        load_torchscript_weights(build_model(wider), wider, path)


def test_an_archive_whose_recorded_config_and_weights_disagree_is_refused_in_one_line(made, tmp_path, capsys):
    """A DynUNet's record in a SegResNet's trace: the strict check names what differs, one line, exit 2."""
    source = _exported(made, "segresnet", "torchscript")
    forged = tmp_path / "forged.pt"
    record = json.dumps({**dataclasses.asdict(tiny_net_config("dynunet").model), "spacing": _record(source)["spacing"]})
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(forged, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            copy.writestr(item, record if item.filename.endswith("/extra/btcv_unetr_model.json") else data)
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(forged), "--format", "torchscript", "--out", str(tmp_path / "again.pt")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {forged}: its weights are not those of the DynUNet "
                                                   "(nnU-Net) its recorded config builds (")
    assert "missing: " in err and "unexpected: " in err and not (tmp_path / "again.pt").exists()


@pytest.mark.parametrize("name", NETS)
def test_a_bundle_of_each_net_names_monai_s_class_and_reads_back_as_the_same_network(name, made, capsys):
    """network_def: MONAI's class with every argument (DynUNet's plan written out); --pretrained BUNDLE (over the
    tiny UNETR's flags) builds the same network with the same logits."""
    folder, net = _exported(made, name, "bundle"), _net(made, name)
    definition = json.loads((folder / "configs" / "inference.json").read_text())["network_def"]
    assert definition["_target_"] == {"swin_unetr": "SwinUNETR", "segresnet": "SegResNet", "dynunet": "DynUNet",
                                      "mednext": "MedNeXt"}[name]
    if name == "dynunet":
        assert definition["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]] and definition["filters"] == [4, 8, 16]
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    assert metadata["name"].startswith(ARCHITECTURES[name].title + " ")
    assert read_bundle(folder).values["model"]["model_name"] == name
    config = resolve_pretrained(tiny_net_config("unetr", train={"pretrained": str(folder)}), "infer")
    loaded = load_model(config, torch.device("cpu"))
    assert loaded.config.model == net["config"].model
    assert _same_network(loaded.model, net)


def test_a_dynunet_bundle_whose_plan_is_not_ours_is_refused_in_one_line(made, tmp_path):
    folder = _exported(made, "dynunet", "bundle")
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"]["kernel_size"][0] = [1, 3, 3]
    copy = tmp_path / "bundle"
    for sub in ("configs", "models"):
        (copy / sub).mkdir(parents=True)
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    (copy / "models" / "model.pt").write_bytes((folder / "models" / "model.pt").read_bytes())
    with pytest.raises(UserError, match=r"network_def::kernel_size is not what btcv-unetr plans for a \(32, 32, "
                                        r"32\) window at \(6.0, 6.0, 6.0\) mm"):
        read_bundle(copy)


@pytest.mark.parametrize("name", ["segresnet", "dynunet"])
def test_onnx_export_of_each_cnn_gives_the_checkpoint_logits(name, made, tmp_path):
    """What ONNX_PROBLEMS says works does: onnxruntime's logits are PyTorch's (test_export.py's tolerance). MedNeXt
    and Swin UNETR were measured by hand (seconds to minutes each on 2 cores; docs/export.md)."""
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    net, out = _net(made, name), tmp_path / f"{name}.onnx"
    assert cli.main(["export", "--checkpoint", str(net["checkpoint"]), "--format", "onnx", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": net["window"].numpy()})
    assert torch.allclose(torch.from_numpy(logits), net["logits"], atol=1e-4)


@pytest.mark.parametrize("how", ["table", "exporter"])
def test_onnx_that_fails_is_one_line_naming_the_formats_that_work(how, made, tmp_path, capsys, monkeypatch):
    """The table's refusal (a net listed as failing), and the exporter's own error where the table expected it to
    work (another torch): one line, nothing written."""
    pytest.importorskip("onnx")
    if how == "table":
        monkeypatch.setitem(export_module.ONNX_PROBLEMS, "segresnet", "an operator the exporter lacks")
    else:
        def failing(*args, **kwargs):
            raise torch.onnx.errors.OnnxExporterError("Unsupported: ONNX export of operator roll\nmore detail")
        monkeypatch.setattr(torch.onnx, "export", failing)
    net, out = _net(made, "segresnet"), tmp_path / "segresnet.onnx"
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(net["checkpoint"]), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = ("fails (an operator the exporter lacks)" if how == "table" else
                f"fails in torch {torch.__version__}'s exporter (Unsupported: ONNX export of operator roll)")
    assert err == f"error: export: ONNX export of SegResNet {expected}: use --format torchscript or --bundle\n"
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_of_an_unknown_network_class_is_refused_in_one_line(made, tmp_path):
    folder = _exported(made, "segresnet", "bundle")
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"] = {"_target_": "BasicUNet", "spatial_dims": 3}
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(config))
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    with pytest.raises(UserError, match="network_def is 'BasicUNet', a network btcv-unetr does not build: it loads "
                                        "bundles of MONAI's UNETR, SwinUNETR, SegResNet"):
        read_bundle(tmp_path)
