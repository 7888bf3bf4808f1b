"""A real ``btcv-unetr serve`` process on a free loopback port, for the service's and the web page's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from btcv_unetr.checkpoint import save_initial_checkpoint

from conftest import tiny_config

STARTUP_SECONDS = 60
PICTURE_MODEL = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "roi_x": 64, "roi_y": 64}


def tiny_checkpoint(folder: Path, **overrides) -> Path:
    """``folder/model.pt``: the tiny model with seeded random weights (serving needs no accuracy);
    ``overrides`` are config sections, e.g. ``model={"spatial_dims": 2}``."""
    return save_initial_checkpoint(folder / "model.pt", tiny_config(**overrides))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(checkpoint: Path, jobs_dir: Path, *flags: str, env: dict | None = None) -> Iterator[str]:
    """``btcv-unetr serve`` in its own process; yields its base URL once ``/health`` answers, stops it after.

    The log (stdout and stderr) is ``jobs_dir.parent / "server.log"``; a server that does not come up
    fails the test with the log's end.
    """
    port = free_port()
    argv = [sys.executable, "-m", "btcv_unetr", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--jobs_dir", str(jobs_dir), "--precision", "fp32", *flags]
    log_path = jobs_dir.parent / "server.log"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the server did not start (exit {process.poll()}):\n"
                                     + log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
