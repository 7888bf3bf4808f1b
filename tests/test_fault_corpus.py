"""The fault corpus: every hostile or mistaken input of the command line, each a case that must get one clear line
and a non-zero exit, with nothing half-written and nothing of the user's replaced (issues 18 and 22).

Each case builds its files in a fresh folder and returns the command line (``btcv-unetr`` sub-command
and flags, run in-process) and a fragment of the expected message.
"""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from btcv_unetr import cli
from btcv_unetr.config import CONFIG_DIR, build_config
from btcv_unetr.config import _read_yaml as read_yaml
from btcv_unetr.files import folder_lock
from btcv_unetr.model.build import build_model

TINY = str(CONFIG_DIR / "tiny.yaml")
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


def check_missing_image(tmp, ctx):
    return _dataset(tmp, image=tmp / "data" / "gone.nii.gz"), "gone.nii.gz: file not found"


def check_missing_label(tmp, ctx):
    return _dataset(tmp, label=tmp / "data" / "gone.nii.gz"), "gone.nii.gz: file not found"


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
    return _train(tmp, ctx["phantoms"], "--roi_x", "40"), "config key 'roi_x': 40 must be a positive multiple of 16"


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
    return _infer(tmp, weights, ctx["scan"]), "weights do not match the model built from the flags"


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
        "nan.nii.gz: the image has NaN or infinite voxels"


def infer_2d_input(tmp, ctx):
    return _infer(tmp, ctx["weights"], _image(tmp / "flat.nii.gz", shape=(40, 40))), "image is 2D"


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


# Unusual but valid scans: segmented, with a mask of the scan's own shape.
VALID_SHAPES = {"all_constant": ((40, 40, 24), -1000), "one_slice": ((40, 40, 1), None),
                "smaller_than_the_roi": ((20, 20, 12), None)}

CASES = [value for name, value in dict(globals()).items()
         if name.split("_")[0] in ("check", "train", "infer", "export", "evaluate") and callable(value)]


@pytest.fixture(scope="module")
def shared(phantom_dir, tmp_path_factory):
    """Files several cases use: a scan, tiny weights, a training checkpoint, a TorchScript model."""
    folder = tmp_path_factory.mktemp("shared")
    weights = _weights(folder)
    scan = _image(folder / "scan.nii.gz")
    run = folder / "run"
    assert cli.main(_train(folder, phantom_dir, "--val_every", "1", "--max_steps", "1", "--precision", "fp32")) == 0
    model = build_model(build_config([read_yaml(TINY)]).model).eval()
    torchscript = folder / "model.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 32, 32, 32)).save(str(torchscript))
    return {"phantoms": phantom_dir, "weights": weights, "scan": scan, "checkpoint": run / "model_final.pt",
            "torchscript": torchscript}


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gets_one_line_and_leaves_nothing_behind(case, shared, tmp_path, capsys):
    from contextlib import ExitStack
    with ExitStack() as stack:
        ctx = {**shared, "stack": stack}
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
