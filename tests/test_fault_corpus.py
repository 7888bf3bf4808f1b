"""The fault corpus: every hostile or mistaken input of the command line, each a case that must get one clear line
and a non-zero exit, with nothing half-written and nothing of the user's replaced (issues 18 and 22).

Each case builds its files in a fresh folder and returns the command line (``btcv-unetr`` sub-command
and flags, run in-process) and a fragment of the expected message.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import zlib
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hostile import WritesOnLoad

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.files import folder_lock
from btcv_unetr.model.build import build_model

TINY = str(CONFIG_DIR / "tiny.yaml")
TINY_2D = str(CONFIG_DIR / "tiny2d.yaml")
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _image(path: Path, shape=(40, 40, 24), value=None, affine=AFFINE, dtype=np.int16) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(-200, 300, shape).astype(dtype) if value is None else np.full(shape, value, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _label(path: Path, shape=(40, 40, 24), values=(0, 1, 2), affine=AFFINE, dtype=np.uint8) -> Path:
    data = np.zeros(shape, dtype)
    for index, value in enumerate(values):
        data[index * 4:(index + 1) * 4] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _dataset(tmp: Path, image: Path | None = None, label: Path | None = None, content=None) -> list[str]:
    """A one-case datalist in ``tmp/data``; returns the check-data command for it."""
    data = tmp / "data"
    image = image or _image(data / "img.nii.gz")
    label = label or _label(data / "lab.nii.gz")
    entry = {"image": str(image.relative_to(data) if image.is_relative_to(data) else image),
             "label": str(label.relative_to(data) if label.is_relative_to(data) else label)}
    data.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content if content is not None else
                                                               {"training": [entry], "validation": [entry]})
    (data / "dataset.json").write_text(text)
    return ["check-data", "--data_dir", str(data), "--json_list", "dataset.json"]


def _weights(tmp: Path, **model) -> Path:
    config = build_config([read_yaml(TINY), {"model": model}])
    path = tmp / "w" / "w.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(config.model).state_dict(), path)
    return path


def _infer(tmp: Path, weights: Path, target: Path, *flags: str) -> list[str]:
    return ["infer", "--config", TINY, "--pretrained_dir", str(weights.parent), "--pretrained_model_name",
            weights.name, "--input", str(target), "--output_dir", str(tmp / "out"), "--no-overlay", "--no_hd95",
            *flags]


def _train(tmp: Path, data_dir: Path, *flags: str) -> list[str]:
    return ["train", "--config", TINY, "--data_dir", str(data_dir), "--json_list", "dataset.json",
            "--logdir", str(tmp / "run"), "--max_epochs", "1", *flags]


class Payload:
    """Unpickling this would create a marker file: a checkpoint carrying it must be refused, not run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "executed"))


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    name = b"/data/0"  # the first tensor's storage in torch's zip layout
    start = data.index(name) + 200  # inside the stored bytes, past the zip entry header
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- the cases
# Refusals whose home is a topic file, with their whole lines: files a datalist names that are missing
# (test_checks.py::test_cli_exit_codes_and_output), a mask that fills the disk (test_disk_full.py), an altered
# checkpoint (test_checkpoint.py), resuming into another run's folder (test_train.py).


def check_truncated_gzip(tmp, ctx):
    image = _image(tmp / "data" / "img.nii.gz")
    image.write_bytes(image.read_bytes()[:400])
    return _dataset(tmp, image=image), "img.nii.gz: unreadable or truncated file"


def check_gzip_not_nifti(tmp, ctx):
    image = tmp / "data" / "img.nii.gz"
    image.parent.mkdir(parents=True)
    image.write_bytes(gzip.compress(b"hello, not a NIfTI header" * 20))
    return _dataset(tmp, image=image), "img.nii.gz: unreadable or truncated file"


def check_zero_byte_file(tmp, ctx):
    image = tmp / "data" / "img.nii.gz"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    return _dataset(tmp, image=image), "img.nii.gz: unreadable or truncated file"


def check_2d_image(tmp, ctx):
    return _dataset(tmp, image=_image(tmp / "data" / "img.nii.gz", shape=(40, 40))), "image is 2D"


def check_4d_image(tmp, ctx):
    return _dataset(tmp, image=_image(tmp / "data" / "img.nii.gz", shape=(40, 40, 24, 2))), "image is 4D"


def check_shape_mismatch(tmp, ctx):
    return _dataset(tmp, label=_label(tmp / "data" / "lab.nii.gz", shape=(40, 40, 20))), "label shape (40, 40, 20)"


def check_affine_mismatch(tmp, ctx):
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    return _dataset(tmp, label=_label(tmp / "data" / "lab.nii.gz", affine=shifted)), "affine differs from the image's"


def check_labels_out_of_range(tmp, ctx):
    return _dataset(tmp, label=_label(tmp / "data" / "lab.nii.gz", values=(0, 3, 20))), "label values 20 outside 0..13"


def check_fractional_labels(tmp, ctx):
    label = _label(tmp / "data" / "lab.nii.gz", values=(0, 1.5), dtype=np.float32)
    return _dataset(tmp, label=label), "label values 1.5 outside 0..13"


def check_nan_voxels(tmp, ctx):
    image = _image(tmp / "data" / "img.nii.gz", dtype=np.float32)
    volume = nib.load(image)
    data = np.asarray(volume.dataobj).copy()
    data[0, 0, :5] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), image)
    return _dataset(tmp, image=image), "5 NaN or infinite voxels"


def check_empty_datalist(tmp, ctx):
    return _dataset(tmp, content={}), "datalist has no 'training' entries"


def check_datalist_without_training(tmp, ctx):
    return _dataset(tmp, content={"validation": []}), "datalist has no 'training' entries"


def check_malformed_json(tmp, ctx):
    return _dataset(tmp, content='{"training": [}'), "datalist is not valid JSON"


def check_missing_data_dir(tmp, ctx):
    return ["check-data", "--data_dir", str(tmp / "nowhere")], "data folder " + str(tmp / "nowhere") + " does not exist"


def train_nan_flag(tmp, ctx):
    return _train(tmp, ctx["phantoms"], "--a_min", "nan"), "config key 'a_min': nan is not a finite number"


def train_zero_feature_size(tmp, ctx):
    return _train(tmp, ctx["phantoms"], "--feature_size", "0"), "config key 'feature_size': 0 must be >= 1"


def train_zero_heads(tmp, ctx):
    return _train(tmp, ctx["phantoms"], "--num_heads", "0"), "config key 'num_heads': 0 must be >= 1"


def train_roi_not_multiple_of_patch(tmp, ctx):
    return _train(tmp, ctx["phantoms"], "--roi_x", "40"), \
        "config key 'roi_x': 40 must be a positive multiple of 16 (UNETR's patch size)"


def train_missing_data_dir(tmp, ctx):
    return (["train", "--config", TINY, "--data_dir", str(tmp / "nowhere"), "--logdir", str(tmp / "run")],
            "does not exist (the shipped datalist dataset_0.json names files inside it)")


def train_logdir_is_a_file(tmp, ctx):
    (tmp / "run").write_text("a file")
    return _train(tmp, ctx["phantoms"]), "cannot create the run folder"


def train_logdir_in_use(tmp, ctx):
    (tmp / "run").mkdir()
    ctx["stack"].enter_context(folder_lock(tmp / "run", "a training run"))
    return _train(tmp, ctx["phantoms"]), "run is in use by a training run (process"


def train_logdir_holds_an_earlier_run(tmp, ctx):
    (tmp / "run").mkdir()
    (tmp / "run" / "model.pt").write_bytes(b"the better model")
    ctx["unchanged"] = [tmp / "run" / "model.pt"]
    return _train(tmp, ctx["phantoms"]), "holds an earlier run (model.pt): resume it with --checkpoint"


def train_resume_with_another_optimiser(tmp, ctx):
    return (_train(tmp, ctx["phantoms"], "--checkpoint", str(ctx["checkpoint"]), "--optim_name", "sgd"),
            "saved with --optim_name adamw, this run asks for sgd")


def infer_other_architecture(tmp, ctx):
    weights = _weights(tmp, hidden_size=48, num_heads=4)
    return _infer(tmp, weights, ctx["scan"]), f"{weights}: weights do not match the model built from the flags"


def infer_wrong_in_channels(tmp, ctx):
    return _infer(tmp, ctx["weights"], ctx["scan"], "--in_channels", "2"), "wrong shape (file vs model)"


def infer_truncated_checkpoint(tmp, ctx):
    path = tmp / "w" / "w.pth"
    path.parent.mkdir()
    path.write_bytes(ctx["weights"].read_bytes()[:5000])
    return _infer(tmp, path, ctx["scan"]), "not a readable PyTorch checkpoint"


def _payload_checkpoint(tmp, ctx, write) -> Path:
    """A checkpoint whose unpickling would create a marker file (which must stay absent)."""
    path = tmp / "w" / "w.pth"
    path.parent.mkdir()
    ctx["absent"] = [tmp / "marker"]
    write({"state_dict": Payload(str(tmp / "marker"))}, path)
    return path


def infer_pickle_payload(tmp, ctx):
    path = _payload_checkpoint(tmp, ctx, lambda obj, path: path.write_bytes(pickle.dumps(obj)))
    return _infer(tmp, path, ctx["scan"]), "not a readable PyTorch checkpoint"


def infer_torch_pickle_payload(tmp, ctx):
    path = _payload_checkpoint(tmp, ctx, torch.save)
    return _infer(tmp, path, ctx["scan"]), "refused to load, the file needs arbitrary code to unpickle"


def infer_torchscript_as_checkpoint(tmp, ctx):
    return _infer(tmp, ctx["torchscript"], ctx["scan"]), "this is a TorchScript file: use --resume_jit"


def infer_checkpoint_as_torchscript(tmp, ctx):
    return (_infer(tmp, ctx["weights"], ctx["scan"], "--saved_checkpoint", "torchscript"),
            "w.pth: not a TorchScript file")


def infer_torchscript_of_another_module(tmp, ctx):
    path = tmp / "w" / "other.pt"
    path.parent.mkdir()
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    return (_infer(tmp, path, ctx["scan"], "--saved_checkpoint", "torchscript"),
            "weights do not match the model built from the flags")


def infer_corrupted_weights(tmp, ctx):
    path = tmp / "w" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(ctx["checkpoint"].read_bytes())
    _flip_a_weight_byte(path)
    return _infer(tmp, path, ctx["scan"]), "do not match the checksum stored with them: the file is corrupt"


def infer_overlap_out_of_range(tmp, ctx):
    return _infer(tmp, ctx["weights"], ctx["scan"], "--infer_overlap", "1.0"), "'infer_overlap': 1.0 must be in [0, 1)"


def infer_nan_overlap(tmp, ctx):
    return _infer(tmp, ctx["weights"], ctx["scan"], "--infer_overlap", "nan"), "'infer_overlap': nan is not a finite"


def infer_output_dir_is_a_file(tmp, ctx):
    (tmp / "out").write_text("a file")
    return _infer(tmp, ctx["weights"], ctx["scan"]), "cannot be written"


def infer_truncated_input(tmp, ctx):
    scan = tmp / "scan.nii.gz"
    scan.write_bytes(ctx["scan"].read_bytes()[:3000])
    return _infer(tmp, ctx["weights"], scan), "scan.nii.gz: cannot be read"


def infer_all_nan_input(tmp, ctx):
    return _infer(tmp, ctx["weights"], _image(tmp / "nan.nii.gz", value=np.nan, dtype=np.float32)), \
        "nan.nii.gz: the image has 38400 NaN or infinite voxels (38400 NaN, 0 infinite)"


def infer_2d_input(tmp, ctx):
    return (_infer(tmp, ctx["weights"], _image(tmp / "flat.nii.gz", shape=(40, 40))),
            f"{tmp}/flat.nii.gz: image is 2D with shape (40, 40), expected a 3D volume")


def infer_not_an_image(tmp, ctx):
    (tmp / "notes.txt").write_text("hello")
    return _infer(tmp, ctx["weights"], tmp / "notes.txt"), "notes.txt: not an accepted image format"


def export_onto_an_existing_file(tmp, ctx):
    out = tmp / "exported.pt"
    out.write_bytes(b"keep me")
    ctx["unchanged"] = [out]
    return ["export", "--checkpoint", str(ctx["checkpoint"]), "--out", str(out)], "exported.pt exists: pass --overwrite"


def export_onto_its_own_checkpoint(tmp, ctx):
    return (["export", "--checkpoint", str(ctx["checkpoint"]), "--out", str(ctx["checkpoint"]), "--overwrite"],
            "is the checkpoint being exported")


def evaluate_missing_predictions(tmp, ctx):
    return ["evaluate", "--pred", str(tmp / "nothing"), "--label", str(tmp)], "not a folder: "


# ---------------------------------------------------------------- issue 22: bounds, bit depths, non-finite voxels, names


def _png(path: Path, width: int, height: int, rows: int | None = None, channels: int = 3, corrupt: bool = False) -> Path:
    """An 8-bit PNG whose header declares ``width`` x ``height``, with ``rows`` rows of (zero) data (all by default);
    ``corrupt``: its compressed data garbled."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")

    colour = {1: 0, 3: 2}[channels]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    pixels = zlib.compress(b"".join(b"\0" + bytes(width * channels) for _ in range(height if rows is None else rows)))
    if corrupt:
        pixels = pixels[:2] + bytes(b ^ 0x5A for b in pixels[2:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def _infer_2d(tmp: Path, target: Path, *flags: str) -> list[str]:
    config = build_config([read_yaml(TINY_2D)])
    weights = tmp / "w2d" / "w.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(config.model).state_dict(), weights)
    return ["infer", "--config", TINY_2D, "--pretrained_dir", str(weights.parent), "--pretrained_model_name",
            weights.name, "--input", str(target), "--output_dir", str(tmp / "out"), "--no-overlay", "--no_hd95", *flags]


def _no_decoding(ctx, name: str) -> None:
    """Picture ``name``, refused for its size, must be refused from its header: decoding it fails the test."""
    read = sitk.ReadImage

    def guarded(path, *args, **kwargs):
        if Path(str(path)).name == name:
            raise AssertionError(f"{name} was decoded")
        return read(path, *args, **kwargs)

    ctx["stack"].enter_context(mock.patch("SimpleITK.ReadImage", side_effect=guarded))


def _float_scan(path: Path, shape=(40, 40, 24), body=100.0, air=-1000.0) -> tuple[Path, np.ndarray]:
    """A float32 scan: air around a body box (voxels [10:30, 10:30, 4:20]); returns it and its voxels to edit."""
    data = np.full(shape, air, np.float32)
    data[10:30, 10:30, 4:20] = body
    return path, data


def _saved(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def check_picture_header_over_max_pixels(tmp, ctx):
    _no_decoding(ctx, "big.png")
    image = _png(tmp / "data" / "big.png", 20000, 20000, rows=2, channels=1)
    label = _png(tmp / "data" / "mask.png", 8, 8, channels=1)
    return (_dataset(tmp, image=image, label=label) + ["--spatial_dims", "2", "--in_channels", "1"],
            "big.png: 20000 x 20000 pixels (400.0 megapixels) exceed --max_pixels 64 megapixels")


def infer_picture_header_over_max_pixels(tmp, ctx):
    _no_decoding(ctx, "big.png")
    image = _png(tmp / "big.png", 20000, 20000, rows=2)
    ctx["absent"] = [tmp / "out" / "big_seg.png"]
    return _infer_2d(tmp, image), "big.png: 20000 x 20000 pixels (400.0 megapixels) exceed --max_pixels 64 megapixels"


def infer_picture_over_the_max_pixels_flag(tmp, ctx):
    _no_decoding(ctx, "photo.png")
    image = _png(tmp / "photo.png", 64, 48)
    ctx["absent"] = [tmp / "out" / "photo_seg.png"]
    return (_infer_2d(tmp, image, "--max_pixels", "3000"),
            "photo.png: 64 x 48 pixels (0.0 megapixels) exceed --max_pixels 0.003 megapixels")


def infer_corrupt_png(tmp, ctx):
    image = _png(tmp / "broken.png", 64, 48, corrupt=True)
    ctx["absent"] = [tmp / "out" / "broken_seg.png"]
    ctx["line_ends"] = f"Error while reading file: {image})"
    return _infer_2d(tmp, image), "broken.png: unreadable image (RuntimeError: PNGImageIO: Error while reading file"


def check_corrupt_png(tmp, ctx):
    image = _png(tmp / "data" / "broken.png", 64, 48, channels=1, corrupt=True)
    label = _png(tmp / "data" / "mask.png", 64, 48, channels=1)
    return (_dataset(tmp, image=image, label=label) + ["--spatial_dims", "2", "--in_channels", "1"],
            f"broken.png: unreadable or truncated file (RuntimeError: PNGImageIO: Error while reading file: {image})\n")


def infer_overlap_plans_too_many_windows(tmp, ctx):
    # 96 x 40 x 32 voxels of 6 mm (the tiny model's grid), ROI 32: 10 windows at overlap 0.5, 585 at 0.99
    # (a 1-voxel stride); 0.87 is the largest overlap within 8 times 10 (51 windows; 0.88 plans 92).
    scan = _image(tmp / "long.nii.gz", shape=(96, 40, 32), value=100, affine=np.diag([6.0, 6.0, 6.0, 1.0]))
    ctx["absent"] = [tmp / "out" / "long_seg.nii.gz"]
    return (_infer(tmp, ctx["weights"], scan, "--infer_overlap", "0.99"),
            ("long.nii.gz: --infer_overlap 0.99 plans 585 windows, 58.5 times the 10 of overlap 0.5, over "
             "--max_windows_factor 8: use --infer_overlap 0.87 or less"))


def infer_max_windows_factor_below_one(tmp, ctx):
    return (_infer(tmp, ctx["weights"], ctx["scan"], "--max_windows_factor", "0.5"),
            "config key 'max_windows_factor': 0.5 must be >= 1")


def check_duplicate_entries(tmp, ctx):
    data = tmp / "data"
    _image(data / "img.nii.gz"), _label(data / "lab.nii.gz")
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    other = {"image": "./sub/../img.nii.gz", "label": "lab.nii.gz"}  # the same file, spelled otherwise
    argv = _dataset(tmp, content={"training": [entry] * 3 + [other], "validation": [entry]})
    return argv, f"{data / 'img.nii.gz'}: listed 4 times in 'training': list each case once"


def train_duplicate_entries(tmp, ctx):
    # Refused before any case is cached: building the cache fails the test.
    ctx["stack"].enter_context(mock.patch("btcv_unetr.data.datalist.CacheDataset",
                                          side_effect=AssertionError("cached before the refusal")))
    data = tmp / "data"
    _image(data / "img.nii.gz"), _label(data / "lab.nii.gz")
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    _dataset(tmp, content={"training": [entry] * 10, "validation": [entry]})
    return _train(tmp, data), "img.nii.gz: listed 10 times in 'training': list each case once (training data)"


def check_infinite_voxels_in_the_body(tmp, ctx):
    path, data = _float_scan(tmp / "data" / "img.nii.gz")
    data[12:22, 12:22, 6:10] = np.inf  # 400 voxels
    return _dataset(tmp, image=_saved(path, data)), "img.nii.gz: 400 NaN or infinite voxels (0 NaN, 400 infinite)"


def check_negative_infinite_and_nan_voxels(tmp, ctx):
    path, data = _float_scan(tmp / "data" / "img.nii.gz")
    data[0, 0, :3] = -np.inf
    data[1, 1, :2] = np.nan
    return _dataset(tmp, image=_saved(path, data)), "img.nii.gz: 5 NaN or infinite voxels (2 NaN, 3 infinite)"


def infer_infinite_voxels_in_the_body(tmp, ctx):
    # The intensity window would clip them to its top: the body's mask would change without a word.
    path, data = _float_scan(tmp / "inf.nii.gz")
    data[12:22, 12:22, 6:10] = np.inf
    return (_infer(tmp, ctx["weights"], _saved(path, data)),
            "inf.nii.gz: the image has 400 NaN or infinite voxels (0 NaN, 400 infinite)")


def infer_nan_outside_the_body(tmp, ctx):
    # Outside the body box: the crop to the body would drop them before any check after it.
    path, data = _float_scan(tmp / "nan_air.nii.gz")
    data[0:2, 0:2, 0] = np.nan
    return (_infer(tmp, ctx["weights"], _saved(path, data)),
            "nan_air.nii.gz: the image has 4 NaN or infinite voxels (4 NaN, 0 infinite)")


def train_infinite_voxels(tmp, ctx):
    path, data = _float_scan(tmp / "data" / "img.nii.gz")
    data[12:14, 12:14, 6] = -np.inf
    _dataset(tmp, image=_saved(path, data))
    return _train(tmp, tmp / "data"), "img.nii.gz: 4 NaN or infinite voxels (0 NaN, 4 infinite)"


FORGED = "error: all fine"


def check_file_name_with_a_newline(tmp, ctx):
    ctx["forged"] = FORGED
    name = f"img\n{FORGED}.nii.gz"
    return _dataset(tmp, image=tmp / "data" / name), f"img\\n{FORGED}.nii.gz: file not found"


def infer_file_name_with_a_newline(tmp, ctx):
    ctx["forged"] = FORGED
    return _infer(tmp, ctx["weights"], tmp / f"scan\n{FORGED}.nii.gz"), f"scan\\n{FORGED}.nii.gz"


def infer_file_name_with_a_carriage_return_and_an_escape(tmp, ctx):
    scan = _image(tmp / "in" / "a\rb\x1b[2K.nii.gz", shape=(40, 40, 2), dtype=np.float32, value=np.inf)
    return _infer(tmp, ctx["weights"], scan), "a\\rb\\x1b[2K.nii.gz: the image has 3200 NaN or infinite voxels"


# Unusual but valid scans: segmented, with a mask of the scan's own shape.
VALID_SHAPES = {"all_constant": ((40, 40, 24), -1000), "one_slice": ((40, 40, 1), None),
                "smaller_than_the_roi": ((20, 20, 12), None)}


# Issue 22: code from a file never runs, corruption is refused, nothing of the user's replaced, bounds kept.
def _torchscript_writing_on_load(tmp: Path, ctx) -> Path:
    """A scripted tiny UNETR with one dropout that writes ``tmp/MARKER`` when its file is loaded by torch."""
    model = build_model(build_config([read_yaml(TINY)]).model).eval()
    model.vit.blocks[0].mlp.drop1 = WritesOnLoad(str(tmp / "MARKER"))
    path = tmp / "ts" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(path))
    ctx["absent"] = [tmp / "MARKER"]
    return path


def infer_torchscript_that_runs_code_when_loaded(tmp, ctx):
    path = _torchscript_writing_on_load(tmp, ctx)
    return _infer(tmp, path, ctx["scan"], "--saved_checkpoint", "torchscript"), "without running its code"


def train_resume_jit_from_torchscript_that_runs_code(tmp, ctx):
    path = _torchscript_writing_on_load(tmp, ctx)
    return _train(tmp, ctx["phantoms"], "--resume_jit", "--pretrained_dir", str(path.parent),
                  "--pretrained_model_name", path.name), "without running its code"


def infer_torchscript_with_another_roi_shape(tmp, ctx):
    # 32^3 and 64x32x16 hold the same number of patches: only the ROI the trace recorded tells them apart.
    return (_infer(tmp, ctx["torchscript"], ctx["scan"], "--saved_checkpoint", "torchscript", "--roi_x", "64",
                   "--roi_z", "16"), "run with the file's settings")


def infer_lock_file_is_a_symlink(tmp, ctx):
    victim = tmp / "victim.txt"
    victim.write_text("the user's file")
    (tmp / "out").mkdir()
    (tmp / "out" / ".lock").symlink_to(victim)
    ctx["unchanged"] = [victim]
    return _infer(tmp, ctx["weights"], ctx["scan"]), ".lock is a symbolic link"


def export_onto_a_folder_with_overwrite(tmp, ctx):
    folder = tmp / "exported"
    folder.mkdir()
    (folder / "keep.txt").write_text("kept")
    ctx["unchanged"] = [folder / "keep.txt"]
    return ["export", "--checkpoint", str(ctx["checkpoint"]), "--format", "torchscript", "--out", str(folder),
            "--overwrite"], "is a folder"


def serve_jobs_folder_holding_other_things(tmp, ctx):
    jobs = tmp / "jobs"
    (jobs / "experiment1").mkdir(parents=True)
    (jobs / "experiment1" / "model.pt").write_bytes(b"the user's model")
    ctx["unchanged"] = [jobs / "experiment1" / "model.pt"]
    return ["serve", "--checkpoint", str(ctx["checkpoint"]), "--jobs_dir", str(jobs), "--port", "0"], \
        "holds files that are not this service's jobs"


# ---------------------------------------------------------------- issue 27: files from the wild, late header failures


def _no_window(ctx) -> None:
    """The case must be refused before any sliding window runs: running one fails the test."""
    ctx["stack"].enter_context(mock.patch("btcv_unetr.inference.predictor.Predictor.probabilities",
                                          side_effect=AssertionError("a window ran before the refusal")))


def _header_edited(path: Path, shape=(40, 40, 24), affine=AFFINE, **fields) -> Path:
    """An int16 scan whose header ``fields`` (``scl_slope=...``) are set as written, whatever nibabel would say."""
    image = nib.Nifti1Image(np.random.default_rng(0).integers(-200, 300, shape).astype(np.int16), affine)
    for key, value in fields.items():
        image.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


SHEARED = np.array([[1.5, 0.3, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
INFINITE_INTER = "its header scales the stored values by scl_slope 1 and scl_inter inf, which no scanner's values take"
HUGE_SLOPE = "its header scales the stored values by scl_slope 1e+30 and scl_inter 0, which no scanner's values take"


def infer_scl_inter_infinite(tmp, ctx):
    _no_window(ctx)  # nibabel refused it only when MONAI loaded it: "LoadImage cannot find a suitable reader"
    scan = _header_edited(tmp / "inter.nii.gz", scl_slope=1.0, scl_inter=np.inf)
    return _infer(tmp, ctx["weights"], scan), f"inter.nii.gz: {INFINITE_INTER}"


def check_scl_inter_infinite(tmp, ctx):
    image = _header_edited(tmp / "data" / "img.nii.gz", scl_slope=1.0, scl_inter=np.inf)
    return _dataset(tmp, image=image), f"img.nii.gz: {INFINITE_INTER}"


def infer_scl_slope_1e30(tmp, ctx):
    _no_window(ctx)  # segmented without a word before: every voxel far above the intensity window
    scan = _header_edited(tmp / "slope.nii.gz", scl_slope=1e30, scl_inter=0.0)
    return _infer(tmp, ctx["weights"], scan), f"slope.nii.gz: {HUGE_SLOPE}"


def check_scl_slope_1e30(tmp, ctx):
    image = _header_edited(tmp / "data" / "img.nii.gz", scl_slope=1e30, scl_inter=0.0)
    return _dataset(tmp, image=image), f"img.nii.gz: {HUGE_SLOPE}"


def infer_5d_with_singleton_4th_and_5th_axes(tmp, ctx):
    _no_window(ctx)  # MONAI's Orientation failed on it: "axcodes must match data_array spatially"
    scan = _image(tmp / "five.nii.gz", shape=(40, 40, 24, 1, 1))
    return _infer(tmp, ctx["weights"], scan), "five.nii.gz: image is 5D with shape (40, 40, 24, 1, 1), expected a 3D"


def check_5d_with_singleton_4th_and_5th_axes(tmp, ctx):
    image = _image(tmp / "data" / "img.nii.gz", shape=(40, 40, 24, 1, 1))
    return _dataset(tmp, image=image), "img.nii.gz: image is 5D with shape (40, 40, 24, 1, 1), expected a 3D volume"


def infer_sheared_nifti(tmp, ctx):
    _no_window(ctx)  # it ran every window, then: "RuntimeError: the preprocessed grid is rotated against the scan's"
    scan = _image(tmp / "tilted.nii.gz", affine=SHEARED)
    return _infer(tmp, ctx["weights"], scan), "tilted.nii.gz: its affine is sheared (voxel axes 11 degrees from"


def check_sheared_nifti_to_segment(tmp, ctx):
    # In 'test' test.py segments it: a problem. Training and validation resample it (a note: test_checks.py).
    data = tmp / "data"
    _image(data / "img.nii.gz"), _label(data / "lab.nii.gz"), _image(data / "tilted.nii.gz", affine=SHEARED)
    content = {"training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}], "test": [{"image": "tilted.nii.gz"}]}
    return _dataset(tmp, content=content), f"{data / 'tilted.nii.gz'}: its affine is sheared (voxel axes 11 degrees"


def infer_sheared_slicer_nrrd(tmp, ctx):
    _no_window(ctx)
    from test_wild_images import slicer_nrrd
    scan = tmp / "tilted.nrrd"
    steps = np.array([[0.9, 0.0, 0.0], [0.0, 0.9, -0.6], [0.0, 0.05, 2.4]])  # 'space directions', not perpendicular
    slicer_nrrd(scan, np.zeros((40, 36, 20), np.int16), "left-posterior-superior", steps, (0.0, 0.0, 0.0))
    ctx["absent"] = [tmp / "out" / "tilted_seg.nrrd"]
    return _infer(tmp, ctx["weights"], scan), "tilted.nrrd: its affine is sheared (voxel axes 11 degrees from"


def infer_mha_with_a_singleton_4th_axis(tmp, ctx):
    _no_window(ctx)  # SimpleITK read it without its geometry; the mask's writer then failed in library words
    scan = tmp / "four.mha"
    header = ["ObjectType = Image", "NDims = 4", "BinaryData = True", "BinaryDataByteOrderMSB = False",
              "CompressedData = False", "TransformMatrix = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1", "Offset = 0 0 0 0",
              "ElementSpacing = 1.5 1.5 2 1", "DimSize = 40 40 24 1", "ElementType = MET_SHORT",
              "ElementDataFile = LOCAL"]
    scan.write_bytes(("\n".join(header) + "\n").encode() + bytes(40 * 40 * 24 * 2))
    ctx["absent"] = [tmp / "out" / "four_seg.mha"]
    return (_infer(tmp, ctx["weights"], scan),
            "four.mha: image is 4D with shape (40, 40, 24, 1): save it as a 3D volume (an MHA or NRRD with more")


def infer_nibabels_example4d_as_shipped(tmp, ctx):
    from nibabel.testing import data_path
    _no_window(ctx)
    return (_infer(tmp, ctx["weights"], Path(data_path) / "example4d.nii.gz"),
            "example4d.nii.gz: image is 4D with shape (128, 96, 24, 2), expected a 3D volume")


def infer_nibabels_spm_resampled_file_with_nan(tmp, ctx):
    # nibabel's resampled_anat_moved.nii: SPM's resampling leaves NaN outside the moved field of view.
    from nibabel.testing import data_path
    return (_infer(tmp, ctx["weights"], Path(data_path) / "resampled_anat_moved.nii"),
            "resampled_anat_moved.nii: the image has 153 NaN or infinite voxels (153 NaN, 0 infinite)")


def infer_case_names_with_newlines_in_the_per_case_lines(tmp, ctx):
    # Two cases: each failure has its own line ("NAME: failed: ..."), which printed the name raw.
    ctx["forged"] = FORGED
    for first in "ab":
        _image(tmp / "in" / f"{first}\n{FORGED}.nii.gz", shape=(40, 40))
    return _infer(tmp, ctx["weights"], tmp / "in"), "2 of 2 case(s) failed (listed above)"


# ---- DICOM folders as scanners and anonymisers leave them (issue 27): series built from pydicom's GE CT slice ----


def _ct_series(folder: Path, count: int = 4, **edits) -> list:
    """``count`` copies of pydicom's CT_small.dcm 2 mm apart in ``folder`` (tests/test_dicom_wild.py builds them)."""
    from test_dicom_wild import _ct_slices, _write
    slices = _ct_slices(count, **edits)
    _write(slices, folder)
    return slices


def check_dicom_series_folder_as_a_datalist_image(tmp, ctx):
    _ct_series(tmp / "data" / "series")
    return (_dataset(tmp, image=tmp / "data" / "series"),
            "series: a folder, not an image file: a datalist names image files (NIfTI, NRRD, MHA); convert a "
            "DICOM series to NIfTI first (test.py --input FOLDER segments one as it is)")


def infer_dicom_folder_of_another_modality(tmp, ctx):
    _ct_series(tmp / "mr", Modality="MR")
    return (_infer(tmp, ctx["weights"], tmp / "mr"),
            f"{tmp}/mr: a MR series, and this model segments CT: its intensities mean something else (give "
            "--any_modality to segment it anyway)")


def infer_dicom_two_different_slices_at_one_position(tmp, ctx):
    slices = _ct_series(tmp / "mixed")
    slices[2].ImagePositionPatient = list(slices[1].ImagePositionPatient)
    slices[2].save_as(str(tmp / "mixed" / "0002.dcm"), enforce_file_format=False)
    return (_infer(tmp, ctx["weights"], tmp / "mixed"),
            f"{tmp}/mixed: two different slices at one position")


def infer_dicom_gantry_tilt(tmp, ctx):
    slices = _ct_series(tmp / "tilted")
    for k, ds in enumerate(slices):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 1.0 * k, z]
        ds.save_as(str(tmp / "tilted" / f"{k:04d}.dcm"), enforce_file_format=False)
    return (_infer(tmp, ctx["weights"], tmp / "tilted"), f"{tmp}/tilted: a gantry tilt of about 26.6 degrees")


def infer_dicom_slice_that_cannot_be_decoded(tmp, ctx):
    _ct_series(tmp / "cut")
    data = (tmp / "cut" / "0001.dcm").read_bytes()
    (tmp / "cut" / "0001.dcm").write_bytes(data[:len(data) - 5000])  # the pixel data cut short
    return (_infer(tmp, ctx["weights"], tmp / "cut"),
            f"{tmp}/cut: 0001.dcm: the pixels of this DICOM file (Explicit VR Little Endian) cannot be decoded")


def infer_dicom_only_a_localizer(tmp, ctx):
    _ct_series(tmp / "scout", count=2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    return (_infer(tmp, ctx["weights"], tmp / "scout"),
            f"{tmp}/scout: no DICOM image series that can be stacked into a volume (found: ")


def infer_dicom_series_uid_not_in_the_folder(tmp, ctx):
    _ct_series(tmp / "study")
    return (_infer(tmp, ctx["weights"], tmp / "study", "--series_uid", "1.2.3.4"),
            f"{tmp}/study: no stackable DICOM series with --series_uid 1.2.3.4 (found: ")


CASES = [value for name, value in dict(globals()).items()
         if name.split("_")[0] in ("check", "train", "infer", "export", "evaluate", "serve") and callable(value)]


# How many cases the module defines: a case renamed out of the prefixes above would drop out silently.
NUMBER_OF_CASES = 85
assert len(CASES) == NUMBER_OF_CASES, f"{len(CASES)} cases collected, {NUMBER_OF_CASES} expected"


@pytest.fixture(scope="module")
def shared(phantom_dir, trained_run, tmp_path_factory):
    """Files several cases use: a scan, tiny weights, a training checkpoint (a copy of the session's trained
    run's, so that a case that failed to refuse would not change it for other tests), a TorchScript model."""
    folder = tmp_path_factory.mktemp("shared")
    weights = _weights(folder)
    scan = _image(folder / "scan.nii.gz")
    run = folder / "run"
    run.mkdir()
    shutil.copy(trained_run / "model_final.pt", run / "model_final.pt")
    model = build_model(build_config([read_yaml(TINY)]).model).eval()
    torchscript = folder / "model.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 32, 32, 32)).save(str(torchscript))
    return {"phantoms": phantom_dir, "weights": weights, "scan": scan, "checkpoint": run / "model_final.pt",
            "torchscript": torchscript}


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gets_one_line_and_leaves_nothing_behind(case, shared, tmp_path, capsys, monkeypatch):
    from contextlib import ExitStack
    with ExitStack() as stack:
        ctx = {**shared, "stack": stack, "monkeypatch": monkeypatch}
        argv, expected = case(tmp_path, ctx)
        before = {path: path.read_bytes() for path in ctx.get("unchanged", [])}
        capsys.readouterr()
        status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in out + err
    if argv[0] == "check-data":
        assert expected in out
    else:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], err
        assert errors[0].endswith(ctx.get("line_ends", "")), err  # the whole message on its one line
    if "forged" in ctx:  # a name holding a newline shows escaped, never as a line of its own
        assert not any(line.startswith(ctx["forged"]) for line in (out + err).splitlines()), out + err
    for path, content in before.items():
        assert path.read_bytes() == content
    for path in ctx.get("absent", []):
        assert not path.exists()
    assert not list(tmp_path.rglob(".*.tmp*")) and not list(tmp_path.rglob("*_seg.nii.gz"))


@pytest.mark.parametrize("kind", VALID_SHAPES)
def test_unusual_but_valid_scans_are_segmented_in_their_own_shape(kind, shared, tmp_path):
    shape, value = VALID_SHAPES[kind]
    scan = _image(tmp_path / f"{kind}.nii.gz", shape=shape, value=value)
    assert cli.main(_infer(tmp_path, shared["weights"], scan)) == 0
    mask = nib.load(tmp_path / "out" / f"{kind}_seg.nii.gz")
    assert mask.shape == shape and np.allclose(mask.affine, AFFINE)


def test_the_window_count_is_printed_before_each_case_runs(shared, tmp_path, capsys):
    # 96 x 40 x 32 voxels of 6 mm, ROI 32, overlap 0.75 (stride 8): 9 x 2 x 1 windows, within 8 times overlap 0.5's 10.
    scan = _image(tmp_path / "long.nii.gz", shape=(96, 40, 32), value=100, affine=np.diag([6.0, 6.0, 6.0, 1.0]))
    assert cli.main(_infer(tmp_path, shared["weights"], scan, "--infer_overlap", "0.75")) == 0
    lines = capsys.readouterr().out.splitlines()
    counted = lines.index("long.nii.gz: 18 sliding windows (overlap 0.75)")
    assert counted < next(index for index, line in enumerate(lines) if line.startswith("long: (96, 40, 32) in "))


def test_a_segmented_case_named_with_a_newline_prints_no_line_of_its_own(shared, tmp_path, capsys):
    """A valid scan whose name holds a newline: every line that names it (windows, kept, done) shows it escaped."""
    scan = tmp_path / "in" / f"a\n{FORGED}.nii.gz"
    scan.parent.mkdir()
    shutil.copy(shared["scan"], scan)
    argv = _infer(tmp_path, shared["weights"], tmp_path / "in", "--infer_overlap", "0")
    for _ in range(2):  # segmented, then kept
        assert cli.main(argv) == 0
        out, err = capsys.readouterr()
        assert "a\\n" in out and not any(line.startswith(FORGED) for line in (out + err).splitlines()), out + err
