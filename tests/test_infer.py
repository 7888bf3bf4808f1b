import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.errors import UserError
from btcv_unetr.files import folder_lock
from btcv_unetr.inference.batch import run_inference
from btcv_unetr.inference.evaluate import case_metrics, evaluate_folders, summarise
from btcv_unetr.inference.export import export
from btcv_unetr.inference.inversion import probabilities_to_scan
from btcv_unetr.inference.predictor import Predictor, keep_largest_components
from btcv_unetr.model.build import build_model
from btcv_unetr.synthetic.phantoms import generate_case


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny UNETR state dict (random weights: geometry does not need accuracy)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(build_model(_config(folder).model).state_dict(), folder / "w.pth")
    return folder


def _config(weights_dir, **infer):
    layers = [read_yaml(CONFIG_DIR / "tiny.yaml"),
              {"train": {"pretrained_dir": str(weights_dir), "pretrained_model_name": "w.pth"},
               "infer": {"overlay": False, "hd95": False, **infer}}]
    return build_config(layers)


def _phantom(path: Path, index: int, size: int = 48) -> Path:
    case = generate_case(seed=11, index=index, size=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(case.image, path)
    return path


def _lps_anisotropic(path: Path, index: int = 1) -> Path:
    """A phantom stored left-posterior-superior with 0.9 x 0.8 x 2.5 mm voxels and an offset origin."""
    data = np.asarray(generate_case(seed=11, index=index, size=48).image.dataobj)
    affine = np.diag([-0.9, -0.8, 2.5, 1.0])
    affine[:3, 3] = (40.0, 30.0, -60.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _assert_same_geometry(mask: sitk.Image, source: sitk.Image) -> None:
    assert mask.GetSize() == source.GetSize()
    assert np.allclose(mask.GetSpacing(), source.GetSpacing(), atol=1e-5)
    assert np.allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert np.allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)


def test_masks_have_the_input_geometry_lps_and_anisotropic(weights, tmp_path):
    folder = tmp_path / "in"
    paths = [_phantom(folder / f"scan{i}.nii.gz", i) for i in (1, 2)]
    paths.append(_lps_anisotropic(folder / "lps.nii.gz"))
    assert nib.aff2axcodes(nib.load(paths[-1]).affine) == ("L", "P", "S")
    run_inference(_config(weights, input=str(folder), output_dir=str(tmp_path / "out")))
    for path in paths:
        source = nib.load(path)
        mask = nib.load(tmp_path / "out" / path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8
        assert np.allclose(mask.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= set(range(14))
        _assert_same_geometry(sitk.ReadImage(str(mask.get_filename())), sitk.ReadImage(str(path)))
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_nrrd_and_mha_inputs_give_masks_in_their_own_format_and_geometry(weights, tmp_path):
    """The same LPS, anisotropic scan as NIfTI, NRRD and MHA: three masks with the same voxels, each in
    its input's format and with the geometry SimpleITK reads from that input."""
    folder = tmp_path / "in"
    nifti = _lps_anisotropic(folder / "scan.nii.gz")
    inputs = {"as_nrrd": folder / "as_nrrd.nrrd", "as_mha": folder / "as_mha.mha"}
    for path in inputs.values():
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
    run_inference(_config(weights, input=str(folder), output_dir=str(tmp_path / "out")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "scan_seg.nii.gz")))
    assert len(np.unique(reference)) > 1  # random weights still give several classes: voxel order is tested
    for name, path in inputs.items():
        written = tmp_path / "out" / f"{name}_seg{path.suffix}"
        mask = sitk.ReadImage(str(written))
        _assert_same_geometry(mask, sitk.ReadImage(str(path)))
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(mask), reference)


def test_inversion_puts_labels_back_where_they_were(weights, tmp_path):
    """Preprocess a label map as if it were the image (identity intensity window), map its one-hot
    encoding back as if it were the predicted probabilities: every label lands where it was, through
    orientation, spacing and crop."""
    case = generate_case(seed=3, index=1, size=64)
    nib.save(case.label, tmp_path / "lab.nii.gz")
    config = build_config([_config(weights).to_dict(), {"data": {"a_min": 0.0, "a_max": 13.0, "b_min": 0.0,
                                                                 "b_max": 13.0}}])
    predictor = Predictor(config)
    prepared = predictor.transform({"image": str(tmp_path / "lab.nii.gz")})["image"]
    assert prepared.shape[1:] != case.label.shape  # resampled, reoriented and cropped
    one_hot = torch.nn.functional.one_hot(torch.round(prepared[0].as_tensor()).long(), 14).permute(3, 0, 1, 2)
    restored, _ = probabilities_to_scan(one_hot.float(), prepared)
    original = np.asarray(case.label.dataobj)
    assert restored.shape == original.shape
    assert (restored == original).mean() > 0.97
    # The organs, not just background: through the tiny config's 6 mm grid their boundary voxels (a
    # large share of them) may change, a misplaced or flipped map keeps few.
    assert (restored[original > 0] == original[original > 0]).mean() > 0.6


def test_input_kinds_file_folder_dicom(weights, tmp_path):
    scan = _phantom(tmp_path / "one.nii.gz", 4)
    run_inference(_config(weights, input=str(scan), output_dir=str(tmp_path / "a")))
    assert (tmp_path / "a/one_seg.nii.gz").is_file()

    dicom = tmp_path / "series"
    dicom.mkdir()
    source = sitk.ReadImage(str(scan))
    _write_dicom_series(sitk.Cast(source, sitk.sitkInt16), dicom)
    run_inference(_config(weights, input=str(dicom), output_dir=str(tmp_path / "b")))
    mask = sitk.ReadImage(str(tmp_path / "b/series_seg.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
    series = reader.Execute()
    assert mask.GetSize() == series.GetSize()
    assert np.allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
    assert np.allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-4)
    assert np.allclose(mask.GetDirection(), series.GetDirection(), atol=1e-6)


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                  direction[1], direction[4], direction[7]))
    for index in range(image.GetDepth()):
        slice_ = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0037": orientation,
                "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0013": str(index + 1),
                "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{index + 1}",
                "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:04d}.dcm"))
        writer.Execute(slice_)


def test_tta_and_probabilities_have_the_right_shapes(weights, tmp_path):
    scan = _phantom(tmp_path / "s.nii.gz", 5)
    run_inference(_config(weights, input=str(scan), output_dir=str(tmp_path / "o"), tta=True,
                          save_probabilities=True))
    probabilities = np.load(tmp_path / "o/s_probabilities.npz")["probabilities"]
    assert probabilities.shape == (14, *nib.load(scan).shape) and probabilities.dtype == np.float16
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=0.02)
    labels = np.asarray(nib.load(tmp_path / "o/s_seg.nii.gz").dataobj)
    assert (labels == probabilities.argmax(0)).mean() > 0.999


def test_perfect_prediction_scores_one_and_absent_organs_are_left_out():
    label = np.zeros((20, 20, 10), np.int16)
    label[2:8, 2:8, 2:6] = 6
    label[12:16, 12:16, 3:7] = 1
    spacing = nib.Nifti1Image(label, np.diag([1.0, 1.0, 2.5, 1.0])).header.get_zooms()  # numpy float32s
    result = case_metrics("c", label.copy(), label, spacing, 14, distances=True)
    assert result.dice[5] == 1.0 and result.dice[0] == 1.0
    assert result.hd95[5] == 0.0 and result.nsd[5] == 1.0
    assert math.isnan(result.dice[1])  # right kidney absent from the label
    missed = label.copy()
    missed[missed == 1] = 0
    worse = case_metrics("d", missed, label, (1.0, 1.0, 2.5), 14)
    assert worse.dice[0] == 0.0 and worse.hd95[0] == math.inf and worse.nsd[0] == 0.0
    summary = summarise([result, worse], 14)
    assert summary["organs"]["spleen"]["dice"] == 0.5 and summary["organs"]["liver"]["dice"] == 1.0
    assert math.isnan(summary["organs"]["right kidney"]["dice"])
    assert summary["mean_organ_dice"] == 0.75


def test_evaluate_matches_files_by_case_name(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "lab").mkdir()
    case = generate_case(seed=0, index=1, size=32)
    nib.save(case.label, tmp_path / "lab/label0007.nii.gz")
    nib.save(case.label, tmp_path / "pred/img0007_seg.nii.gz")
    results = evaluate_folders(tmp_path / "pred", tmp_path / "lab", 14, distances=False)
    assert [r.case for r in results] == ["img0007"]
    assert all(d == 1.0 for d in results[0].dice if not math.isnan(d))
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "lab"), "--no_hd95"]) == 0
    assert "mean organ Dice" in capsys.readouterr().out
    assert json.loads((tmp_path / "pred/summary.json").read_text())["mean_organ_dice"] == 1.0
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "x.nii.gz",
                                                                   "label": "lab/label0007.nii.gz"}]}))
    from_datalist = evaluate_folders(tmp_path / "pred", tmp_path / "list.json", 14, distances=False)
    assert [r.dice for r in from_datalist] == [r.dice for r in results]


def test_torchscript_export_equals_eager_and_loads_for_inference(weights, tmp_path):
    model = build_model(_config(weights).model).eval()
    model.load_state_dict(torch.load(weights / "w.pth", weights_only=True))
    example = torch.rand(2, 1, 32, 32, 32)
    export(model, example[:1], "torchscript", tmp_path / "unetr.pt")
    scripted = torch.jit.load(str(tmp_path / "unetr.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(example), model(example), atol=1e-5)
    scan = _phantom(tmp_path / "t.nii.gz", 6)
    config = _config(tmp_path, input=str(scan), output_dir=str(tmp_path / "o"), saved_checkpoint="torchscript")
    config = build_config([config.to_dict(), {"train": {"pretrained_model_name": "unetr.pt"}}])
    run_inference(config)
    assert (tmp_path / "o/t_seg.nii.gz").is_file()


def _cli(weights, *flags) -> int:
    """``test.py`` (``btcv-unetr infer``) in this process: its exit status; what it printed is in capsys."""
    return cli.main(["infer", "--config", "tiny.yaml", "--pretrained_dir", str(weights), "--pretrained_model_name",
                     "w.pth", "--no-overlay", *flags])


# A 2D image and weights of another architecture are cases of the fault corpus (tests/test_fault_corpus.py:
# infer_2d_input, infer_other_architecture), with their whole messages.
@pytest.mark.parametrize("setup, message", [
    ("missing", "error: input not found: {tmp}/nope.nii.gz"),
    ("empty", "error: {tmp}/empty: no image files (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr, .png, .jpg, .jpeg, .bmp) and no DICOM series in this folder"),
    ("four_d", "error: {tmp}/four_d.nii.gz: image is 4D with shape (8, 8, 8, 2), expected a 3D volume"),
    ("corrupt", "error: {tmp}/corrupt.nii.gz: unreadable image ("),
    ("unwritable", "error: output folder {tmp}/file.txt/out cannot be written"),
])
def test_bad_input_gives_one_line_and_no_partial_output(weights, tmp_path, setup, message, capsys):
    target, extra = tmp_path / "nope.nii.gz", ["--output_dir", str(tmp_path / "out")]
    if setup == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif setup == "four_d":
        target = tmp_path / f"{setup}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), target)
    elif setup == "corrupt":
        target = tmp_path / "corrupt.nii.gz"
        target.write_bytes(b"\x1f\x8b not really gzip")
    elif setup == "unwritable":
        target = _phantom(tmp_path / "ok.nii.gz", 1)
        (tmp_path / "file.txt").write_text("x")
        extra = ["--output_dir", str(tmp_path / "file.txt/out")]
    capsys.readouterr()
    assert _cli(weights, "--input", str(target), *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


def test_existing_outputs_are_kept_without_overwrite(weights, tmp_path, capsys):
    scan = _phantom(tmp_path / "k.nii.gz", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/k_seg.nii.gz").write_bytes(b"previous")
    assert _cli(weights, "--input", str(scan), "--output_dir", str(tmp_path / "out")) == 0
    assert "exists, skipped (--overwrite replaces it)" in capsys.readouterr().out
    assert (tmp_path / "out/k_seg.nii.gz").read_bytes() == b"previous"
    assert _cli(weights, "--input", str(scan), "--output_dir", str(tmp_path / "out"), "--overwrite") == 0
    assert nib.load(tmp_path / "out/k_seg.nii.gz").shape == nib.load(scan).shape


def test_onnx_export_matches_eager_with_onnxruntime(weights, tmp_path):
    pytest.importorskip("onnx")  # the 'onnx' extra
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build_model(_config(weights).model).eval()
    model.load_state_dict(torch.load(weights / "w.pth", weights_only=True))
    example = torch.rand(1, 1, 32, 32, 32)
    export(model, example, "onnx", tmp_path / "unetr.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "unetr.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.rand(2, 1, 32, 32, 32)
    (logits,) = session.run(None, {"image": batch.numpy()})
    with torch.no_grad():
        assert np.allclose(logits, model(batch).numpy(), atol=1e-4)


def test_largest_component_keeps_one_blob_per_organ():
    labels = np.zeros((30, 30, 10), np.uint8)
    labels[2:12, 2:12, 2:8] = 6
    labels[20:22, 20:22, 4:5] = 6     # a stray liver island
    labels[15:18, 2:5, 2:5] = 1
    kept = keep_largest_components(labels, 14)
    assert kept.dtype == np.uint8 and int((kept == 6).sum()) == 600 and kept[21, 21, 4] == 0
    assert int((kept == 1).sum()) == 27


def test_one_bad_file_does_not_stop_a_folder_and_a_rerun_does_only_what_is_missing(weights, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    good = [_phantom(folder / f"scan{i}.nii.gz", i) for i in (1, 2)]
    truncated = folder / "broken.nii.gz"
    truncated.write_bytes(good[0].read_bytes()[:3000])
    config = _config(weights, input=str(folder), output_dir=str(out))
    with pytest.raises(UserError, match=r"^1 of 3 case\(s\) failed"):
        run_inference(config)
    assert "broken.nii.gz: cannot be read" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["scan1_seg.nii.gz", "scan2_seg.nii.gz"]
    assert not list(out.glob(".*tmp*"))

    # An interrupted run left a stale temporary and no mask for scan2: the rerun segments scan2 only.
    truncated.unlink()
    (out / "scan2_seg.nii.gz").unlink()
    (out / ".scan2_seg.nii.gz.abc123.tmp.nii.gz").write_bytes(b"half")
    written = (out / "scan1_seg.nii.gz").stat().st_mtime_ns
    run_inference(config)
    printed = capsys.readouterr().out
    assert "scan1: " in printed and "exists, skipped" in printed
    assert (out / "scan1_seg.nii.gz").stat().st_mtime_ns == written
    assert (out / "scan2_seg.nii.gz").is_file() and not list(out.glob(".*tmp*"))


def test_inputs_that_would_write_the_same_mask_are_refused(weights, tmp_path):
    first, second = _phantom(tmp_path / "a" / "case.nii.gz", 1), _phantom(tmp_path / "b" / "case.nii.gz", 2)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": [str(first), str(second)]}))
    config = build_config([_config(weights, split="test", output_dir=str(tmp_path / "out")).to_dict(),
                           {"data": {"data_dir": str(tmp_path), "json_list": str(datalist)}}])
    with pytest.raises(UserError, match="would both write .*case_seg.nii.gz"):
        run_inference(config)
    assert not list((tmp_path / "out").glob("*_seg*"))


def test_an_output_folder_in_use_is_refused(weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "inference"):
        with pytest.raises(UserError, match=r"out is in use by inference \(process \d+\)"):
            run_inference(_config(weights, input=str(_phantom(tmp_path / "x.nii.gz", 1)), output_dir=str(out)))
    assert not list(out.glob("*_seg*"))
