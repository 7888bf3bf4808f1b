"""The serve load check of benchmarks/bench.py (benchmarks/case_serve.py): the load client's tally against a
scripted service (httpx's MockTransport), a fixed number of jobs against a real server, and the command
line's (bench). Nothing here depends on the machine's speed: the loads are counted in jobs, not seconds."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark's modules import each other by their plain names

import case_serve  # noqa: E402
from case_serve import (  # noqa: E402
    ClientTally,
    client_jobs,
    one_job,
    percentile,
    serve_table,
    submit_job,
    tally_figures,
)


class ScriptedService:
    """An httpx transport handler playing ``btcv-unetr serve``: each ``POST /jobs`` answers the next status of
    ``posts`` (202: accepted, with a new job id; otherwise refused, ``Retry-After: retry_after``); a job's
    record is ``state`` (with ``seconds`` 0.25) at its first GET, its mask ``mask`` bytes. Records the
    uploaded names."""

    def __init__(self, posts: list[int], state: str = "done", mask: bytes = b"mask", retry_after: str = "0"):
        self.posts, self.state, self.mask, self.retry_after = list(posts), state, mask, retry_after
        self.uploaded: list[str] = []
        self.jobs = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/jobs":
            self.uploaded.append(re.search(rb'filename="([^"]+)"', request.read()).group(1).decode())
            status = self.posts.pop(0)
            if status == 202:
                self.jobs += 1
                return httpx.Response(202, json={"id": f"job{self.jobs}"})
            return httpx.Response(status, json={"detail": f"refused with {status}"},
                                  headers={"Retry-After": self.retry_after})
        if request.method == "GET" and re.fullmatch(r"/jobs/job\d+", path):
            record = {"id": path.rsplit("/", 1)[1], "state": self.state, "seconds": 0.25}
            return httpx.Response(200, json={**record, "error": "out of memory"} if self.state == "failed" else record)
        if request.method == "GET" and re.fullmatch(r"/jobs/job\d+/mask", path):
            return httpx.Response(200, content=self.mask)
        return httpx.Response(404, json={"detail": "no such route"})


def scripted_client(service: ScriptedService) -> httpx.Client:
    return httpx.Client(base_url="http://service", transport=httpx.MockTransport(service))


@pytest.fixture
def scans(tmp_path) -> list[Path]:
    """Three upload files (their content does not matter to the scripted service)."""
    paths = [tmp_path / f"scan{index}.nii.gz" for index in range(3)]
    for path in paths:
        path.write_bytes(b"not really a scan")
    return paths


def test_a_job_retried_after_503s_counts_the_refusals_and_one_latency(scans):
    service, tally = ScriptedService([503, 503, 202]), ClientTally()
    with scripted_client(service) as client:
        one_job(client, scans[0], math.inf, tally)
    assert (tally.refused, tally.failed, tally.errors) == (2, 0, [])
    assert len(tally.latencies_s) == 1 and tally.latencies_s[0] >= 0
    assert tally.server_s == [0.25]  # the job record's seconds
    assert service.uploaded == ["scan0.nii.gz"] * 3


@pytest.mark.parametrize("posts, state, mask, error", [
    ([413], "done", b"mask", "POST /jobs: 413 refused with 413"),
    ([202], "failed", b"mask", "job job1: out of memory"),
    ([202], "done", b"", "GET /jobs/job1/mask: 200"),
])
def test_a_refused_upload_a_failed_job_or_an_empty_mask_is_one_failure(scans, posts, state, mask, error):
    tally = ClientTally()
    with scripted_client(ScriptedService(posts, state, mask)) as client:
        one_job(client, scans[0], math.inf, tally)
    assert tally.failed == 1 and tally.errors[0].startswith(error), tally.errors
    assert tally.latencies_s == [] and tally.server_s == []


def test_a_refusal_whose_wait_ends_past_the_deadline_is_neither_submitted_nor_failed(scans):
    tally = ClientTally()
    # Retry-After 5 s with the deadline now: the wait always ends past it, whatever the machine's speed.
    with scripted_client(ScriptedService([503], retry_after="5")) as client:
        assert submit_job(client, scans[0], time.perf_counter(), tally) is None
    assert (tally.refused, tally.failed) == (1, 0)


def test_a_client_runs_exactly_its_jobs_taking_the_scans_in_turn(scans):
    service, tally = ScriptedService([202] * 4), ClientTally()
    with scripted_client(service) as client:
        client_jobs(client, scans, tally, first=2, deadline=math.inf, jobs=4)
    assert service.uploaded == ["scan2.nii.gz", "scan0.nii.gz", "scan1.nii.gz", "scan2.nii.gz"]
    assert len(tally.latencies_s) == 4 and tally.failed == 0


def test_a_transport_error_stops_the_client(scans):
    def gone(request):
        raise httpx.ConnectError("connection refused", request=request)

    tally = ClientTally()
    with httpx.Client(base_url="http://service", transport=httpx.MockTransport(gone)) as client:
        client_jobs(client, scans, tally, first=0, deadline=math.inf, jobs=5)
    assert tally.failed == 1 and tally.errors == ["ConnectError: connection refused"]


def test_the_figures_add_up_every_clients_tally():
    tallies = [ClientTally([1.0, 2.0], [0.5, 0.7], refused=3, failed=1, errors=["a"]),
               ClientTally([4.0], [0.9], refused=0, failed=0, errors=[]),
               ClientTally(failed=11, errors=[f"b{index}" for index in range(11)])]
    figures = tally_figures(tallies, elapsed_s=30.0)
    assert (figures["completed"], figures["failed"], figures["refused_503"]) == (3, 12, 3)
    assert figures["jobs_per_minute"] == pytest.approx(6.0)
    assert figures["latency_s"] == {"p50": 2.0, "p95": pytest.approx(3.8), "max": 4.0, "mean": pytest.approx(7 / 3)}
    assert figures["server_seconds_mean"] == pytest.approx(0.7)
    assert figures["errors"] == ["a"] + [f"b{index}" for index in range(9)]  # the first ten
    empty = tally_figures([ClientTally()], elapsed_s=1.0)
    assert empty["completed"] == 0 and empty["jobs_per_minute"] == 0.0
    assert set(empty["latency_s"].values()) == {None} and empty["server_seconds_mean"] is None


def test_percentile_interpolates_between_ranks():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)


def test_serve_load_takes_a_window_or_a_job_count_not_both(tmp_path):
    with pytest.raises(ValueError, match="seconds or jobs_per_client"):
        case_serve.serve_load(tmp_path, seconds=5, jobs_per_client=1)
    with pytest.raises(ValueError, match="seconds or jobs_per_client"):
        case_serve.serve_load(tmp_path, seconds=None)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.bench  # a real server and its load client end to end (about 40 s on 2 cores): `make bench` runs it
def test_serve_load_check_against_a_real_server(tmp_path):
    # Two clients, one job each, on 32^2 phantoms with the tiny model; one OpenMP thread for the server (the
    # clients share the cores). The bomb goes with the first jobs and must be refused from its header.
    result = case_serve.serve_load(tmp_path, clients=2, seconds=None, jobs_per_client=1, sizes=(32,), device="cpu",
                                   server_threads=1, log=lambda *args, **kwargs: None)
    assert result["failed"] == 0, result["errors"]
    assert result["completed"] == 2 and result["refused_503"] == 0  # the queue has room for every client
    latency = result["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    # The server's own seconds are part of what a client waits (upload, queue, polling and download besides).
    assert 0 < result["server_seconds_mean"] <= latency["max"]
    assert result["jobs_per_minute"] == pytest.approx(60.0 * 2 / result["elapsed_s"])
    assert result["server"] == {"precision": result["machine"]["precision"]["name"], "device": "cpu"}
    assert result["machine"]["model"] and result["machine"]["capability"] and result["machine"]["threads"] == 1
    assert [shape[:2] for shape in result["scan_shapes"]] == [[32, 32], [32, 32]]
    assert result["bomb"]["status"] == 413 and "larger than any body" in result["bomb"]["detail"]
    assert result["server_peak_memory_gb"] > 0
    assert (result["serve_seconds"], result["jobs_per_client"]) == (None, 1)
    text = serve_table(result)
    assert text.startswith("serve load check: 2 clients 1 job each (")
    assert re.search(r"^jobs completed +2$", text, re.MULTILINE) and "sent with the first jobs" in text
    json.dumps(result, allow_nan=False)  # the figures are plain JSON


@pytest.mark.bench  # a minute of CPU: `make bench` runs it, `make test` does not
def test_bench_serve_writes_valid_json(tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--serve", "--device", "cpu",
                             "--clients", "2", "--serve_seconds", "10", "--serve_size", "32", "--out", str(out),
                             "--silent"], capture_output=True, encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["clients"] == 2 and data["failed"] == 0 and data["completed"] >= 2
    assert data["latency_s"]["p50"] <= data["latency_s"]["p95"] <= data["latency_s"]["max"]
    assert "jobs per minute" in result.stdout and data["machine"]["model"] in result.stdout
