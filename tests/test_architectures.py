"""The networks a config names (issue 28, first part): the registry builds each with its own settings, refuses
another network's settings and an ROI the network cannot take, plans DynUNet as nnU-Net does, and a CNN trains,
resumes and segments through the same commands as UNETR."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from conftest import TINY_NETS, tiny_config, tiny_net_config
from monai.losses import DiceCELoss

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, ConfigError, build_config, read_yaml
from btcv_unetr.config.networks import plan_dynunet
from btcv_unetr.errors import UserError
from btcv_unetr.model.architectures import ARCHITECTURES, architecture_of, deep_outputs, roi_problem
from btcv_unetr.model.build import build_model
from btcv_unetr.model.speed import memory_format_for, prepare_model, use_sdpa
from btcv_unetr.serve.limits import BYTES_PER_WINDOW_VOXEL_FEATURE, Declared, job_memory_bytes
from btcv_unetr.train.loss import DeepSupervisionLoss, deep_supervision_weights

CNN = {"segresnet": {"init_filters": 8, "blocks_down": "1,1,1", "blocks_up": "1,1"},
       "dynunet": {"init_filters": 4}, "mednext": {"init_filters": 8}}


def _config(name: str, roi: int = 32, spatial_dims: int = 3, **model):
    roi_size = {"roi_x": roi, "roi_y": roi, "roi_z": roi} if spatial_dims == 3 else {"roi_x": roi, "roi_y": roi}
    return build_config([{"model": {"model_name": name, "spatial_dims": spatial_dims, **roi_size, **model},
                          "data": {"space_x": 6.0, "space_y": 6.0, "space_z": 6.0}}])


@pytest.mark.parametrize("name", list(CNN))
def test_each_cnn_maps_a_window_to_logits_of_every_class_and_learns(name):
    torch.manual_seed(0)
    config = _config(name, **CNN[name])
    model = build_model(config.model, config.data.pixdim)
    x = torch.rand(1, 1, 32, 32, 32)
    assert model(x).shape == (1, 14, 32, 32, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()


def test_swin_unetr_in_2d():  # in 3D: the fused-attention test and the training test below
    torch.manual_seed(0)
    picture = build_config([{"model": {"model_name": "swin_unetr", "spatial_dims": 2, "in_channels": 3,
                                       "out_channels": 3, "roi_x": 64, "roi_y": 64, "feature_size": 12}}])
    model = build_model(picture.model)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()  # trains: the 2D bottleneck keeps 2 x 2 pixels
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, roi, says", [
    ("swin_unetr", 32, "roi_x 32 must be a multiple of 32 of at least 64 for Swin UNETR"),
    ("swin_unetr", 80, "roi_x 80 must be a multiple of 32 of at least 64 for Swin UNETR"),
    ("segresnet", 36, "roi_x 36 must be a multiple of 8 for SegResNet"),
    ("mednext", 40, "roi_x 40 must be a multiple of 16 for MedNeXt"),
])
def test_an_roi_the_network_cannot_take_is_one_line(name, roi, says):
    config = _config(name, roi=roi)
    with pytest.raises(UserError) as refused:
        build_model(config.model)
    assert str(refused.value) == f"config: {says}: set --roi_x/--roi_y/--roi_z accordingly"


def test_segresnet_filters_fit_its_group_norm():
    with pytest.raises(UserError, match="init_filters 4 must be a multiple of 8 for SegResNet"):
        build_model(_config("segresnet", init_filters=4).model)


def test_dynunet_is_planned_from_the_spacing_as_nnunet_plans_it():
    """5 x 5 x 2 mm voxels, 64 x 64 x 32: x and y pool first; z (2.5x coarser) joins once x and y reach 2.5 mm."""
    kernels, strides = plan_dynunet((64, 64, 32), (0.8, 0.8, 2.0))
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [1, 1, 2]][:len(strides)]
    assert kernels[0] == [3, 3, 1] and kernels[2] == [3, 3, 3]
    isotropic_kernels, isotropic_strides = plan_dynunet((32, 32, 32), (1.0, 1.0, 1.0))
    assert isotropic_strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]] and all(k == [3, 3, 3] for k in isotropic_kernels)


def test_another_networks_setting_is_refused_and_defaults_pass():
    with pytest.raises(ConfigError, match="config key 'hidden_size': a setting of unetr, not of --model_name "
                                          "segresnet: drop it"):
        build_config([{"model": {"model_name": "segresnet", "hidden_size": 96}}])
    with pytest.raises(ConfigError, match="config key 'init_filters': a setting of segresnet, dynunet, mednext, not of "
                                          "--model_name unetr"):
        build_config([{"model": {"init_filters": 8}}])
    # The recipe file holds every key at its default: any network may start from it.
    recipe = yaml.safe_load((CONFIG_DIR / "btcv_unetr.yaml").read_text())
    assert build_config([recipe, {"model": {"model_name": "dynunet"}}]).model.model_name == "dynunet"
    assert build_config([{"model": {}}]).model.model_name == "unetr"  # files without the key: UNETR


def test_every_network_has_a_title_and_the_config_lists_them_all():
    from btcv_unetr.config.schema import ARCHITECTURE_NAMES
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES


# One tiny run per network, each as its BTCV preset trains it (deep supervision where the preset has it).
TRAINED = {"swin_unetr": {}, "segresnet": {"deep_supervision": 1}, "dynunet": {"deep_supervision": 1},
           "mednext": {"deep_supervision": 4}}


def _tiny_yaml(folder: Path, name: str) -> Path:
    """tiny.yaml's data, training and inference settings with the tiny network ``name`` instead of its UNETR."""
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    tiny["model"] = {"roi_x": 32, "roi_y": 32, "roi_z": 32, **TINY_NETS[name], **TRAINED[name]}
    tiny["data"]["num_samples"] = 1  # one crop per step: a 64^3 Swin UNETR step is seconds here
    path = folder / f"tiny_{name}.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


@pytest.mark.parametrize("name", list(TRAINED))
def test_each_network_trains_resumes_and_segments_in_the_scans_geometry(name, phantom_dir, tmp_path, capsys):
    logdir = tmp_path / "run"
    train = ["train", "--config", str(_tiny_yaml(tmp_path, name)), "--data_dir", str(phantom_dir), "--json_list",
             "dataset.json", "--logdir", str(logdir), "--precision", "fp32", "--val_every", "1"]
    assert cli.main([*train, "--max_epochs", "1", "--max_steps", "1"]) == 0
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    assert state["config"]["model"]["model_name"] == name and (state["epoch"], state["global_step"]) == (1, 1)
    assert state["config"]["model"]["deep_supervision"] == TRAINED[name].get("deep_supervision", 0)
    assert cli.main([*train, "--max_epochs", "2", "--max_steps", "2", "--checkpoint",
                     str(logdir / "model_final.pt")]) == 0
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 2)
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    capsys.readouterr()
    assert cli.main(["infer", "--pretrained_dir", str(logdir), "--pretrained_model_name", "model_final.pt",
                     "--input", str(scan), "--output_dir", str(tmp_path / "out"), "--no-overlay", "--no_hd95",
                     "--device", "cpu"]) == 0
    mask = nib.load(next((tmp_path / "out").glob("*_seg.nii.gz")))
    assert mask.shape == nib.load(scan).shape
    assert (mask.affine == nib.load(scan).affine).all()
    assert 0 <= mask.get_fdata().min() and mask.get_fdata().max() < 14
    out = capsys.readouterr().out
    assert "model: " in out and "parameters" in out


def test_an_older_unetr_config_still_builds_unetr():
    model = build_model(tiny_config().model)
    assert type(model).__name__ == "UNETR"


@pytest.mark.parametrize("heads, weights", [(1, [1.0]), (2, [2 / 3, 1 / 3]), (3, [4 / 7, 2 / 7, 1 / 7])])
def test_deep_supervision_weights_halve_per_level_and_sum_to_one(heads, weights):
    assert deep_supervision_weights(heads) == pytest.approx(weights)


def test_the_deep_supervision_loss_is_the_weighted_sum_of_each_heads_loss_at_its_resolution():
    torch.manual_seed(0)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    full, half = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)
    # nearest-exact halving keeps the odd voxels of each axis
    expected = 2 / 3 * loss(full, target) + 1 / 3 * loss(half, target[:, :, 1::2, 1::2, 1::2])
    assert DeepSupervisionLoss(loss, 3)([full, half], target) == pytest.approx(float(expected), rel=1e-6)
    # DynUNet stacks its (upsampled) heads on axis 1
    stacked = torch.stack([full, full.flip(2)], dim=1)
    expected = 2 / 3 * loss(full, target) + 1 / 3 * loss(full.flip(2), target)
    assert DeepSupervisionLoss(loss, 3)(stacked, target) == pytest.approx(float(expected), rel=1e-6)
    assert DeepSupervisionLoss(loss, 3)(full, target) == pytest.approx(float(loss(full, target)), rel=1e-6)


@pytest.mark.parametrize("name, deep, heads", [("segresnet", 1, [32, 16]), ("dynunet", 1, [32, 32]),
                                               ("mednext", 4, [32, 16, 8, 4, 2])])
def test_deep_heads_train_and_inference_returns_the_full_resolution_head_only(name, deep, heads):
    torch.manual_seed(0)
    config = tiny_net_config(name, model={"deep_supervision": deep})
    model = build_model(config.model, config.data.pixdim)
    x = torch.rand(1, 1, 32, 32, 32)
    outputs = deep_outputs(model(x), 3)
    assert [tuple(o.shape) for o in outputs] == [(1, 14, s, s, s) for s in heads]
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 14, 32, 32, 32)


@pytest.mark.parametrize("name, model, says", [
    ("segresnet", {"deep_supervision": 2}, "deep_supervision 2 exceeds SegResNet's 1 decoder levels below full "
                                           "resolution"),
    ("dynunet", {"deep_supervision": 2}, "deep_supervision 2 must be at most 1 for this DynUNet (3 levels planned "
                                         "from the ROI (32, 32, 32))"),
    ("mednext", {"deep_supervision": 2}, "MedNeXt has a head at each of its 4 lower levels or none: give 0 or 4"),
])
def test_deep_supervision_a_network_cannot_have_is_one_line(name, model, says):
    # refused when the config is read (before a run folder is made), and by the builder for a config changed later
    with pytest.raises(ConfigError, match=re.escape(says)):
        tiny_net_config(name, model=model)
    config = dataclasses.replace(tiny_net_config(name), model=dataclasses.replace(tiny_net_config(name).model, **model))
    with pytest.raises(UserError, match=re.escape(says)):
        build_model(config.model, config.data.pixdim)
    with pytest.raises(ConfigError, match="config key 'deep_supervision': a setting of segresnet, dynunet, mednext"):
        build_config([{"model": {"model_name": "swin_unetr", "deep_supervision": 1}}])


@pytest.mark.parametrize("name", ["segresnet", "dynunet", "mednext"])
def test_each_cnn_in_2d(name):
    torch.manual_seed(0)
    config = build_config([{"model": {"model_name": name, "spatial_dims": 2, "in_channels": 3, "out_channels": 3,
                                      "roi_x": 64, "roi_y": 64, **CNN[name]}}])
    model = build_model(config.model, config.data.pixdim)
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("file", sorted(p.name for p in CONFIG_DIR.glob("btcv_*.yaml"))
                         + sorted(p.name for p in CONFIG_DIR.glob("phantom_demo*.yaml")))
def test_every_network_preset_builds_its_network(file):
    config = build_config([read_yaml(CONFIG_DIR / file)])
    assert config.model.model_name in file or file in ("phantom_demo.yaml",)
    device = "cpu" if config.model.model_name == "swin_unetr" else "meta"  # Swin's constructor reads a value
    if device == "cpu" and "btcv" in file:
        assert roi_problem(config.model) is None  # the full Swin UNETR is too big to build in a test
        return
    with torch.device(device):
        model = build_model(config.model, config.data.pixdim)
    assert type(model).__name__ in architecture_of(config.model).classes


def test_swin_unetrs_window_attention_takes_the_fused_kernel_with_the_same_output():
    torch.manual_seed(0)
    config = tiny_net_config("swin_unetr")
    model = build_model(config.model).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.inference_mode():
        own = model(x)
    assert use_sdpa(model, True) == 8  # 2 blocks in each of 4 stages
    with torch.inference_mode():
        fused = model(x)
    assert own.shape == (1, 14, 64, 64, 64)
    torch.testing.assert_close(fused, own, rtol=1e-4, atol=1e-4)


def test_the_layout_is_the_networks_own_measured_choice(monkeypatch):
    fast = tiny_config().fast
    cpu = torch.device("cpu")
    assert memory_format_for(fast, cpu, "fp32", False, 3, network_default=True) == torch.channels_last_3d
    assert memory_format_for(fast, cpu, "fp32", False, 3, network_default=False) == torch.contiguous_format
    monkeypatch.setitem(ARCHITECTURES, "dynunet", dataclasses.replace(ARCHITECTURES["dynunet"],
                                                                      cpu_channels_last=False))
    config = tiny_net_config("dynunet")
    _, layout = prepare_model(build_model(config.model), fast, cpu, "fp32", training=False)
    assert layout == torch.contiguous_format  # told by the module's class
    forced = dataclasses.replace(fast, channels_last=True)
    assert prepare_model(build_model(config.model), forced, cpu, "fp32", training=False)[1] == torch.channels_last_3d


def test_the_services_window_memory_follows_each_networks_full_resolution_width():
    """A job's window term scales with the widest full-resolution map of the network (MedNeXt's expanded blocks,
    a CNN's first filters), and an ensemble counts its largest member's windows."""
    scan = Declared((100, 100, 50), (1.5, 1.5, 2.0))
    spacing = (1.5, 1.5, 2.0)

    def window_term(*models):
        return (job_memory_bytes(scan, models[0], spacing, 2, len(models), list(models))
                - job_memory_bytes(scan, models[0], spacing, 0, len(models), list(models)))

    unetr, mednext = tiny_net_config("unetr").model, tiny_net_config("mednext").model  # feature 8; 8 filters x 2
    assert window_term(unetr) == 2 * 32 ** 3 * 8 * BYTES_PER_WINDOW_VOXEL_FEATURE
    assert window_term(mednext) == 2 * 32 ** 3 * 16 * BYTES_PER_WINDOW_VOXEL_FEATURE
    swin = tiny_net_config("swin_unetr").model  # 64^3 windows of 12 features
    assert window_term(unetr, swin) == window_term(swin) == 2 * 64 ** 3 * 12 * BYTES_PER_WINDOW_VOXEL_FEATURE
