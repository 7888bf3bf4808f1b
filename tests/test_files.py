"""btcv_unetr.files: atomic writes leave the old file or the new one, never part of one; folder locks refuse a
second holder in one line and free the folder when released."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from btcv_unetr.errors import UserError
from btcv_unetr.files import (
    TEMPORARY_GLOB,
    atomic_path,
    atomic_save_nifti,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    remove_stale_temporaries,
)


def _fail_half_way(tmp: Path) -> None:
    tmp.write_text("half of the new")
    raise OSError("disk full")


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.csv"
    path.write_text("the old report")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, _fail_half_way)
    assert path.read_text() == "the old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


def test_a_write_that_fails_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(OSError):
        atomic_write(tmp_path / "sub" / "new.txt", _fail_half_way)
    assert list((tmp_path / "sub").iterdir()) == []  # the folder was made, nothing is in it


def test_the_temporary_is_hidden_beside_the_file_and_keeps_its_full_suffix(tmp_path):
    """Writers that choose the format by the extension (nibabel: .nii.gz is compressed) see the real one; the
    name is one that remove_stale_temporaries recognises as this file's."""
    path = tmp_path / "case_seg.nii.gz"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".case_seg.nii.gz.") and tmp.name.endswith(".nii.gz")
        assert tmp in tmp_path.glob(TEMPORARY_GLOB)
        assert not path.exists()  # nothing at the final name until the block succeeds
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and not list(tmp_path.glob(TEMPORARY_GLOB))


def test_text_json_and_nifti_writers_replace_the_file_whole(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "second"
    atomic_write_json(tmp_path / "s.json", {"dice": 0.5, "organs": ["spleen"]})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"dice": 0.5, "organs": ["spleen"]} and text.endswith("}\n")
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    atomic_save_nifti(nib.Nifti1Image(labels, affine), tmp_path / "m.nii.gz")
    stored = nib.load(tmp_path / "m.nii.gz")
    assert (tmp_path / "m.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the suffix says
    assert np.array_equal(np.asarray(stored.dataobj), labels) and np.allclose(stored.affine, affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.nii.gz", "s.json"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    keep = ["model.pt", ".hidden", ".model.pt.notes", "x.tmp"]
    stale = [".model.pt.ab_12.tmp.pt", ".summary.json.k9x_q.tmp.json"]
    for name in keep + stale:
        (tmp_path / name).write_text(name)
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_second_holder_is_refused_in_one_line_naming_the_first(tmp_path):
    with folder_lock(tmp_path, "a training run"):
        assert (tmp_path / ".lock").read_text() == f"a training run (process {os.getpid()})\n"
        with pytest.raises(UserError) as refused, folder_lock(tmp_path, "inference"):
            pass
        message = str(refused.value)
        assert message == (f"{tmp_path} is in use by a training run (process {os.getpid()}): wait for it to finish, "
                           "or choose another folder")
        assert "\n" not in message
        assert (tmp_path / ".lock").read_text().startswith("a training run")  # the refused one wrote nothing
    with folder_lock(tmp_path, "inference"):  # released: free for the next
        assert (tmp_path / ".lock").read_text().startswith("inference (process")


def test_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path):
    with folder_lock(tmp_path, "part 0/2", shared=True), folder_lock(tmp_path, "part 1/2", shared=True):
        with pytest.raises(UserError, match="is in use by part 1/2"), folder_lock(tmp_path, "a whole run"):
            pass
    with folder_lock(tmp_path, "a whole run"):
        with pytest.raises(UserError, match="is in use by a whole run"), folder_lock(tmp_path, "part", shared=True):
            pass
        with folder_lock(tmp_path, "part 0/2", name=".lock.part-0"):  # another lock file: its own
            pass


def test_a_folder_whose_lock_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()  # unwritable for any user, root included (a read-only folder is not, for root)
    with pytest.raises(UserError) as refused, folder_lock(tmp_path, "a training run"):
        pass
    assert str(refused.value) == f"{tmp_path}: cannot be written (Is a directory): choose another folder"
