"""A real ``btcv-unetr serve`` process on a free loopback port, for the service's tests and the serve load check
of ``benchmarks/bench.py`` (one copy of the start, health and stop logic), and crafted NIfTI uploads.

    free_port           a loopback TCP port nobody listens on now
    serve_process       the server in its own process; yields a ServerProcess (url, process, peak memory)
    wait_until_healthy  block until ``GET /health`` answers (ServerStartError with the log's end otherwise)
    stop_process        SIGINT (uvicorn's graceful stop), then kill
    declared_nifti_gz   a ``.nii.gz`` whose header declares any shape (a decompression bomb, a short file)

httpx (the test extra's HTTP client) is imported where it is used: importing this module needs only the
package's own dependencies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel
import numpy as np

STARTUP_S = 180  # importing torch and MONAI and loading the model, on a busy small machine
STOP_S = 20  # after SIGINT the server lets its running job finish; then it is killed
NIFTI_DATA_OFFSET = 352  # a 348-byte NIfTI-1 header and a 4-byte empty extension flag


class ServerStartError(RuntimeError):
    """The server exited, or did not answer ``/health`` within ``STARTUP_S`` seconds (the message ends with its log)."""


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS picks it; the server binds it moments later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path, startup_s: float = STARTUP_S) -> None:
    """Return once ``GET {url}/health`` answers 200; a server that exits, or stays silent for ``startup_s``
    seconds, raises :class:`ServerStartError` with the end of ``log_path``."""
    import httpx
    deadline = time.monotonic() + startup_s
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise ServerStartError(f"btcv-unetr serve did not start (exit status {process.poll()}); end of "
                                   f"{log_path}:\n{log_path.read_text(encoding='utf-8', errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)


def stop_process(process: subprocess.Popen, stop_s: float = STOP_S) -> None:
    """SIGINT (uvicorn's graceful shutdown: the job worker stops), then kill after ``stop_s`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=stop_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass(frozen=True)
class ServerProcess:
    """A started server: its base URL (``http://127.0.0.1:PORT``) and its process."""

    url: str
    process: subprocess.Popen

    def peak_memory_bytes(self) -> int | None:
        """The server process's peak resident memory so far (Linux ``VmHWM``), None where it cannot be read."""
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def _package_root() -> str:
    """The folder holding the ``btcv_unetr`` this process imported (the repository, or site-packages)."""
    return str(Path(__file__).resolve().parent.parent.parent)


@contextlib.contextmanager
def serve_process(checkpoint: Path, jobs_dir: Path, flags: list[str], log_path: Path,
                  threads: int | None = None) -> Iterator[ServerProcess]:
    """``btcv-unetr serve`` in its own process on a free loopback port; yields it once it answers and stops
    it afterwards. Its output goes to ``log_path``; ``threads`` caps its OpenMP threads."""
    port = free_port()
    argv = [sys.executable, "-m", "btcv_unetr", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port), "--jobs_dir", str(jobs_dir), *flags]
    # The server imports the btcv_unetr this process imports, whatever the working folder.
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, (_package_root(), os.environ.get("PYTHONPATH"))))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url, log_path)
        yield ServerProcess(url, process)
    finally:
        stop_process(process)


def declared_nifti_gz(shape: tuple[int, ...], zooms: tuple[float, ...], dtype=np.int16, data_bytes: int | None = None,
                      fill: float = 0) -> bytes:
    """A ``.nii.gz`` whose header declares ``shape`` (voxels) and ``zooms`` (mm), with ``data_bytes`` bytes of
    voxels (default: all of them) of value ``fill``, compressed as it is generated: a gigavoxel of zeros is a
    megabyte (a decompression bomb)."""
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms(zooms)
    header.set_data_offset(NIFTI_DATA_OFFSET)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize if data_bytes is None else data_bytes
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as stream:
        stream.write(header.binaryblock + b"\x00" * 4)  # the empty extension flag: the voxels start at 352
        chunk = np.full(1 << 19, fill, dtype).tobytes()
        while total > 0:
            stream.write(chunk[:min(total, len(chunk))])
            total -= len(chunk)
    return out.getvalue()
