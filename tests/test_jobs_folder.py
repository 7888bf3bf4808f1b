"""The service's jobs folder (issue 22): only what the service created is ever removed; a folder holding anything
else is refused in one line at start-up, before anything in it is changed (no spool folder made, no chmod)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_config

from btcv_unetr.errors import UserError
from btcv_unetr.serve.jobs import MARKER, RECORD, SPOOL, JobStore, open_jobs_folder
from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.testing.server import free_port


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): relative name -> file content, ``<dir>`` or ``-> target``."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            tree[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            tree[name] = "<dir>"
        else:
            tree[name] = path.read_text()
    return tree


def _user_folder(root: Path) -> Path:
    """The folder of the report: an experiment's model and notes, readable by the group (0750)."""
    (root / "experiment1").mkdir(parents=True)
    (root / "experiment1" / "model.pt").write_text("weights")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("finish the paper")
    root.chmod(0o750)
    return root


def _service_job(root: Path, job_id: str, record: bool = True) -> Path:
    """A job folder as the service leaves it: marked, with a record unless an upload was cut short."""
    folder = root / job_id
    folder.mkdir(parents=True, mode=0o700)
    (folder / MARKER).touch()
    if record:
        (folder / RECORD).write_text(json.dumps({
            "id": job_id, "name": "scan", "kind": "nifti", "input": "input.nii.gz", "shape": [4, 4, 4],
            "spacing": [1.0, 1.0, 1.0], "state": "queued"}))
    return folder


def _refused(root: Path) -> str:
    with pytest.raises(UserError) as caught:
        JobStore(root, keep_jobs=10, keep_hours=1).open()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_folder_of_the_users_own_files_is_refused_and_left_exactly_as_it_was(tmp_path):
    root = _user_folder(tmp_path / "jobs")
    before = _tree(root)
    assert _refused(root) == (f"--jobs_dir {root} holds files that are not this service's jobs ('experiment1', "
                               "'notes'): choose an empty or new folder; the service never removes what it did "
                               "not create")
    assert _tree(root) == before and not (root / SPOOL).exists()
    assert stat.S_IMODE(root.stat().st_mode) == 0o750  # not made private: it is not the service's


def test_one_foreign_file_among_real_jobs_refuses_the_folder_and_keeps_the_jobs(tmp_path):
    root = tmp_path / "jobs"
    waiting = _service_job(root, "a" * 32)
    (root / "readme.txt").write_text("mine")
    root.chmod(0o700)
    before = _tree(root)
    assert "('readme.txt')" in _refused(root)
    assert _tree(root) == before and (waiting / RECORD).is_file()


def test_links_are_foreign_even_to_marked_job_folders(tmp_path):
    """A link to another server's job folder (or to a folder of the user's holding a marker file) must not have
    that folder removed as an unfinished job; a marker that is a link does not mark a folder."""
    elsewhere = tmp_path / "other_jobs"
    theirs = _service_job(elsewhere, "b" * 32, record=False)  # would be removed as "cut short" if followed
    root = tmp_path / "jobs"
    root.mkdir(mode=0o700)
    (root / ("c" * 32)).symlink_to(theirs, target_is_directory=True)
    faked = root / ("d" * 32)
    faked.mkdir()
    (faked / MARKER).symlink_to(theirs / MARKER)
    message = _refused(root)
    assert f"('{'c' * 32}', '{'d' * 32}')" in message
    assert (theirs / MARKER).is_file() and faked.is_dir()


def test_a_spool_that_is_a_link_or_holds_folders_is_refused_and_nothing_in_it_removed(tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "letter.txt").write_text("dear")
    root = tmp_path / "jobs"
    root.mkdir(mode=0o700)
    (root / SPOOL).symlink_to(documents, target_is_directory=True)
    assert f"('{SPOOL}')" in _refused(root)
    assert (documents / "letter.txt").read_text() == "dear"

    (root / SPOOL).unlink()
    (root / SPOOL).mkdir()
    (root / SPOOL / "upload.part").write_text("half an upload")
    (root / SPOOL / "kept").mkdir()
    assert f"('{SPOOL}/kept')" in _refused(root)
    assert (root / SPOOL / "upload.part").is_file()  # refused before any clean-up


def test_only_the_services_own_leftovers_are_removed(tmp_path):
    """What a killed server leaves, in a folder of nothing else: a job cut short (marked, no record) and a spooled
    upload are removed; a queued job is kept and handed back to run."""
    root = tmp_path / "jobs"
    cut_short = _service_job(root, "e" * 32, record=False)
    _service_job(root, "f" * 32)
    (root / SPOOL).mkdir()
    (root / SPOOL / "upload.part").write_text("half an upload")
    root.chmod(0o700)
    removed, waiting = JobStore(root, keep_jobs=10, keep_hours=1).open()
    assert removed == ["e" * 32] and [job.id for job in waiting] == ["f" * 32]
    assert not cut_short.exists() and list((root / SPOOL).iterdir()) == []


def test_a_new_jobs_folder_is_created_private_with_its_spool(tmp_path):
    root = tmp_path / "new" / "jobs"
    open_jobs_folder(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and (root / SPOOL).is_dir()
    assert sorted(p.name for p in root.iterdir()) == [SPOOL]


def test_serve_refuses_such_a_folder_at_start_up_in_one_line(tmp_path, capsys, serve_sandbox):
    """The command, before any model loads: exit 2, one line, the folder untouched (through ``cli.main``; the
    real ``python -m btcv_unetr serve`` process is tests/test_serve_limits.py's signal test)."""
    pytest.importorskip("uvicorn")  # the serve extra
    from btcv_unetr import cli
    checkpoint = seeded_checkpoint(tmp_path / "run" / "model.pt", tiny_config())
    root = _user_folder(tmp_path / "jobs")
    before = _tree(root)
    capsys.readouterr()
    argv = ["serve", "--checkpoint", str(checkpoint), "--jobs_dir", str(root), "--port", str(free_port()),
            "--device", "cpu"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [(f"error: --jobs_dir {root} holds files that are not this service's jobs "
                                 "('experiment1', 'notes'): choose an empty or new folder; the service "
                                 "never removes what it did not create")] and "Traceback" not in out
    assert _tree(root) == before and stat.S_IMODE(root.stat().st_mode) == 0o750
