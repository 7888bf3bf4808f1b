"""A real ``btcv-unetr serve`` process on a free loopback port, for the service's and the web page's tests
(started by ``btcv_unetr.testing.server``, which the benchmark's load check uses too)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_config

from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.testing.server import serve_process

PICTURE_MODEL = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": 64, "roi_y": 64}


def tiny_checkpoint(folder: Path, **overrides) -> Path:
    """``folder/model.pt``: the tiny model with seeded random weights (serving needs no accuracy);
    ``overrides`` are config sections, e.g. ``model={"spatial_dims": 2}``."""
    return seeded_checkpoint(folder / "model.pt", tiny_config(**overrides))


@contextlib.contextmanager
def running_server(checkpoint: Path, jobs_dir: Path, *flags: str) -> Iterator[str]:
    """The server in float32 on the CPU (one thread), its log in ``jobs_dir.parent / "server.log"``; yields its base
    URL once ``/health`` answers and stops it afterwards."""
    flags = ["--precision", "fp32", "--device", "cpu", *flags]
    with serve_process(checkpoint, jobs_dir, flags, jobs_dir.parent / "server.log", threads=1) as server:
        yield server.url


HELD_WORKER = Path(__file__).resolve().parent / "held_worker"  # its sitecustomize.py holds a real server's worker


@contextlib.contextmanager
def held_server(checkpoint: Path, jobs_dir: Path, hold: Path, *flags: str) -> Iterator[str]:
    """:func:`running_server` whose worker holds each job it takes in "running" while the file ``hold`` exists
    (tests/held_worker/sitecustomize.py; a DELETE, the time limit or the server's stop still end it)."""
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as env:  # for the server's process only
            env.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(HELD_WORKER), os.environ.get("PYTHONPATH")))))
            env.setenv("BTCV_UNETR_TEST_HOLD", str(hold))
            url = stack.enter_context(running_server(checkpoint, jobs_dir, *flags))
        yield url


def run_job(client, scan: Path, timeout_s: float = 120) -> dict:
    """Submit ``scan`` to an in-process service's ``client`` and poll until its job is done or failed (or the
    time is up); the job's last record."""
    response = client.post("/jobs", files={"file": ("scan.nii.gz", scan.read_bytes())})
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.time() + timeout_s
    while job["state"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.1)
        job = client.get(f"/jobs/{job['id']}").json()
    return job
