"""``btcv-unetr serve`` on a shared server: hostile uploads refused from their headers, running jobs
cancelled or timed out, a clean stop on SIGINT/SIGTERM, and a private jobs folder.

Each test talks to a real uvicorn process on loopback (tests/serving.py) with httpx or a raw socket.
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
from serving import running_server, tiny_checkpoint
from test_serve import _dicom_zip, _submit, _wait

from btcv_unetr.testing.server import declared_nifti_gz, free_port, wait_until_healthy

# A job of about ten thousand windows of the tiny model (minutes): it is certainly still running when a
# test cancels it or stops its server, however fast the machine. 150 voxels at 4 mm is 600 mm: a body's size.
LONG_SCAN_SHAPE, LONG_SCAN_MM = (150, 150, 150), 4.0
LONG_JOB_FLAGS = ("--infer_overlap", "0.9")


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
def long_scan() -> bytes:
    return declared_nifti_gz(LONG_SCAN_SHAPE, (LONG_SCAN_MM,) * 3, fill=-1000)


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> tuple[str, Path]:
    """Small limits (1 GB of job memory, 6 million voxels, 4 DICOM files) and long jobs."""
    folder = tmp_path_factory.mktemp("limited")
    flags = ("--max_job_memory_gb", "1", "--max_voxels", "6e6", "--max_dicom_files", "4", *LONG_JOB_FLAGS)
    with running_server(tiny_checkpoint(folder / "run"), folder / "jobs", *flags) as url:
        yield url, folder / "jobs"


def _refused(url: str, content: bytes, name: str, status: int) -> str:
    started = time.time()
    response = _submit(url, content=content, name=name)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and detail.startswith(name.split(".")[0]) and "/tmp" not in detail
    assert not [j for j in httpx.get(f"{url}/jobs").json()["jobs"] if j["created"] >= started]  # never queued
    return detail


def test_a_gigavoxel_nifti_of_one_megabyte_is_refused_from_its_header(limited):
    url, _ = limited
    bomb = declared_nifti_gz((1024, 1024, 512), (1.0, 1.0, 1.0))
    assert len(bomb) < 2 * 2**20  # about 1 MB on the wire
    detail = _refused(url, bomb, "bomb.nii.gz", 413)
    assert "1024 x 1024 x 512 voxels (537 million)" in detail and "--max_voxels 6 million" in detail
    # Within the voxel limit but wider than a CT's field of view (1 m across): the header's spacing is wrong.
    wide = _refused(url, declared_nifti_gz((100, 100, 100), (10.0, 10.0, 1.0)), "wide.nii.gz", 413)
    assert "field of view of 1000 x 1000 x 100 mm" in wide and "--max_extent_mm 800,800,2200" in wide
    # Within both, but its job would need more memory than this server allows (the model's 6 mm grid over
    # 78 x 78 x 204 cm: 5.7 million voxels of 14 classes).
    heavy = _refused(url, declared_nifti_gz((130, 130, 340), (6.0, 6.0, 6.0)), "heavy.nii.gz", 413)
    assert "would need about" in heavy and "--max_job_memory_gb 1.0" in heavy
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_short_voxel_data_and_nan_volumes_are_refused_at_upload(limited):
    url, _ = limited
    short = _refused(url, declared_nifti_gz((32, 32, 32), (6.0,) * 3, data_bytes=1000), "short.nii.gz", 400)
    assert "holds 1000 bytes of voxels where its header declares 65536" in short
    plain = nib.Nifti1Image(np.zeros((32, 32, 32), np.int16), np.diag([6.0, 6.0, 6.0, 1.0])).to_bytes()
    cut = _refused(url, plain[:20000], "cut.nii", 400)
    assert "cut short" in cut
    nan = _refused(url, declared_nifti_gz((32, 32, 32), (6.0,) * 3, np.float32, fill=np.nan), "nan.nii.gz", 400)
    assert "32768 NaN or infinite voxels" in nan


def test_dicom_zips_are_sized_from_their_directory_and_headers(limited, scan, tmp_path):
    url, _ = limited
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        for k in range(5):
            archive.writestr(f"{k}.dcm", b"x")
    detail = _refused(url, many.getvalue(), "many.zip", 413)
    assert "holds 5 files, over this server's --max_dicom_files 4" in detail
    # Four slices whose headers declare 1300 x 1300 pixels: 6.8 million voxels, over --max_voxels.
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((1300, 1300, 4), np.int16), np.diag([0.5, 0.5, 2.0, 1.0])), big)
    detail = _refused(url, _dicom_zip(big), "big.zip", 413)
    assert "1300 x 1300 x 4 voxels" in detail and "--max_voxels" in detail


def test_a_picture_is_sized_from_its_header_before_it_is_decoded(picture_server):
    detail = _refused(picture_server, declared_png(20000, 20000), "huge.png", 413)
    assert "20000 x 20000 pixels (400.0 megapixels)" in detail and "--max_pixels 64 megapixels" in detail


def _running(url: str, job_id: str, headers: dict | None = None, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", headers=headers).json()
        if job["state"] == "running" and job["windows_done"] > 0:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start in {timeout} s")


def test_a_running_job_is_cancelled_by_delete_and_the_worker_goes_on(limited, long_scan, scan):
    url, jobs_dir = limited
    job = _submit(url, content=long_scan, name="long.nii.gz").json()
    running = _running(url, job["id"])
    assert running["windows_total"] > 5000  # minutes of work: it cannot be done before the DELETE lands
    assert httpx.delete(f"{url}/jobs/{job['id']}", timeout=60).status_code in (202, 204)
    deadline = time.time() + 60
    while httpx.get(f"{url}/jobs/{job['id']}").status_code != 404:
        assert time.time() < deadline, "the cancelled job was not removed"
        time.sleep(0.05)
    assert not (jobs_dir / job["id"]).exists()
    assert _wait(url, _submit(url, scan).json()["id"])["state"] == "done"


def test_a_job_over_its_time_limit_fails_with_the_reason(tmp_path, long_scan, scan):
    with running_server(tiny_checkpoint(tmp_path / "run"), tmp_path / "jobs", "--job_timeout_s", "1",
                        *LONG_JOB_FLAGS) as url:
        first = _submit(url, content=long_scan, name="long.nii.gz").json()
        second = _submit(url, scan).json()
        failed = _wait(url, first["id"])
        assert failed["state"] == "failed" and "time limit of 1 s (--job_timeout_s)" in failed["error"]
        assert failed["windows_done"] < failed["windows_total"]
        assert _wait(url, second["id"])["state"] in ("done", "failed")  # the worker took the next job


def _serve(checkpoint: Path, jobs_dir: Path, log: Path, env: dict | None = None, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "btcv_unetr", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--precision", "fp32", "--device", "cpu", *flags] + (["--jobs_dir", str(jobs_dir)] if jobs_dir else [])
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, url, log)
    return process, url


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_server_cleanly_and_keeps_the_queued_jobs(tmp_path, long_scan, stop):
    checkpoint, jobs_dir, log = tiny_checkpoint(tmp_path / "run"), tmp_path / "jobs", tmp_path / "server.log"
    process, url = _serve(checkpoint, jobs_dir, log, None, *LONG_JOB_FLAGS)
    try:
        ids = [_submit(url, content=long_scan, name=f"long{k}.nii.gz").json()["id"] for k in range(2)]
        _running(url, ids[0])
        process.send_signal(stop)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        process.kill()
    text = log.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text
    assert "2 queued job(s) kept: they run at the next start" in text
    process, url = _serve(checkpoint, jobs_dir, tmp_path / "again.log", None, *LONG_JOB_FLAGS)
    try:
        states = {i: httpx.get(f"{url}/jobs/{i}").json()["state"] for i in ids}
        assert states[ids[0]] in ("queued", "running") and states[ids[1]] == "queued"
        assert "job(s) kept from the last stop are queued again" in (tmp_path / "again.log").read_text()
    finally:
        process.kill()


def test_the_default_jobs_folder_is_private_and_under_the_users_data_folder(tmp_path, scan):
    data_home = tmp_path / "data"
    process, url = _serve(tiny_checkpoint(tmp_path / "run"), None, tmp_path / "server.log",
                          {"XDG_DATA_HOME": str(data_home)})
    try:
        job = _wait(url, _submit(url, scan).json()["id"])
        assert job["state"] == "done"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    root = data_home / "btcv-unetr" / "jobs"
    folder = root / job["id"]
    assert (root.stat().st_mode & 0o777) == 0o700 and (folder.stat().st_mode & 0o777) == 0o700
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path  # nothing readable by others
    assert (folder / "input.nii.gz").read_bytes() == scan.read_bytes()


def test_a_jobs_folder_others_can_write_or_holding_other_files_is_refused(tmp_path, capsys):
    from btcv_unetr import cli
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    argv = ["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(free_port())]
    assert cli.main([*argv, "--jobs_dir", str(shared)]) == 2
    err = capsys.readouterr().err
    assert "can be written by other users" in err and err.count("\n") == 1
    mine = tmp_path / "mine"
    (mine / "experiment1").mkdir(parents=True)
    (mine / "experiment1" / "model.pt").write_bytes(b"weights")
    mine.chmod(0o700)
    assert cli.main([*argv, "--jobs_dir", str(mine)]) == 2
    assert "holds files that are not this service's jobs ('experiment1')" in capsys.readouterr().err
    assert (mine / "experiment1" / "model.pt").read_bytes() == b"weights"
