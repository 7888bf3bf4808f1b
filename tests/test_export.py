"""``btcv-unetr export`` from a training checkpoint: the file it writes, its logits, and inference from it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR
from btcv_unetr.io.checkpoint import load_checkpoint
from btcv_unetr.model.build import build_model
from btcv_unetr.testing.checkpoints import seeded_checkpoint

TINY = str(CONFIG_DIR / "tiny.yaml")

# The tests share a checkpoint and its TorchScript export (a trace takes seconds): one process makes them.
pytestmark = pytest.mark.xdist_group("test_export")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint of the tiny model with seeded random weights (agreement needs no accuracy)."""
    return seeded_checkpoint(tmp_path_factory.mktemp("run") / "model_final.pt", tiny_config())


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> dict:
    """``export --format torchscript`` of the checkpoint into an empty folder, once: its exit status, what it
    printed and the file."""
    out = tmp_path_factory.mktemp("exported") / "unetr.pt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = _export(checkpoint, out)
    return {"status": status, "out": out, "printed": printed.getvalue()}


def _checkpoint_model(path: Path) -> torch.nn.Module:
    model = build_model(tiny_config().model)
    model.load_state_dict(load_checkpoint(path)["state_dict"])
    return model.eval()


def _export(checkpoint: Path, out: Path, *flags: str) -> int:
    return cli.main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out), *flags])


def _segment(tmp: Path, weights: Path, scan: Path, name: str, *flags: str) -> np.ndarray:
    out = tmp / name
    # fp32 on both sides: the checkpoint path may otherwise take a stored precision the TorchScript path does not.
    argv = ["infer", "--config", TINY, "--pretrained_dir", str(weights.parent), "--pretrained_model_name",
            weights.name, "--input", str(scan), "--output_dir", str(out), "--precision", "fp32", "--no-overlay",
            "--no_hd95", *flags]
    assert cli.main(argv) == 0
    return np.asarray(nib.load(out / scan.name.replace(".nii.gz", "_seg.nii.gz")).dataobj)


def test_torchscript_export_gives_the_checkpoint_logits_and_the_same_masks(checkpoint, exported, phantom_dir,
                                                                         tmp_path):
    """Exit 0, one file and no temporary beside it, the checkpoint model's float32 logits, and equal masks."""
    out = exported["out"]
    assert exported["status"] == 0
    assert f"wrote torchscript model to {out}" in exported["printed"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["unetr.pt"]

    scripted = torch.jit.load(str(out))
    window = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported, eager = scripted(window), _checkpoint_model(checkpoint)(window)
    assert exported.shape == (1, 14, 32, 32, 32) and exported.dtype == torch.float32
    assert torch.allclose(exported, eager, atol=1e-5)

    scan = next((phantom_dir / "imagesTs").glob("*.nii.gz"))
    from_checkpoint = _segment(tmp_path, checkpoint, scan, "from_checkpoint")
    from_torchscript = _segment(tmp_path, out, scan, "from_torchscript", "--saved_checkpoint", "torchscript")
    assert from_torchscript.shape == nib.load(scan).shape
    assert len(np.unique(from_checkpoint)) > 1  # a constant mask would agree with almost any model
    assert np.array_equal(from_torchscript, from_checkpoint)


def test_a_torchscript_file_is_exported_again_through_the_unetr_built_from_the_flags_over_an_earlier_export(
        checkpoint, exported, tmp_path, capsys):
    """A TorchScript --checkpoint (as the released .pt) is not refused: its weights go into the flags' UNETR. The
    --out holds an earlier export: --overwrite turns it into a loadable TorchScript model, no temporary left."""
    second = tmp_path / "second.pt"
    second.write_bytes(b"an earlier export")
    assert _export(exported["out"], second, "--config", TINY, "--overwrite") == 0
    assert "--resume_jit" not in capsys.readouterr().out
    assert second.read_bytes() != b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second.pt"]
    window = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(second))(window), _checkpoint_model(checkpoint)(window), atol=1e-5)


def test_onnx_export_is_a_valid_model_with_the_checkpoint_logits(checkpoint, tmp_path):
    """--format onnx writes a checked ONNX graph whose logits (onnxruntime, batch 2) are the checkpoint's."""
    onnx = pytest.importorskip("onnx")  # the optional 'onnx' extra
    out = tmp_path / "unetr.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unetr.onnx"]
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["logits"]
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # Batch 2 although the trace saw batch 1: the batch axis is declared dynamic.
    batch = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    (logits,) = session.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        assert logits.shape == (2, 14, 32, 32, 32)
        assert np.allclose(logits, _checkpoint_model(checkpoint)(batch).numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_existing_folder_as_out_is_refused_in_one_line_even_with_overwrite(fmt, checkpoint, tmp_path, capsys):
    """Issue 22: --out FOLDER --overwrite gave an IsADirectoryError traceback; the folder is never replaced."""
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(folder), "--overwrite"]
    assert cli.main(argv) == 2
    name = "unetr.onnx" if fmt == "onnx" else "unetr.pt"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: export: --out {folder} is a folder, and --format {fmt} writes one file: give a file name (such as "
        f"{folder / name}), or use --bundle DIR for a bundle folder"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["exports", "keep.txt"]


def test_overwrite_replaces_an_earlier_bundle_whole_and_leaves_no_temporary(checkpoint, tmp_path):
    """A bundle is a folder: --overwrite swaps a new one in (built beside it, then renamed); files of the old
    one that the new one does not have are gone with it."""
    bundle = tmp_path / "bundle"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--bundle", str(bundle)]) == 0
    (bundle / "docs" / "old_notes.txt").write_text("from the earlier export")
    (bundle / "models" / "model.pt").write_bytes(b"stale weights")
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--bundle", str(bundle), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert not (bundle / "docs" / "old_notes.txt").exists()
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    expected = load_checkpoint(checkpoint)["state_dict"]
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
