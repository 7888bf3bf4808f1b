"""A full disk (issue 22): one line naming the file and the space left, exit 2, nothing half-written left, and the
run stops at the first case that cannot be written. The lack of space is simulated: the writer writes part of the
file, then fails as the operating system does (ENOSPC), or as SimpleITK does (a RuntimeError without an errno)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import SimpleITK as sitk
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.files import DiskFull, atomic_write, atomic_write_text, folder_lock, make_folder
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.testing.checkpoints import seeded_checkpoint

FREE = 12 * 1024 + 512  # what the filesystem reports free: "12.5 KiB"


@pytest.fixture
def full_disk(monkeypatch):
    """``shutil.disk_usage`` reports :data:`FREE` bytes free everywhere."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - FREE, FREE))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return seeded_checkpoint(tmp_path_factory.mktemp("run") / "model.pt", tiny_config())


def _scans(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for index, name in enumerate(names, start=1):
        nib.save(generate_case(seed=3, index=index, size=40).image, folder / name)
    return folder


def _infer(checkpoint: Path, scans: Path, out: Path) -> int:
    return cli.main(["infer", "--config", "tiny.yaml", "--pretrained_dir", str(checkpoint.parent),
                     "--pretrained_model_name", checkpoint.name, "--input", str(scans), "--output_dir", str(out),
                     "--device", "cpu", "--no-overlay", "--no_hd95"])


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_mask_that_fills_the_disk_stops_the_run_in_one_line_and_leaves_nothing(checkpoint, tmp_path, monkeypatch,
                                                                                   full_disk, capsys):
    written = []

    def save_half_then_fail(image, path):  # nibabel's writer, as it fails when the disk fills during a mask
        written.append(Path(path))
        Path(path).write_bytes(b"\x1f\x8b half a mask")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    scans, out = _scans(tmp_path / "scans", ["a.nii.gz", "b.nii.gz"]), tmp_path / "out"
    monkeypatch.setattr(nib, "save", save_half_then_fail)
    assert _infer(checkpoint, scans, out) == 2
    assert _error_lines(capsys) == [(f"error: {out}/a_seg.nii.gz: not written, the disk is full (12.5 KiB free "
                                     "there): free some space or write to another folder")]
    assert len(written) == 1  # b is not tried: it could not be written either
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no mask, no temporary


def test_an_itk_mask_whose_writer_hides_the_errno_is_reported_alike(checkpoint, tmp_path, monkeypatch, capsys):
    """SimpleITK's error carries no errno: a failed write with (almost) no space left is the disk's."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    nifti = _scans(tmp_path / "nifti", ["c.nii.gz"]) / "c.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(scans / "c.nrrd"))
    real_write = sitk.WriteImage

    def write_half_then_fail(image, path, *args):
        if not str(path).endswith(".nrrd"):
            return real_write(image, path, *args)
        Path(path).write_bytes(b"NRRD0004\n half")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: could not write file")

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    assert _infer(checkpoint, scans, out) == 2
    assert _error_lines(capsys) == [(f"error: {out}/c_seg.nrrd: not written, the disk is full (0 B free there): "
                                     "free some space or write to another folder")]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_new_output_folder_on_a_full_disk_is_one_line(checkpoint, tmp_path, monkeypatch, full_disk, capsys):
    scans, out = _scans(tmp_path / "scans", ["d.nii.gz"]), tmp_path / "runs" / "out"
    real_mkdir = os.mkdir

    def mkdir_on_a_full_disk(path, mode=0o777, *args, **kwargs):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_mkdir(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_on_a_full_disk)
    assert _infer(checkpoint, scans, out) == 2
    assert _error_lines(capsys) == [(f"error: {out}: not created, the disk is full (12.5 KiB free there): free some "
                                     "space or write to another folder")]
    assert not out.exists()


def test_a_lock_file_that_cannot_be_written_for_lack_of_space_is_one_line(tmp_path, monkeypatch, full_disk):
    real_fdopen = os.fdopen

    class FullFile:
        """The lock file's handle on a full disk: its first write fails to flush."""

        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.raises(DiskFull) as caught, folder_lock(tmp_path, "a training run"):
        pass
    assert str(caught.value) == (f"{tmp_path}/.lock: not written, the disk is full (12.5 KiB free there): free some "
                                 "space or write to another folder")


def test_a_quota_is_named_as_such_and_other_errors_stay_what_they_are(tmp_path, monkeypatch, full_disk):
    def over_quota(tmp: Path) -> None:
        tmp.write_text("part")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(DiskFull, match=r"report\.csv: not written, over the disk quota \(12\.5 KiB free there\)"):
        atomic_write(tmp_path / "report.csv", over_quota)
    for error in (OSError(errno.EIO, "I/O error"), RuntimeError("a writer's own bug"), ValueError("bad data")):
        def fail(tmp: Path, error=error) -> None:
            raise error
        # A RuntimeError is the disk's only when (almost) nothing is free: 12.5 KiB is.
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 0, 1 << 30))
        with pytest.raises(type(error)) as caught:
            atomic_write(tmp_path / "report.csv", fail)
        assert caught.value is error
    assert list(tmp_path.iterdir()) == []


def test_make_folder_words_only_a_lack_of_space(tmp_path, monkeypatch, full_disk):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):  # the caller says which flag names the folder
        make_folder(tmp_path / "file" / "sub")
    atomic_write_text(tmp_path / "new" / "deeper" / "a.txt", "made")
    assert (tmp_path / "new" / "deeper" / "a.txt").read_text() == "made"
