"""btcv_unetr.files never writes through a link (issue 22): lock files are opened without following one, temporaries
are created exclusively, the final rename replaces a link at the output's name (never its target), and clean-up
removes only plain temporaries. What a link points to is left byte for byte as it was."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_config

from btcv_unetr.errors import UserError
from btcv_unetr.files import atomic_path, atomic_write_text, folder_lock, remove_stale_temporaries
from btcv_unetr.inference.batch import run_inference


@pytest.fixture
def precious(tmp_path) -> Path:
    """A file of the user's outside the output folder, that links below point to."""
    path = tmp_path / "elsewhere" / "thesis.txt"
    path.parent.mkdir()
    path.write_text("five years of work")
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(out, precious):
    (out / ".lock").symlink_to(precious)
    with pytest.raises(UserError) as caught, folder_lock(out, "inference"):
        pass
    assert str(caught.value) == (f"{out}/.lock is a symbolic link: remove it (the lock is never written through a "
                                 "link), or choose another folder")
    assert precious.read_text() == "five years of work"


def test_a_dangling_lock_link_creates_nothing_at_its_target(out, tmp_path):
    (out / ".lock").symlink_to(tmp_path / "created_through_the_link")
    with pytest.raises(UserError, match="is a symbolic link"), folder_lock(out, "a training run", name=".lock"):
        pass
    assert not (tmp_path / "created_through_the_link").exists()


def test_a_lock_file_with_a_second_name_is_refused(out, precious):
    """A hard link is the same file under two names: truncating the lock would truncate the other."""
    os.link(precious, out / ".lock")
    with pytest.raises(UserError, match=r"\.lock is a file with 2 names: remove it"), folder_lock(out, "inference"):
        pass
    assert precious.read_text() == "five years of work"


def test_a_lock_name_that_is_not_a_plain_file_is_refused_without_waiting(out):
    os.mkfifo(out / ".lock.part-0-of-2")  # opening a FIFO would block for a writer: O_NONBLOCK refuses at once
    refused = pytest.raises(UserError, match=r"\.lock\.part-0-of-2 is not a plain file")
    with refused, folder_lock(out, "inference part 0/2", name=".lock.part-0-of-2"):
        pass


def test_a_plain_lock_file_is_still_reused_run_after_run(out):
    for purpose in ("first run", "second run"):
        with folder_lock(out, purpose):
            assert (out / ".lock").read_text() == f"{purpose} (process {os.getpid()})\n"
    assert stat.S_ISREG((out / ".lock").lstat().st_mode)


def test_an_output_name_that_is_a_link_is_replaced_by_the_file_and_the_target_kept(out, precious):
    """rename(2) replaces the directory entry: the link goes, the file it pointed to stays as it was."""
    (out / "summary.json").symlink_to(precious)
    atomic_write_text(out / "summary.json", "{}\n")
    assert not (out / "summary.json").is_symlink() and (out / "summary.json").read_text() == "{}\n"
    assert precious.read_text() == "five years of work"


def test_a_temporary_name_taken_by_a_link_is_skipped_not_opened(out, precious, monkeypatch):
    """The temporary's random part is drawn again when its name exists (O_EXCL), whatever is there."""
    draws = iter(["aaaa1111", "bbbb2222"])
    monkeypatch.setattr("btcv_unetr.files.secrets.token_hex", lambda _: next(draws))
    (out / ".case_seg.nii.gz.aaaa1111.tmp.nii.gz").symlink_to(precious)
    with atomic_path(out / "case_seg.nii.gz") as tmp:
        assert tmp.name == ".case_seg.nii.gz.bbbb2222.tmp.nii.gz" and stat.S_ISREG(tmp.lstat().st_mode)
        tmp.write_bytes(b"mask")
    assert (out / "case_seg.nii.gz").read_bytes() == b"mask"
    assert precious.read_text() == "five years of work"


def test_an_output_name_that_is_a_folder_is_refused_in_one_line(out):
    (out / "case_overlay.png").mkdir()
    (out / "case_overlay.png" / "inside.txt").write_text("kept")
    with pytest.raises(UserError) as caught:
        atomic_write_text(out / "case_overlay.png", "png")
    assert str(caught.value) == f"{out}/case_overlay.png is a folder: remove it, or write to another name"
    assert (out / "case_overlay.png" / "inside.txt").read_text() == "kept"
    assert sorted(p.name for p in out.iterdir()) == ["case_overlay.png"]  # no temporary left


def test_clean_up_removes_plain_temporaries_only(out, precious):
    (out / ".model.pt.ab12.tmp.pt").write_text("half a checkpoint")
    (out / ".metrics.csv.cd34.tmp.csv").symlink_to(precious)
    (out / ".summary.json.ef56.tmp.json").mkdir()
    assert remove_stale_temporaries(out) == [out / ".model.pt.ab12.tmp.pt"]
    assert (out / ".metrics.csv.cd34.tmp.csv").is_symlink() and (out / ".summary.json.ef56.tmp.json").is_dir()
    assert precious.read_text() == "five years of work"


def test_inference_refuses_an_output_folder_whose_lock_is_a_link(out, precious, tmp_path):
    """The report's case, through the run: refused before any model loads, the linked file untouched."""
    (out / ".lock").symlink_to(precious)
    (tmp_path / "scan.nii.gz").write_bytes(b"never read")
    config = tiny_config(infer={"input": str(tmp_path / "scan.nii.gz"), "output_dir": str(out)})
    with pytest.raises(UserError, match=r"out/\.lock is a symbolic link"):
        run_inference(config)
    assert precious.read_text() == "five years of work"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
