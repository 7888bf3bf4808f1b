"""The networks a config names (issue 28, first part): the registry builds each with its own settings, refuses
another network's settings and an ROI the network cannot take, plans DynUNet as nnU-Net does, and a CNN trains,
resumes and segments through the same commands as UNETR."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, ConfigError, build_config
from btcv_unetr.errors import UserError
from btcv_unetr.model.architectures import ARCHITECTURES, plan_dynunet
from btcv_unetr.model.build import build_model

CNN = {"segresnet": {"init_filters": 8, "blocks_down": "1,1,1", "blocks_up": "1,1"},
       "dynunet": {"init_filters": 4}, "mednext": {}}


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


def test_swin_unetr_in_3d_and_2d():
    torch.manual_seed(0)
    volume = _config("swin_unetr", roi=64, feature_size=12)
    model = build_model(volume.model).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64, 64)).shape == (1, 14, 64, 64, 64)
    picture = build_config([{"model": {"model_name": "swin_unetr", "spatial_dims": 2, "in_channels": 3,
                                       "out_channels": 3, "roi_x": 64, "roi_y": 64, "feature_size": 12}}])
    model = build_model(picture.model)
    model(torch.rand(2, 3, 64, 64)).mean().backward()  # trains: the 2D bottleneck keeps 2 x 2 pixels


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
    with pytest.raises(ConfigError, match="config key 'init_filters': a setting of segresnet, dynunet, not of "
                                          "--model_name unetr"):
        build_config([{"model": {"init_filters": 8}}])
    # The recipe file holds every key at its default: any network may start from it.
    recipe = yaml.safe_load((CONFIG_DIR / "btcv_unetr.yaml").read_text())
    assert build_config([recipe, {"model": {"model_name": "dynunet"}}]).model.model_name == "dynunet"
    assert build_config([{"model": {}}]).model.model_name == "unetr"  # files without the key: UNETR


def test_every_network_has_a_title_and_the_config_lists_them_all():
    from btcv_unetr.config.schema import ARCHITECTURE_NAMES
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES


@pytest.fixture(scope="module")
def segresnet_yaml(tmp_path_factory) -> Path:
    """tiny.yaml's data, training and inference settings with a tiny SegResNet instead of its UNETR."""
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    tiny["model"] = {"model_name": "segresnet", "roi_x": 32, "roi_y": 32, "roi_z": 32, **CNN["segresnet"]}
    path = tmp_path_factory.mktemp("config") / "tiny_segresnet.yaml"
    path.write_text(yaml.safe_dump(tiny))
    return path


def test_a_segresnet_trains_resumes_and_segments_in_the_scans_geometry(segresnet_yaml, phantom_dir, tmp_path,
                                                                        capsys):
    logdir = tmp_path / "run"
    train = ["train", "--config", str(segresnet_yaml), "--data_dir", str(phantom_dir), "--json_list",
             "dataset.json", "--logdir", str(logdir), "--precision", "fp32", "--max_epochs", "1", "--val_every", "1"]
    assert cli.main(train) == 0
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    assert state["config"]["model"]["model_name"] == "segresnet" and state["epoch"] == 1
    assert cli.main([*train[:-4], "--max_epochs", "2", "--val_every", "1", "--checkpoint",
                     str(logdir / "model_final.pt")]) == 0
    assert torch.load(logdir / "model_final.pt", weights_only=True)["epoch"] == 2
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    capsys.readouterr()
    assert cli.main(["infer", "--pretrained_dir", str(logdir), "--pretrained_model_name", "model_final.pt",
                     "--input", str(scan), "--output_dir", str(tmp_path / "out"), "--no-overlay", "--no_hd95",
                     "--device", "cpu"]) == 0
    mask = nib.load(next((tmp_path / "out").glob("*_seg.nii.gz")))
    assert mask.shape == nib.load(scan).shape
    assert (mask.affine == nib.load(scan).affine).all()
    out = capsys.readouterr().out
    assert "model: " in out and "parameters" in out
    assert cli.main(["export", "--checkpoint", str(logdir / "model_final.pt"), "--format", "torchscript",
                     "--out", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: export --format torchscript supports UNETR only so far, not SegResNet (--model_name segresnet); "
        "its checkpoint (.pt) works everywhere else")


def test_an_older_unetr_config_still_builds_unetr():
    model = build_model(tiny_config().model)
    assert type(model).__name__ == "UNETR"
