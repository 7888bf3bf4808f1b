"""``btcv-unetr serve``'s routes, uploads, refusals, job states and retention, on serve's own application in the
test's process (btcv_unetr.testing.app: the request gate, the queue and the worker exactly as the server runs them),
talked to with the httpx client API; and the one thing only a real uvicorn process on a loopback port shows: the gate
answers 401, 413 and 503 from the headers, while the body is still unsent (raw sockets).

In-process services: a default one (round trips, DICOM, bad inputs, concurrency), a strict one of each test's own
(token, small upload limits, a queue of one, retention of two jobs, a worker the test holds) and a 2D one (pictures).
The real server is the session's one (tests/conftest.py ``real_server``), shared with the browser tests.
The helpers take a client (``httpx.Client`` API), so they serve a real server too: ``httpx.Client(base_url=url)``.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import socket
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from serving import tiny_checkpoint

from btcv_unetr.serve.jobs import MARKER
from btcv_unetr.testing.app import held_jobs, in_process_service

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A token, 0.2 MB uploads (0.1 MB for /segment), one waiting job at most, two finished jobs kept for an hour.
STRICT_FLAGS = ("--token", TOKEN, "--max_upload_mb", "0.2", "--sync_max_mb", "0.1", "--workers_queue", "1",
                "--keep_jobs", "2", "--keep_hours", "1")


@pytest.fixture(scope="module")
def scan(phantom_dir) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    """The default service, shared by the module's tests: each counts only the jobs it submitted itself."""
    with in_process_service(checkpoint, tmp_path_factory.mktemp("served") / "jobs") as client:
        yield client


@pytest.fixture
def strict(tmp_path, checkpoint):
    """A strict service of the test's own, its jobs folder empty: what it counts (the queue, the jobs kept) is
    only what the test did; ``held_jobs(strict.service)`` holds its worker."""
    with in_process_service(checkpoint, tmp_path / "jobs", *STRICT_FLAGS) as client:
        yield client


def _stale_jobs(jobs_dir: Path, scan: Path) -> dict[str, Path]:
    """Folders a stopped server could leave: a job that ran when it died, a job a clean stop kept queued,
    an upload cut short, a job past the retention age, and one recent finished job that must survive."""
    records = {"unfinished": {"state": "running", "finished": None},
               "queued": {"state": "queued", "finished": None},
               "expired": {"state": "done", "finished": time.time() - 3 * 3600},
               "recent": {"state": "done", "finished": time.time() - 60}}
    folders = {}
    for label, fields in records.items():
        job_id = f"{label:0<32}"[:32]
        folders[label] = jobs_dir / job_id
        folders[label].mkdir(parents=True, mode=0o700)
        (folders[label] / MARKER).touch()
        (folders[label] / "input.nii.gz").write_bytes(scan.read_bytes())
        record = {"id": job_id, "name": label, "kind": "nifti", "input": "input.nii.gz", "shape": [4, 4, 4],
                  "spacing": [1.0, 1.0, 1.0], "created": time.time() - 4 * 3600, **fields}
        (folders[label] / "job.json").write_text(json.dumps(record))
    folders["no_record"] = jobs_dir / ("f" * 32)
    folders["no_record"].mkdir()
    (folders["no_record"] / MARKER).touch()
    (folders["no_record"] / "upload.part").write_bytes(b"half an upload")
    jobs_dir.chmod(0o700)
    return folders


def _submit(client, path: Path | None = None, content: bytes | None = None, name: str = "scan.nii.gz",
            headers: dict | None = None, route: str = "/jobs") -> httpx.Response:
    content = path.read_bytes() if content is None else content
    return client.post(route, files={"file": (name, content)}, headers=headers)


def _wait(client, job_id: str, headers: dict | None = None, timeout: float = 120,
          states: tuple[str, ...] = ("done", "failed")) -> dict:
    """The job's record once its state is one of ``states`` (by default: finished); ``timeout`` only bounds a
    test that went wrong."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {' or '.join(states)} in {timeout} s")


def _nifti_bytes(array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    return gzip.compress(image.to_bytes(), mtime=0)


def test_command_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys, serve_sandbox):
    from btcv_unetr.testing.server import free_port

    from btcv_unetr import cli
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == f"error: serve: checkpoint not found: {tmp_path / 'missing.pt'}"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: serve: cannot listen on 127.0.0.1:{port}") and "choose another --port" in err
    assert err.count("\n") == 1


def test_health_and_info_describe_the_model(server):
    assert server.get("/health").json() == {"status": "ok"}
    info = server.get("/info").json()
    assert info["spatial_dims"] == 3 and info["roi_size"] == [32, 32, 32] and info["precision"] == "fp32"
    assert [c["index"] for c in info["classes"]] == list(range(14))
    assert info["classes"][1]["name"] == "spleen" and info["classes"][1]["color"] == [220, 20, 60]
    assert info["spacing"] == [6.0, 6.0, 6.0] and info["inputs"] == [".nii", ".nii.gz", ".zip"]


def test_a_scan_round_trip_gives_a_mask_in_its_own_geometry(server, scan, tmp_path):
    """202 at once, then done with every window counted; mask, volumes and overlay agree."""
    response = _submit(server, scan, name="../../etc/passwd Case 7.nii.gz")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and job["name"] == "passwd_Case_7"
    original = nib.load(scan)
    assert job["shape"] == list(original.shape)
    done = _wait(server, job["id"])
    assert done["state"] == "done" and done["progress"] == 1.0, done
    assert done["windows_total"] > 0 and done["windows_done"] == done["windows_total"]

    download = server.get(f"/jobs/{job['id']}/mask")
    assert download.status_code == 200
    assert 'filename="passwd_Case_7_seg.nii.gz"' in download.headers["content-disposition"]
    (tmp_path / "mask.nii.gz").write_bytes(download.content)
    mask = nib.load(tmp_path / "mask.nii.gz")
    labels = np.asarray(mask.dataobj)
    assert mask.shape == original.shape and np.allclose(mask.affine, original.affine)
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) <= set(range(14))

    volumes = server.get(f"/jobs/{job['id']}/volumes").json()
    assert volumes["unit"] == "mL" and [o["index"] for o in volumes["organs"]] == list(range(1, 14))
    voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
    for organ in volumes["organs"]:
        assert organ["voxels"] == int((labels == organ["index"]).sum())
        assert organ["volume_ml"] == pytest.approx(organ["voxels"] * voxel_ml, rel=1e-4)

    overlay = server.get(f"/jobs/{job['id']}/overlay.png")
    assert overlay.headers["content-type"] == "image/png" and overlay.content.startswith(b"\x89PNG")


def test_every_result_says_what_made_it(server, scan, tmp_path):
    """The job record, /info and the mask's header carry the version, weights checksum, precision, device,
    overlap and TTA; the same model, input and flags give the same mask bytes."""
    info = server.get("/info").json()
    expected = {"precision": "fp32", "device": "cpu", "overlap": 0.5, "tta": False}
    assert {key: info["provenance"][key] for key in expected} == expected
    assert len(info["provenance"]["weights_sha256"]) == 64 and info["provenance"]["package_version"] == info["version"]
    masks = []
    for _ in range(2):
        job = _wait(server, _submit(server, scan).json()["id"])
        assert job["provenance"] == info["provenance"]
        masks.append(server.get(f"/jobs/{job['id']}/mask").content)
    assert masks[0] == masks[1]
    (tmp_path / "mask.nii.gz").write_bytes(masks[0])
    from btcv_unetr.data.images import mask_provenance
    assert mask_provenance(tmp_path / "mask.nii.gz") == info["provenance"]
    descrip = nib.load(tmp_path / "mask.nii.gz").header["descrip"].tobytes().decode()
    assert info["provenance"]["weights_sha256"][:12] in descrip and "fp32 cpu ov 0.5 tta off" in descrip


def test_the_model_card_and_its_warning_are_in_info(server):
    card = server.get("/info").json()["model_card"]
    # The tests' checkpoint has seeded random weights: the card says so, and the page shows the warning.
    assert card["steps"] == 0 and card["warning"].startswith("WARNING: this model's weights are random")
    assert card["summary"] == card["lines"][0] and card["lines"][-1] == card["warning"]
    assert card["classes"][:2] == ["background", "spleen"] and len(card["classes"]) == 14


def test_volumes_far_outside_the_plausible_range_are_flagged(server, tmp_path):
    """A liver of 1 mL is far too small and a spleen of 648 mL too large (over 640); organs without a range (the
    aorta) or without voxels are never flagged; pictures have no volumes to flag."""
    from btcv_unetr.labels import BTCV_LABELS, PLAUSIBLE_VOLUMES_ML
    from btcv_unetr.serve.worker import organ_volumes
    labels = np.zeros((100, 100, 100), np.uint8)  # 1 mm voxels
    labels[:10, :10, :10] = 6  # liver: 1 mL
    labels[20:, 20:, 10:] = 1  # spleen: 576 mL, within its range ...
    labels[:, :, 80:] = 1  # ... and 72 mL more: 648 mL
    labels[50:60, 50:60, :10] = 8  # aorta
    names = list(BTCV_LABELS[1:])
    volumes = organ_volumes(labels, np.eye(4), names)
    organs = {organ["name"]: organ for organ in volumes["organs"]}
    assert organs["liver"]["flag"] == "low" and organs["liver"]["plausible_ml"] == list(PLAUSIBLE_VOLUMES_ML["liver"])
    assert organs["spleen"]["flag"] == "high" and organs["spleen"]["volume_ml"] == 648.0
    assert organs["aorta"]["flag"] is None and organs["aorta"]["plausible_ml"] is None
    assert organs["pancreas"]["flag"] is None and organs["pancreas"]["voxels"] == 0  # absent: not flagged
    pictures = organ_volumes(labels[:, :, 0], None, names)
    assert all(organ["flag"] is None and organ["plausible_ml"] is None for organ in pictures["organs"])


def _dicom_zip(nifti: Path) -> bytes:
    """The scan as a zipped DICOM series (one CT slice per file, written by SimpleITK/GDCM)."""
    import SimpleITK as sitk
    image = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                  direction[1], direction[4], direction[7]))
    uid = "1.2.826.0.1.3680043.2.1125.1.42"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, __import__("tempfile").TemporaryDirectory() as scratch:
        for k in range(image.GetDepth()):
            plane = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{k + 1}",
                    "0020|000d": f"{uid}.0", "0020|000e": f"{uid}.9", "0020|0013": str(k + 1),
                    "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0037": orientation,
                    "0018|0050": f"{image.GetSpacing()[2]:.6f}"}
            for tag, value in tags.items():
                plane.SetMetaData(tag, value)
            path = Path(scratch) / f"slice{k:03d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(plane)
            archive.write(path, f"series/../../{k:03d}.dcm")  # member names are never used as paths
    return buffer.getvalue()


def test_a_zipped_dicom_series_gets_a_nifti_mask_in_the_series_geometry(server, scan, tmp_path):
    response = _submit(server, content=_dicom_zip(scan), name="series.zip")
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "dicom"
    done = _wait(server, response.json()["id"])
    assert done["state"] == "done", done
    (tmp_path / "mask.nii.gz").write_bytes(server.get(f"/jobs/{done['id']}/mask").content)
    mask, original = nib.load(tmp_path / "mask.nii.gz"), nib.load(scan)
    assert mask.shape == original.shape
    assert np.allclose(mask.affine, original.affine, atol=1e-3)


@pytest.mark.parametrize("content, name, expected", [
    (b"hello, not an image", "notes.nii.gz", "not a NIfTI image"),
    (b"", "empty.nii.gz", "an empty file"),
    (None, "cut.nii.gz", "truncated or corrupt gzip"),
    (gzip.compress(b"x" * 2000, mtime=0), "other.nii.gz", "gzip data that is not a NIfTI image"),
    (_nifti_bytes(np.zeros((16, 16), np.int16)), "slice.nii.gz", "image is 2D"),
    (_nifti_bytes(np.zeros((16, 16, 16, 2), np.int16)), "series4d.nii.gz", "image is 4D"),
    (b"PK\x03\x04 broken", "series.zip", "unreadable zip"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "photo.png", "a PNG file; this model takes .nii"),
])
def test_bad_uploads_get_400_with_one_line(server, scan, content, name, expected):
    if content is None:
        whole = scan.read_bytes()
        content = whole[: len(whole) // 2]
    response = _submit(server, content=content, name=name)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert expected in detail and "\n" not in detail and "Traceback" not in detail
    assert "/tmp" not in detail  # the server's paths are not the client's business


def test_a_zip_without_a_dicom_series_is_refused(server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "no images here")
    response = _submit(server, content=buffer.getvalue(), name="nothing.zip")
    assert response.status_code == 400 and "no DICOM image series" in response.json()["detail"]


def test_requests_without_a_file_or_for_unknown_jobs(server):
    missing = server.post("/jobs", data={"other": "field"})
    assert missing.status_code == 400 and "multipart form field 'file'" in missing.json()["detail"]
    for route in ("", "/mask", "/overlay.png", "/volumes", "/seg", "/geometry"):
        unknown = server.get(f"/jobs/{'0' * 32}{route}")
        assert unknown.status_code == 404 and "no job" in unknown.json()["detail"]
    assert server.delete(f"/jobs/{'0' * 32}").status_code == 404


def test_several_clients_at_once_are_all_answered_one_inference_at_a_time(server, scan):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _submit(server, scan), range(6)))
    assert [r.status_code for r in responses] == [202] * 6
    jobs = [_wait(server, r.json()["id"]) for r in responses]
    assert all(job["state"] == "done" for job in jobs)
    spans = sorted((job["started"], job["finished"]) for job in jobs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # the next job started after the previous one finished


def test_delete_removes_the_job_and_its_files(server, scan):
    job = _wait(server, _submit(server, scan).json()["id"])
    assert server.delete(f"/jobs/{job['id']}").status_code == 204
    assert server.get(f"/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in server.get("/jobs").json()["jobs"]]


def test_segment_answers_with_the_mask(server, scan, tmp_path):
    response = _submit(server, scan, route="/segment")
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    (tmp_path / "mask.nii.gz").write_bytes(response.content)
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(scan).shape
    assert server.get(f"/jobs/{response.headers['x-job-id']}").json()["state"] == "done"


def test_on_start_expired_and_half_uploaded_jobs_are_removed_and_kept_jobs_run(tmp_path, checkpoint, scan):
    stale = _stale_jobs(tmp_path / "jobs", scan)
    with in_process_service(checkpoint, tmp_path / "jobs", *STRICT_FLAGS) as client:
        assert not stale["expired"].exists() and not stale["no_record"].exists()
        died = client.get(f"/jobs/{stale['unfinished'].name}", headers=AUTH).json()
        assert died["state"] == "failed" and "the server stopped while this job ran" in died["error"]
        kept = _wait(client, stale["queued"].name, AUTH)
        assert kept["state"] == "done", kept  # a clean stop kept it queued: this start ran it


def test_the_token_is_required_everywhere_but_health_and_the_page(strict):
    assert strict.get("/health").status_code == 200
    assert strict.get("/").status_code == 200
    routes = (("GET", "/info"), ("GET", "/jobs"), ("POST", "/jobs"), ("POST", "/segment"), ("GET", f"/jobs/{'0' * 32}"),
              ("DELETE", f"/jobs/{'0' * 32}"), ("GET", "/docs"), ("GET", "/openapi.json"))
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        for method, route in routes:
            response = strict.request(method, route, headers=headers)
            assert response.status_code == 401, (method, route, headers)
            assert "Authorization: Bearer" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme's name is case-insensitive (RFC 7235)
        assert strict.get("/info", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
    assert strict.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "btcv-unetr"


def _answer_before_the_body(url: str, headers: bytes, length: int = 200_000_000) -> str:
    """The status line a real server sends to a POST /jobs whose headers declare ``length`` bytes of body and of
    which only the headers and 1000 bytes are sent: an answer at all means the gate did not wait for the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\n" + headers
                           + b"Content-Type: multipart/form-data; boundary=b\r\n"
                           + f"Content-Length: {length}\r\n\r\n".encode() + b"x" * 1000)
        return connection.recv(4096).decode("latin-1").split("\r\n")[0]


@pytest.mark.xdist_group("real_server")  # the session's real server (tests/conftest.py), shared with test_web
def test_the_gate_refuses_before_the_body_is_read(real_server, scan):
    """On a real server, from the headers alone, while the body is still unsent: 401 for a wrong token, 413 for a
    Content-Length over --max_upload_mb, and 503 when the queue (of one) is full: one job held running, one
    waiting."""
    url, auth = real_server.url, {"Authorization": f"Bearer {real_server.token}"}
    assert _answer_before_the_body(url, b"Authorization: Bearer wrong\r\n").startswith("HTTP/1.1 401")
    right = f"Authorization: Bearer {real_server.token}\r\n".encode()
    assert _answer_before_the_body(url, right, 2 * 1024 * 2**20).startswith("HTTP/1.1 413")  # over 1024 MB
    under_the_limit = 100_000
    with httpx.Client(base_url=url, timeout=120) as client:
        real_server.hold.touch()
        try:
            running = _submit(client, scan, headers=auth).json()
            _wait(client, running["id"], auth, states=("running",))
            waiting = _submit(client, scan, headers=auth)
            assert waiting.status_code == 202 and waiting.json()["state"] == "queued", waiting.text
            assert _answer_before_the_body(url, right, under_the_limit).startswith("HTTP/1.1 503")
        finally:
            real_server.hold.unlink(missing_ok=True)
        assert [_wait(client, job_id, auth)["state"] for job_id in (running["id"], waiting.json()["id"])] == \
            ["done", "done"]
        assert _answer_before_the_body(url, right, under_the_limit).startswith("HTTP/1.1 400")  # read: not a scan


def test_uploads_over_the_limits_get_413(strict, scan):
    big = _submit(strict, content=b"\x1f\x8b" + b"\x00" * 300_000, name="big.nii.gz", headers=AUTH)
    assert big.status_code == 413 and "--max_upload_mb 0.2" in big.json()["detail"]
    assert scan.stat().st_size > 0.1 * 2**20  # over the /segment limit, under the /jobs one
    synchronous = _submit(strict, scan, route="/segment", headers=AUTH)
    assert synchronous.status_code == 413 and "POST /jobs instead" in synchronous.json()["detail"]


def test_a_full_queue_answers_503_with_retry_after_and_retention_keeps_two_jobs(strict, scan):
    """One job runs (held), one waits, the third is refused; of the finished jobs the newest two are kept."""
    with held_jobs(strict.service):
        answers = [_submit(strict, scan, headers=AUTH)]
        assert answers[0].status_code == 202, answers[0].text
        _wait(strict, answers[0].json()["id"], AUTH, states=("running",))  # the worker took it: the queue is empty
        answers += [_submit(strict, scan, headers=AUTH) for _ in range(2)]
        assert [a.status_code for a in answers] == [202, 202, 503], [a.text for a in answers]
        assert "queue" in answers[2].json()["detail"] and int(answers[2].headers["retry-after"]) >= 1
        assert answers[1].json()["queue_position"] == 1
        states = [strict.get(f"/jobs/{a.json()['id']}", headers=AUTH).json()["state"] for a in answers[:2]]
        assert states == ["running", "queued"]
    accepted = [_wait(strict, a.json()["id"], AUTH) for a in answers[:2]]
    third = _wait(strict, _submit(strict, scan, headers=AUTH).json()["id"], AUTH)
    assert all(job["state"] == "done" for job in accepted + [third])
    kept = [job["id"] for job in strict.get("/jobs", headers=AUTH).json()["jobs"]]
    assert kept == [third["id"], accepted[1]["id"]]  # newest first; the oldest is gone, its files too
    assert strict.get(f"/jobs/{accepted[0]['id']}/mask", headers=AUTH).status_code == 404
    assert not (strict.service.settings.jobs_dir / accepted[0]["id"]).exists()


def test_deleting_a_waiting_job_answers_the_segment_call_that_waits_for_it(strict, scan):
    noise = np.random.default_rng(0).integers(-500, 500, (24, 24, 24)).astype(np.int16)
    small = _nifti_bytes(noise, np.diag([6.0, 6.0, 6.0, 1.0]))
    assert len(small) < 0.1 * 2**20  # under the /segment limit
    with held_jobs(strict.service), concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = _submit(strict, scan, headers=AUTH).json()
        _wait(strict, running["id"], AUTH, states=("running",))
        waiting = pool.submit(_submit, strict, None, small, "small.nii.gz", AUTH, "/segment")
        deadline = time.time() + 120  # only bounds a test that went wrong: the held job keeps it queued
        while not (queued := [j for j in strict.get("/jobs", headers=AUTH).json()["jobs"]
                              if j["state"] == "queued"]):
            assert time.time() < deadline, "the /segment job never waited in the queue"
            time.sleep(0.05)
        assert strict.delete(f"/jobs/{queued[0]['id']}", headers=AUTH).status_code == 204
        answer = waiting.result(timeout=120)
        assert strict.get(f"/jobs/{running['id']}", headers=AUTH).json()["state"] == "running"
    assert answer.status_code == 410 and answer.json()["detail"] == "deleted before it ran"
    assert _wait(strict, running["id"], AUTH)["state"] == "done"


def test_a_picture_round_trip_gives_a_png_mask_of_its_size(picture_service, tmp_path):
    import SimpleITK as sitk
    rgb = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)  # 48 rows, 80 columns
    path = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    assert picture_service.get("/info").json()["inputs"] == [".png", ".jpg", ".jpeg"]
    job = _wait(picture_service, _submit(picture_service, path, name="photo.png").json()["id"])
    assert job["state"] == "done" and job["kind"] == "picture" and job["shape"] == [80, 48], job
    mask = picture_service.get(f"/jobs/{job['id']}/mask")
    assert mask.headers["content-type"] == "image/png"
    (tmp_path / "mask.png").write_bytes(mask.content)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.png")))
    assert labels.shape == (48, 80) and set(np.unique(labels).tolist()) <= {0, 1, 2}
    volumes = picture_service.get(f"/jobs/{job['id']}/volumes").json()
    assert volumes["unit"] == "pixels" and sum(o["voxels"] for o in volumes["organs"]) == int((labels > 0).sum())
    scan = _submit(picture_service, content=_nifti_bytes(np.zeros((8, 8, 8), np.int16)), name="ct.nii.gz")
    assert scan.status_code == 400 and "this model takes a PNG or JPEG picture" in scan.json()["detail"]
