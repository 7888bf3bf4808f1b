"""``btcv-unetr serve``'s limits and stops: hostile uploads refused from their headers, running jobs cancelled or
timed out (on serve's application in the test's process, its worker held: btcv_unetr.testing.app), a clean stop on
SIGTERM that keeps the queued jobs (a real ``btcv-unetr serve`` process: the signal is the point; the repeat of
SIGINT/SIGTERM that uvicorn raises after its stop, in-process),
and a private default jobs folder.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from serving import HELD_WORKER, tiny_checkpoint
from test_serve import _dicom_zip, _submit, _wait

from btcv_unetr.testing.app import held_jobs, in_process_service
from btcv_unetr.testing.server import declared_nifti_gz, free_port, wait_until_healthy


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGB pixels but whose data holds two rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * (2 * (3 * width + 1)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def scan(phantom_dir) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def limited(tmp_path_factory, checkpoint):
    """Small limits (1 GB of job memory, 6 million voxels, 4 DICOM files); its jobs folder is
    ``limited.service.settings.jobs_dir``."""
    folder = tmp_path_factory.mktemp("limited")
    flags = ("--max_job_memory_gb", "1", "--max_voxels", "6e6", "--max_dicom_files", "4")
    with in_process_service(checkpoint, folder / "jobs", *flags) as client:
        yield client


def _refused(client, content: bytes, name: str, status: int) -> str:
    before = {job["id"] for job in client.get("/jobs").json()["jobs"]}
    response = _submit(client, content=content, name=name)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and detail.startswith(name.split(".")[0]) and "/tmp" not in detail
    assert {job["id"] for job in client.get("/jobs").json()["jobs"]} == before  # never queued
    return detail


def test_a_gigavoxel_nifti_of_one_megabyte_is_refused_from_its_header(limited):
    bomb = declared_nifti_gz((1024, 1024, 512), (1.0, 1.0, 1.0))
    assert len(bomb) < 2 * 2**20  # about 1 MB on the wire
    detail = _refused(limited, bomb, "bomb.nii.gz", 413)
    assert "1024 x 1024 x 512 voxels (537 million)" in detail and "--max_voxels 6 million" in detail
    # Within the voxel limit but wider than a CT's field of view (1 m across): the header's spacing is wrong.
    wide = _refused(limited, declared_nifti_gz((100, 100, 100), (10.0, 10.0, 1.0)), "wide.nii.gz", 413)
    assert "field of view of 1000 x 1000 x 100 mm" in wide and "--max_extent_mm 800,800,2200" in wide
    # Within both, but its job would need more memory than this server allows (the model's 6 mm grid over
    # 78 x 78 x 204 cm: 5.7 million voxels of 14 classes).
    heavy = _refused(limited, declared_nifti_gz((130, 130, 340), (6.0, 6.0, 6.0)), "heavy.nii.gz", 413)
    assert "would need about" in heavy and "--max_job_memory_gb 1.0" in heavy
    assert limited.get("/health").json() == {"status": "ok"}


def test_short_voxel_data_and_nan_volumes_are_refused_at_upload(limited):
    short = _refused(limited, declared_nifti_gz((32, 32, 32), (6.0,) * 3, data_bytes=1000), "short.nii.gz", 400)
    assert "holds 1000 bytes of voxels where its header declares 65536" in short
    plain = nib.Nifti1Image(np.zeros((32, 32, 32), np.int16), np.diag([6.0, 6.0, 6.0, 1.0])).to_bytes()
    cut = _refused(limited, plain[:20000], "cut.nii", 400)
    assert "cut short" in cut
    nan = _refused(limited, declared_nifti_gz((32, 32, 32), (6.0,) * 3, np.float32, fill=np.nan), "nan.nii.gz", 400)
    assert "32768 NaN or infinite voxels" in nan


def test_dicom_zips_are_sized_from_their_directory_and_headers(limited, scan, tmp_path):
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for k in range(5):
            archive.writestr(f"{k}.dcm", b"x")
    detail = _refused(limited, many.getvalue(), "many.zip", 413)
    assert "holds 5 files, over this server's --max_dicom_files 4" in detail
    # Four slices whose headers declare 1300 x 1300 pixels: 6.8 million voxels, over --max_voxels.
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((1300, 1300, 4), np.int16), np.diag([0.5, 0.5, 2.0, 1.0])), big)
    detail = _refused(limited, _dicom_zip(big), "big.zip", 413)
    assert "1300 x 1300 x 4 voxels" in detail and "--max_voxels" in detail


def test_a_picture_is_sized_from_its_header_before_it_is_decoded(picture_service):
    detail = _refused(picture_service, declared_png(20000, 20000), "huge.png", 413)
    assert "20000 x 20000 pixels (400.0 megapixels)" in detail and "--max_pixels 64 megapixels" in detail


def test_a_running_job_is_cancelled_by_delete_and_the_worker_goes_on(limited, scan):
    """The job is held in "running" before its first window: it cannot be done before the DELETE lands."""
    jobs_dir = limited.service.settings.jobs_dir
    with held_jobs(limited.service):
        job = _submit(limited, scan).json()
        running = _wait(limited, job["id"], states=("running",))
        assert running["windows_done"] == 0 and (jobs_dir / job["id"]).is_dir()
        assert limited.delete(f"/jobs/{job['id']}").status_code in (202, 204)
        deadline = time.time() + 60
        while limited.get(f"/jobs/{job['id']}").status_code != 404:
            assert time.time() < deadline, "the cancelled job was not removed"
            time.sleep(0.05)
        assert not (jobs_dir / job["id"]).exists()
    assert _wait(limited, _submit(limited, scan).json()["id"])["state"] == "done"


def test_a_job_over_its_time_limit_fails_with_the_reason(tmp_path, checkpoint, scan):
    """The job is held running past its second: it fails with the reason (its time counts from its start), no
    window done, no mask; the worker then takes the next job."""
    with in_process_service(checkpoint, tmp_path / "jobs", "--job_timeout_s", "1") as client:
        with held_jobs(client.service):
            first = _submit(client, scan).json()
            failed = _wait(client, first["id"])  # the limit counts from the job's start: it ran, held
        assert failed["state"] == "failed" and "time limit of 1 s (--job_timeout_s)" in failed["error"]
        assert failed["windows_done"] == 0 and client.get(f"/jobs/{first['id']}/mask").status_code != 200
        # The worker took the next job (it ends either way: within its second, or at its own limit on a busy machine).
        assert _wait(client, _submit(client, scan).json()["id"])["state"] in ("done", "failed")


def _serve(checkpoint: Path, jobs_dir: Path, log: Path, hold: Path) -> tuple[subprocess.Popen, str]:
    """The installed ``btcv-unetr`` console script's ``serve`` (the suite's one child process of the script: its
    wiring), its worker held while ``hold`` exists (tests/held_worker/sitecustomize.py)."""
    port = free_port()
    argv = [str(Path(sys.executable).with_name("btcv-unetr")), "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--precision", "fp32", "--device", "cpu", "--jobs_dir", str(jobs_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BTCV_UNETR_TEST_HOLD": str(hold),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(HELD_WORKER), os.environ.get("PYTHONPATH"))))}
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, url, log)
    return process, url


def _stopped_cleanly(process: subprocess.Popen, stop: signal.Signals, log: Path) -> str:
    """Send ``stop``; the server must exit with status 0, without a traceback. Returns its log."""
    process.send_signal(stop)
    assert process.wait(timeout=60) == 0, log.read_text(encoding="utf-8", errors="replace")
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "terminate called" not in text and "Traceback" not in text, text
    return text


def test_sigterm_stops_the_server_cleanly_and_the_next_start_runs_the_kept_jobs(tmp_path, checkpoint, scan,
                                                                                capsys):
    """One job held running and one waiting when SIGTERM comes (what a service manager or ``docker stop`` sends):
    exit status 0, no traceback, both kept. The next start (in-process) queues them again and runs both."""
    jobs_dir, hold = tmp_path / "jobs", tmp_path / "hold"
    hold.touch()
    process, url = _serve(checkpoint, jobs_dir, tmp_path / "served.log", hold)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            ids = [_submit(client, scan, name=f"scan{k}.nii.gz").json()["id"] for k in range(2)]
            _wait(client, ids[0], states=("running",))
            assert client.get(f"/jobs/{ids[1]}").json()["state"] == "queued"
        text = _stopped_cleanly(process, signal.SIGTERM, tmp_path / "served.log")
    finally:
        process.kill()
        process.wait()
    assert "2 queued job(s) kept: they run at the next start" in text
    capsys.readouterr()
    with in_process_service(checkpoint, jobs_dir) as client:
        assert "2 job(s) kept from the last stop are queued again" in capsys.readouterr().out
        assert [_wait(client, i)["state"] for i in ids] == ["done", "done"]
        assert client.get(f"/jobs/{ids[1]}/mask").status_code == 200


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_signal_uvicorn_repeats_after_its_stop_does_not_end_the_process(stop, capsys):
    """uvicorn stops on Ctrl-C (SIGINT) or SIGTERM, then raises the signal again once it has stopped (SIGINT would
    end the process in a KeyboardInterrupt traceback, SIGTERM by the signal): serve's handlers swallow the
    repeat, so a requested stop exits 0 (the real signal on a real server: the test above)."""
    from btcv_unetr.serve.command import serve_until_signal

    class Server:
        def __init__(self, config):
            self.config = config

        def run(self):
            print(f"serving on {self.config.port}")
            signal.raise_signal(stop)  # the repeat, delivered to whatever handler is in place

    class FakeUvicorn:
        @staticmethod
        def Config(app, **settings):
            return type("Settings", (), settings)

    FakeUvicorn.Server = Server
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    serve_until_signal(FakeUvicorn, None, "127.0.0.1", 8123)  # returns: no KeyboardInterrupt, not killed
    assert capsys.readouterr().out == "serving on 8123\n"
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the process's handlers are back


def test_the_default_jobs_folder_is_private_and_under_the_users_data_folder(tmp_path, checkpoint, scan, monkeypatch):
    data_home = tmp_path / "data"
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    with in_process_service(checkpoint, None) as client:  # no --jobs_dir
        job = _wait(client, _submit(client, scan).json()["id"])
        assert job["state"] == "done"
    root = data_home / "btcv-unetr" / "jobs"
    folder = root / job["id"]
    assert (root.stat().st_mode & 0o777) == 0o700 and (folder.stat().st_mode & 0o777) == 0o700
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path  # nothing readable by others
    assert (folder / "input.nii.gz").read_bytes() == scan.read_bytes()


def test_a_jobs_folder_others_can_write_is_refused(tmp_path, capsys, serve_sandbox):
    """(A folder holding other files: the fault corpus and tests/test_jobs_folder.py.)"""
    from btcv_unetr import cli
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    argv = ["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(free_port())]
    assert cli.main([*argv, "--jobs_dir", str(shared)]) == 2
    err = capsys.readouterr().err
    assert "can be written by other users" in err and err.count("\n") == 1
