"""MONAI bundles: ``btcv-unetr export --bundle`` run by MONAI alone (its masks against ``test.py``'s), its
metadata verified by MONAI's ``verify_metadata``, and UNETR bundles in the model zoo's layout
loaded for inference and finetuning (``--pretrained BUNDLE``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.bundle import verify_metadata
from monai.bundle.utils import DEFAULT_METADATA
from monai.networks.nets import UNETR

from btcv_unetr import cli
from btcv_unetr.io.bundle import BUNDLE_FILES, MANDATORY_TENSOR_FORMAT, METADATA_SCHEMA, read_bundle
from btcv_unetr.io.checkpoint import load_checkpoint
from btcv_unetr.testing.checkpoints import seeded_checkpoint

# ``python -m monai.bundle ...`` in which importing btcv_unetr fails: a None entry in sys.modules makes every
# ``import btcv_unetr`` raise ImportError, so a bundle that needed the package could not run.
MONAI_ALONE = ("import runpy, sys; sys.modules['btcv_unetr'] = None; sys.argv = ['monai.bundle', *sys.argv[1:]]; "
               "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True); "
               "assert not [m for m in sys.modules if m.startswith('btcv_unetr') and sys.modules[m] is not None]")


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` with MONAI alone, isolated (-I: no user site, no PYTHONPATH), on the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-c", MONAI_ALONE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny model with seeded random weights: its masks hold many classes, so agreement means something."""
    return seeded_checkpoint(tmp_path_factory.mktemp("run") / "model.pt", tiny_config())


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exported") / "unetr_bundle"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--bundle", str(folder)]) == 0
    return folder


def _masks(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {path.name: nib.load(path) for path in sorted(folder.glob("*_seg.nii.gz"))}


def _infer(tmp: Path, name: str, *flags: str) -> Path:
    out = tmp / name
    argv = ["infer", *flags, "--output_dir", str(out), "--precision", "fp32", "--device", "cpu", "--sw_batch_size",
            "2", "--no-overlay", "--no_hd95"]
    assert cli.main(argv) == 0
    return out


def test_the_bundle_has_the_zoo_layout_and_the_model_as_a_plain_state_dict(bundle, checkpoint):
    assert all((bundle / name).is_file() for name in BUNDLE_FILES)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state.keys() == load_checkpoint(checkpoint)["state_dict"].keys()
    UNETR(**{k: v for k, v in json.loads((bundle / "configs" / "inference.json").read_text())["network_def"].items()
             if k != "_target_"}).load_state_dict(state)  # MONAI's own UNETR takes it, strictly
    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme
    assert "WARNING: this model's weights are random" in readme  # the model card travels with the bundle


def test_monai_alone_runs_the_bundle_and_its_masks_agree_with_test_py(bundle, checkpoint, phantom_dir, tmp_path):
    """At least 99.9% of voxels agree on the scan's own grid (shape and affine). One scan (the phantoms' test
    image): the child process, MONAI without the package, is the point, not the number of cases."""
    scans = phantom_dir / "imagesTs"
    result = monai_bundle("run", "--config_file", "configs/inference.json", "--dataset_dir", str(scans),
                          "--output_dir", str(tmp_path / "bundle_masks"), cwd=bundle)
    assert result.returncode == 0, result.stderr[-3000:]
    from_bundle = _masks(tmp_path / "bundle_masks")
    from_test_py = _masks(_infer(tmp_path, "test_py_masks", "--pretrained_dir", str(checkpoint.parent),
                                 "--pretrained_model_name", checkpoint.name, "--input", str(scans)))
    assert sorted(from_bundle) == sorted(from_test_py) == sorted(p.name.replace(".nii.gz", "_seg.nii.gz")
                                                                 for p in scans.glob("*.nii.gz"))
    for name, ours in from_test_py.items():
        theirs = from_bundle[name]
        assert theirs.shape == ours.shape and np.allclose(theirs.affine, ours.affine, atol=1e-4)
        a, b = np.asarray(theirs.dataobj), np.asarray(ours.dataobj)
        assert a.dtype == np.uint8 and len(np.unique(b)) > 3  # not a constant mask, which would agree trivially
        assert (a == b).mean() >= 0.999, f"{name}: {(a == b).mean():.5f} of voxels agree"


def _minimal_schema(path: Path) -> Path:
    """A JSON schema of what MONAI's bundle specification calls mandatory: MONAI's metadata template's keys and,
    for each input and output, the tensor format keys (the zoo's schema cannot be downloaded here)."""
    tensor = {"type": "object", "required": list(MANDATORY_TENSOR_FORMAT)}
    tensors = {"type": "object", "minProperties": 1, "additionalProperties": tensor}
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "required": ["schema", *DEFAULT_METADATA],
              "properties": {"network_data_format": {"type": "object", "required": ["inputs", "outputs"],
                                                     "properties": {"inputs": tensors, "outputs": tensors}}}}
    path.write_text(json.dumps(schema))
    return path


def test_verify_metadata_passes_and_fails_without_a_mandatory_key(bundle, tmp_path, caplog):
    """MONAI's own check, in this process: it reads only the JSON files (the metadata and, where the file exists,
    the schema instead of downloading it), so MONAI alone and MONAI here judge them alike."""
    metadata = bundle / "configs" / "metadata.json"
    assert json.loads(metadata.read_text())["schema"] == METADATA_SCHEMA
    schema = _minimal_schema(tmp_path / "schema.json")
    # MONAI's logger need not propagate to the root logger (it depends on what configured it first in this process):
    # caplog's handler goes on it directly.
    monai_logger = logging.getLogger("monai.bundle.scripts")
    monai_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="monai.bundle.scripts"):
            verify_metadata(meta_file=str(metadata), filepath=str(schema))
    finally:
        monai_logger.removeHandler(caplog.handler)
    assert "metadata is verified with no error" in caplog.text
    broken = json.loads(metadata.read_text())
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


def test_test_py_runs_the_exported_bundle_as_the_checkpoint(bundle, checkpoint, phantom_dir, tmp_path, capsys):
    """``--pretrained BUNDLE`` takes the architecture and preprocessing from the bundle: the masks are identical."""
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    bundled = _masks(_infer(tmp_path, "from_bundle", "--pretrained", str(bundle), "--input", str(scan)))
    assert "pretrained weights: the MONAI bundle" in capsys.readouterr().out
    direct = _masks(_infer(tmp_path, "from_checkpoint", "--pretrained_dir", str(checkpoint.parent),
                           "--pretrained_model_name", checkpoint.name, "--input", str(scan)))
    (name, a), = bundled.items()
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(direct[name].dataobj))


@pytest.mark.parametrize("case", ["exists", "not_a_bundle", "out_and_bundle", "deeper_vit", "picture_model"])
def test_export_refusals_are_one_line_and_write_nothing(case, checkpoint, tmp_path, capsys):
    folder, source, extra = tmp_path / "bundle", checkpoint, []
    if case in ("exists", "not_a_bundle"):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
        extra = ["--overwrite"] if case == "not_a_bundle" else []
    elif case == "out_and_bundle":
        extra = ["--out", str(tmp_path / "model.ts")]
    else:
        model = {"num_layers": 24} if case == "deeper_vit" else {"spatial_dims": 2, "in_channels": 3, "roi_x": 64,
                                                                  "roi_y": 64}
        source = seeded_checkpoint(tmp_path / "run" / "model.pt", tiny_config(model=model))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["export", "--checkpoint", str(source), "--bundle", str(folder), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert {"exists": "pass --overwrite", "not_a_bundle": "is not a MONAI bundle", "out_and_bundle": "one of them",
            "deeper_vit": "not MONAI's UNETR", "picture_model": "2D models"}[case] in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


ZOO_UNETR = {"_target_": "UNETR", "in_channels": 1, "out_channels": 14, "img_size": "@roi", "feature_size": 8,
             "hidden_size": 96, "mlp_dim": 192, "num_heads": 4, "norm_name": "instance", "res_block": True}


def _zoo_bundle(folder: Path, network_def: dict, seed: int = 3) -> Path:
    """A bundle as the model zoo writes them: references (@roi), MONAI's defaults left out, its own
    preprocessing values, and models/model.pt saved from MONAI's UNETR (proj_type conv: MONAI's default)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"image_key": "image", "roi": [32, 32, 32], "network_def": network_def,
              "preprocessing": {"_target_": "Compose", "transforms": [
                  {"_target_": "LoadImaged", "keys": "@image_key"},
                  {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                  {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [6.0, 6.0, 5.0], "mode": "bilinear"},
                  {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -100, "a_max": 200,
                   "b_min": 0.0, "b_max": 1.0, "clip": True}]}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    arguments = {k: (config["roi"] if v == "@roi" else v) for k, v in ZOO_UNETR.items() if k != "_target_"}
    torch.save(UNETR(**arguments).state_dict(), folder / "models" / "model.pt")
    return folder


def test_a_zoo_unetr_bundle_segments_with_its_own_architecture_and_preprocessing(phantom_dir, tmp_path):
    zoo = _zoo_bundle(tmp_path / "zoo_unetr", ZOO_UNETR)
    values = read_bundle(zoo).values
    assert values["model"] | {"roi_x": 32, "pos_embed": "conv", "conv_block": True, "out_channels": 14} == \
        values["model"]  # MONAI's defaults for what the network_def leaves out, the reference resolved
    assert values["data"] == {"axcodes": "RAS", "space_x": 6.0, "space_y": 6.0, "space_z": 5.0, "a_min": -100,
                              "a_max": 200, "b_min": 0.0, "b_max": 1.0}
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    bundled = _masks(_infer(tmp_path, "bundled", "--pretrained", str(zoo), "--input", str(scan)))
    spelled_out = ["--pretrained_dir", str(zoo / "models"), "--pretrained_model_name", "model.pt", "--config",
                   "tiny.yaml", "--pos_embed", "conv", "--space_x", "6", "--space_y", "6", "--space_z", "5",
                   "--a_min", "-100", "--a_max", "200", "--input", str(scan)]
    direct = _masks(_infer(tmp_path, "direct", *spelled_out))
    (name, a), = bundled.items()
    assert len(np.unique(np.asarray(a.dataobj))) > 3
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(direct[name].dataobj))


def test_training_finetunes_from_a_zoo_unetr_bundle(phantom_dir, tmp_path, capsys):
    """The run starts from the bundle's weights: with a learning rate of 1e-9 one step leaves them as they were."""
    zoo = _zoo_bundle(tmp_path / "zoo_unetr", ZOO_UNETR)
    run = tmp_path / "finetuned"
    argv = ["train", "--config", "tiny.yaml", "--data_dir", str(phantom_dir), "--json_list", "dataset.json",
            "--logdir", str(run), "--pretrained", str(zoo), "--max_steps", "1", "--optim_lr", "1e-9",
            "--precision", "fp32", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert f"loaded pretrained weights from {zoo / 'models' / 'model.pt'}" in capsys.readouterr().out
    trained = load_checkpoint(run / "model_final.pt")
    assert trained["config"]["model"]["pos_embed"] == "conv" and trained["config"]["data"]["space_z"] == 5.0
    start = torch.load(zoo / "models" / "model.pt", weights_only=True)
    assert max(float((trained["state_dict"][k] - v).abs().max()) for k, v in start.items()) < 1e-6


@pytest.mark.parametrize("network_def, message", [
    ({"_target_": "BasicUNet", "in_channels": 1, "out_channels": 14}, "'BasicUNet', a network btcv-unetr does not "
                                                                       "build"),
    ({"_target_": "SwinUNETR", "in_channels": 1, "out_channels": 14}, "its inferer::roi_size is None"),
    ({**ZOO_UNETR, "feature_size": "$8 * 2"}, "network_def::feature_size is the expression '$8 * 2'"),
    ({**ZOO_UNETR, "img_size": "@patch"}, "the reference @patch names nothing"),
])
def test_a_bundle_we_cannot_build_is_refused_in_one_line(network_def, message, phantom_dir, tmp_path,
                                                                   capsys):
    zoo = _zoo_bundle(tmp_path / "zoo", network_def)
    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    assert cli.main(["infer", "--pretrained", str(zoo), "--input", str(scan), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()
