"""The serve load check of benchmarks/bench.py: a short run in this process, and the command line's (bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench  # benchmarks/bench.py (conftest puts benchmarks/ on the path)
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_serve_load_check_figures_are_consistent(tmp_path):
    # Two clients for 5 s on 32^2 phantoms with the tiny model: about 20 s on a busy 2-core machine,
    # most of it the server's start. One OpenMP thread: the clients and the server share the cores.
    result = bench.serve_load(tmp_path, clients=2, seconds=5, sizes=(32,), device="cpu", server_threads=1,
                              log=lambda *args, **kwargs: None)
    assert result["failed"] == 0, result["errors"]
    assert result["completed"] >= 2
    latency = result["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    assert result["jobs_per_minute"] > 0
    assert result["elapsed_s"] >= 5  # the clients submit for the whole window, then finish their last jobs
    # The server's own seconds are part of what a client waits (upload, queue, polling and download besides).
    assert 0 < result["server_seconds_mean"] <= latency["max"]
    assert result["refused_503"] == 0  # the queue has room for every client
    assert result["server"] == {"precision": result["machine"]["precision"]["name"], "device": "cpu"}
    assert result["machine"]["model"] and result["machine"]["capability"]
    assert [shape[:2] for shape in result["scan_shapes"]] == [[32, 32], [32, 32]]
    assert result["bomb"]["status"] == 413 and "larger than any body" in result["bomb"]["detail"]
    assert result["server_peak_memory_gb"] > 0
    assert "jobs per minute" in bench.serve_table(result)
    json.dumps(result, allow_nan=False)  # the figures are plain JSON


def test_percentile_interpolates_between_ranks():
    assert bench.percentile([], 0.5) is None
    assert bench.percentile([3.0], 0.95) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)


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
