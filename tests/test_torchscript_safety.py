"""TorchScript files are read as data (io/torchscript.py): no code of theirs runs through any command that takes
one, their weights load exactly, and an architecture the file records that differs from the flags is refused.

A module whose ``__setstate__`` writes a file does so the moment ``torch.jit.load`` reads it (checked here once, so
the marker tests can fail); through test.py, main.py --resume_jit, export and serve it must leave no file.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import tiny_config
from hostile import WritesOnLoad
from torch import nn

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR
from btcv_unetr.errors import UserError
from btcv_unetr.inference.export import export
from btcv_unetr.io.torchscript import _Archive, read_archive
from btcv_unetr.model.build import build_model
from btcv_unetr.model.torchscript import load_torchscript_weights
from btcv_unetr.testing.server import free_port

TINY = str(CONFIG_DIR / "tiny.yaml")
READS_CODE = "restores itself with its own code (__setstate__)"


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config().model).eval()


def _unetr_writing_on_load(path: Path, marker: Path) -> Path:
    """A scripted tiny UNETR, weights and all, with one dropout replaced by :class:`WritesOnLoad`."""
    model = _tiny()
    model.vit.blocks[0].mlp.drop1 = WritesOnLoad(str(marker))
    torch.jit.script(model).save(str(path))
    return path


def _module_writing_on_load(path: Path, marker: Path) -> Path:
    """Not a UNETR at all: the file the issue saw written during --resume_jit before being refused."""
    torch.jit.script(WritesOnLoad(str(marker))).save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("torchscript")
    marker = folder / "MARKER"
    return {"marker": marker, "unetr": _unetr_writing_on_load(folder / "unetr_evil.pt", marker),
            "module": _module_writing_on_load(folder / "module_evil.pt", marker)}


def test_the_files_do_write_when_torch_loads_them(tmp_path):
    """The fixture is real: torch.jit.load runs __setstate__ (so a missing marker below means nothing ran)."""
    marker = tmp_path / "written"
    torch.jit.load(str(_module_writing_on_load(tmp_path / "m.pt", marker)))
    assert marker.is_file()


def _scan(phantom_dir: Path) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))



COMMANDS = {
    "test.py": lambda f, tmp, data: ["infer", "--config", TINY, "--pretrained_dir", str(f.parent),
                                     "--pretrained_model_name", f.name, "--saved_checkpoint", "torchscript",
                                     "--input", str(_scan(data)), "--output_dir", str(tmp / "out")],
    "main.py --resume_jit": lambda f, tmp, data: ["train", "--config", TINY, "--data_dir", str(data), "--json_list",
                                                  "dataset.json", "--logdir", str(tmp / "run"), "--max_epochs", "1",
                                                  "--resume_jit", "--pretrained_dir", str(f.parent),
                                                  "--pretrained_model_name", f.name],
    "export": lambda f, tmp, data: ["export", "--config", TINY, "--checkpoint", str(f), "--format", "torchscript",
                                    "--out", str(tmp / "exported.pt")],
    "serve": lambda f, tmp, data: ["serve", "--config", TINY, "--checkpoint", str(f), "--jobs_dir",
                                   str(tmp / "jobs"), "--port", str(free_port())],
}


@pytest.mark.parametrize("kind", ["unetr", "module"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_runs_code_from_a_torchscript_file(command, kind, files, phantom_dir, tmp_path, capsys, request):
    """Each command refuses the file in one line, before anything is written, and the marker never appears."""
    if command == "serve":
        pytest.importorskip("fastapi")
        request.getfixturevalue("serve_sandbox")
    capsys.readouterr()
    status = cli.main(COMMANDS[command](files[kind], tmp_path, phantom_dir))
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and READS_CODE in errors[0], err
    assert f"{files[kind]}: refused: this TorchScript file cannot be read without running its code" in errors[0]
    assert "Traceback" not in out + err
    assert not files["marker"].exists()
    assert not (tmp_path / "exported.pt").exists() and not list(tmp_path.rglob("*_seg.nii.gz"))


def _pickle_running(code: str) -> bytes:
    """A pickle that runs ``code`` when an ordinary unpickler reads it (builtins.exec)."""
    class Runs:
        def __reduce__(self):
            return exec, (code,)
    return pickle.dumps(Runs(), protocol=2)


def test_a_data_pkl_that_calls_a_function_is_refused_without_calling_it(tmp_path):
    """A TorchScript archive whose data.pkl calls exec (as pickle.loads would): refused, naming it; nothing ran."""
    genuine, forged, marker, control = tmp_path / "genuine.pt", tmp_path / "forged.pt", tmp_path / "ran", tmp_path / "c"
    pickle.loads(_pickle_running(f"open({str(control)!r}, 'w').write('ran')"))
    assert control.is_file()  # the forged pickle below does run code wherever it is read as an ordinary pickle
    torch.jit.script(nn.Linear(2, 2)).save(str(genuine))
    with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(forged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                data = _pickle_running(f"open({str(marker)!r}, 'w').write('ran')")
            target.writestr(info, data)
    with pytest.raises(UserError, match=r"forged.pt: refused: .*\(it needs __builtin__.exec, which only running code"):
        read_archive(forged)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("data.pkl", "a pickle cut short"),
    ("data/0", "a tensor record linear/data/0 shorter than its tensor"),
])
def test_a_damaged_archive_is_refused_as_damaged(damage, message, tmp_path):
    """A cut data.pkl or tensor record: one line saying the file is unreadable (not that it needs code)."""
    genuine, damaged = tmp_path / "linear.pt", tmp_path / "damaged.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(genuine))
    with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data[:len(data) // 2] if info.filename == f"linear/{damage}" else data)
    with pytest.raises(UserError, match=rf"damaged.pt: not a readable TorchScript file \({message}\); use another"):
        read_archive(damaged)


def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(window)


# The files take seconds to script and trace: the tests that read them share one process (--dist loadgroup).
SAVED = pytest.mark.xdist_group("torchscript_saved")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny UNETR of seed 0 as TorchScript: scripted, traced (with and without its example input, as older
    PyTorch wrote), and exported by ``btcv-unetr export`` (a trace that records the model config)."""
    folder, eager = tmp_path_factory.mktemp("saved"), _tiny()
    example = torch.zeros(1, 1, 32, 32, 32)
    paths = {how: folder / f"{how}.pt" for how in ("script", "trace", "trace_without_inputs", "export")}
    torch.jit.script(eager).save(str(paths["script"]))
    torch.jit.trace(eager, example, check_trace=False).save(str(paths["trace"]))
    torch.jit.trace(eager, example, check_trace=False, _store_inputs=False).save(str(paths["trace_without_inputs"]))
    export(eager, example, "torchscript", paths["export"], tiny_config().model)
    return paths


@SAVED
@pytest.mark.parametrize("how", ["script", "trace", "export"])
def test_a_real_tiny_unetr_loads_with_the_eager_logits(how, saved, capsys):
    """Scripted, traced and exported files: every weight read, the eager model's logits exactly."""
    other, window = _tiny(seed=4), torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = _logits(_tiny(seed=0), window)
    assert not torch.equal(_logits(other, window), expected)
    load_torchscript_weights(other, tiny_config().model, saved[how])
    assert torch.equal(_logits(other, window), expected)
    err = capsys.readouterr().err
    # Only a bare trace leaves the heads unrecorded; scripted attributes and our export's record give them.
    assert ("does not record the attention heads (--num_heads 4)" in err) == (how == "trace")


HEADS = (["--num_heads", "8"], "was built with --num_heads 4, the flags say --num_heads 8: run with the file's settings")
ROI = (["--roi_x", "64", "--roi_y", "32", "--roi_z", "16"],
       "was built with --roi_x 32 --roi_y 32 --roi_z 32, the flags say --roi_x 64 --roi_y 32 --roi_z 16")


@SAVED
@pytest.mark.parametrize("how, flags, message", [
    ("script", *HEADS), ("export", *HEADS), ("script", *ROI), ("export", *ROI), ("trace", *ROI),
    ("trace_without_inputs", ["--roi_x", "64", "--roi_y", "64", "--roi_z", "64"],
     "was built with an ROI of 8 16-voxel patches, the flags say --roi_x 64 --roi_y 64 --roi_z 64 (64 patches)"),
])
def test_an_architecture_the_file_records_must_be_the_flags(how, flags, message, saved, phantom_dir, tmp_path,
                                                           capsys):
    """4 heads run with --num_heads 8, a 32^3 ROI run as 64x32x16 (the same 8 patches): one line, exit 2, no mask."""
    path = saved[how]
    capsys.readouterr()
    argv = COMMANDS["test.py"](path, tmp_path, phantom_dir) + flags
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}: this TorchScript UNETR {message}" in errors[0], errors
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


@SAVED
def test_what_a_bare_trace_cannot_show_is_named_not_assumed(saved, capsys):
    """A trace without example inputs (older PyTorch) shows neither heads nor the ROI's shape: a warning says so,
    with the values taken from the flags; the patch count is still checked (above)."""
    path = saved["trace_without_inputs"]
    config = dataclasses.replace(tiny_config().model, roi_x=64, roi_y=32, roi_z=16)
    load_torchscript_weights(build_model(config), config, path)
    err = capsys.readouterr().err
    assert (f"warning: {path} does not record the attention heads (--num_heads 4) or the ROI's shape "
            "(--roi_x 64 --roi_y 32 --roi_z 16; only its number of patches is checked)") in err


@SAVED
def test_serve_takes_a_torchscript_checkpoint_as_torchscript(saved):
    """serve --checkpoint an exported file: read as TorchScript (not refused as 'use --resume_jit'), exact weights."""
    from btcv_unetr.inference.loader import load_members
    from btcv_unetr.serve.command import predictor_config
    eager = _tiny(seed=0)
    config = predictor_config(tiny_config(train={"checkpoint": str(saved["export"])}))
    assert config.infer.saved_checkpoint == "torchscript" and not config.infer.sw_progress
    _, [member] = load_members(config, torch.device("cpu"))
    window = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(_logits(member.model, window), _logits(eager, window))


def test_a_2d_export_loads_with_the_eager_logits(tmp_path, capsys):
    """2D (tiny2d: RGB pictures, 64x64 ROI): the architecture is read and checked, the weights load exactly."""
    from btcv_unetr.config.load import build_config, read_yaml
    config = build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml")]).model
    torch.manual_seed(0)
    eager = build_model(config).eval()
    export(eager, torch.zeros(1, 3, 64, 64), "torchscript", tmp_path / "unetr2d.pt", config)
    torch.manual_seed(1)
    other = build_model(config).eval()
    load_torchscript_weights(other, config, tmp_path / "unetr2d.pt")
    pictures = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(other, pictures), _logits(eager, pictures))
    assert "warning" not in capsys.readouterr().err
    wider = dataclasses.replace(config, roi_x=128, roi_y=32)  # the same 16 patches, another shape
    with pytest.raises(UserError, match="built with --roi_x 64 --roi_y 64, the flags say --roi_x 128 --roi_y 32"):
        load_torchscript_weights(build_model(wider), wider, tmp_path / "unetr2d.pt")


def _mutated(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` damaged one way: 1 to 8 bytes flipped, cut at a random length, or 1 to 16 random bytes inserted."""
    damaged = bytearray(data)
    how = rng.integers(3)
    if how == 0:
        for at in rng.integers(len(damaged), size=rng.integers(1, 9)):
            damaged[at] ^= int(rng.integers(1, 256))
    elif how == 1:
        damaged = damaged[:rng.integers(len(damaged))]
    else:
        at = int(rng.integers(len(damaged) + 1))
        damaged[at:at] = rng.integers(0, 256, rng.integers(1, 17), dtype=np.uint8).tobytes()
    return bytes(damaged)


@SAVED
def test_300_damaged_data_pkls_of_an_export_are_read_or_refused_in_one_line(saved):
    """The export's data.pkl mutated 300 times (seeded) and read by the archive reader, the rest of the archive
    genuine: each is read, or refused as a UserError of one line naming the file; no other exception escapes (97
    UnicodeDecodeError and 5 TypeError did). Only the reader runs: no model is built."""
    path = saved["export"]
    with zipfile.ZipFile(path) as archive:
        genuine = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    real_read, real_class, mutated, classes = _Archive.read, _Archive._read_class, {}, {}

    def read(self, name: str) -> bytes:
        return mutated["data.pkl"] if name == "data.pkl" else real_read(self, name)

    def read_class(self, name: str):  # the classes' source files are genuine: each read once for all 300 (speed)
        if name not in classes:
            classes[name] = real_class(self, name)
        return classes[name]

    rng, outcomes = np.random.default_rng(27), {"read": 0, "refused": 0}
    with mock.patch.object(_Archive, "read", read), mock.patch.object(_Archive, "_read_class", read_class):
        for _ in range(300):
            mutated["data.pkl"] = _mutated(genuine, rng)
            try:
                read_archive(path)
            except UserError as exc:
                message = str(exc)
                assert "\n" not in message and message.startswith(f"{path}: "), message
                assert "not a readable TorchScript file (" in message or "refused: " in message, message
                outcomes["refused"] += 1
            else:
                outcomes["read"] += 1
    assert outcomes["read"] >= 1 and outcomes["refused"] >= 250, outcomes
