"""``--serve``: a load check of ``btcv-unetr serve``. Clients submit phantoms to a real server process, for a
bounded time (the command line) or a fixed number of jobs each (the tests); figures are jobs per minute,
submit-to-mask latency, 503 refusals, the server's peak memory, and the answer to one decompression bomb.

    serve_load     the check: starts the server, warms it up, runs the clients, gathers the figures
    run_serve      the check with the command line's settings, in a temporary folder
    serve_table    the figures as text
    ClientTally, tally_figures   what each client saw, and the figures of all of them together
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import secrets
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import torch
from machine import machine_facts
from settings import TINY

from btcv_unetr.config.load import build_config
from btcv_unetr.errors import UserError
from btcv_unetr.io.checkpoint import load_checkpoint, stored_config
from btcv_unetr.runtime.precision import Precision, resolve_precision
from btcv_unetr.synthetic.phantoms import write_dataset
from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.testing.server import declared_nifti_gz, serve_process

SERVE_POLL_S = 0.15  # between two GETs of a job's state (the API contract asks clients for 0.1-0.2 s)
SERVE_JOB_LIMIT_S = 900  # a job with no result after this long counts as failed (a hung server)
SERVE_SEED = 11  # the phantom set the clients upload
BOMB_SHAPE = (1024, 1024, 512)  # the 1 MB upload that once held the worker for 2 minutes and 7 GB
ERRORS_KEPT = 10  # error lines in the record (the first ones)


class ServeCheckError(RuntimeError):
    """The serve check cannot run: its model does not take the phantoms, or the warm-up job failed."""


def tiny_checkpoint(folder: Path) -> Path:
    """A training checkpoint of the benchmark's tiny model with seeded random weights (the service's speed
    does not depend on them); it carries its config, so the server builds the same tiny UNETR."""
    return seeded_checkpoint(folder / "model.pt", build_config([TINY]))


def checkpoint_precision(checkpoint: Path, device: torch.device) -> Precision:
    """What ``auto`` resolves to here for the checkpoint's model. The server is given this precision, so the
    figures recorded with it are those the jobs ran in. Files without a config (a bare state dict, TorchScript)
    are taken to hold the default model."""
    try:
        config = stored_config(load_checkpoint(checkpoint), str(checkpoint))
    except UserError:
        config = None
    with contextlib.redirect_stderr(io.StringIO()):
        return resolve_precision("auto", device, (config or build_config([])).model)


def serve_scans(folder: Path, sizes: tuple[int, ...]) -> list[Path]:
    """Two distinct phantom scans of each size (voxels square in-plane; 512 is BTCV's 512 x 512 x ~100-200),
    interleaved, that the clients take turns uploading."""
    per_size = []
    for size in sizes:
        write_dataset(folder / str(size), cases=2, seed=SERVE_SEED, size=size, test_cases=2, progress=False)
        per_size.append(sorted((folder / str(size) / "imagesTs").glob("*.nii.gz")))
    return [scan for pair in zip(*per_size) for scan in pair]


def post_bomb(url: str, token: str, bomb: bytes, delay_s: float) -> dict:
    """After ``delay_s``, upload ``bomb`` once: its status and the seconds until the answer (it must be refused
    from its header, without slowing the other clients' jobs)."""
    import httpx
    time.sleep(delay_s)
    started = time.perf_counter()
    response = httpx.post(f"{url}/jobs", files={"file": ("bomb.nii.gz", bomb, "application/gzip")},
                          headers={"Authorization": f"Bearer {token}"}, timeout=SERVE_JOB_LIMIT_S)
    return {"status": response.status_code, "answer_s": time.perf_counter() - started,
            "detail": answer_detail(response), "bytes": len(bomb)}


@dataclasses.dataclass
class ClientTally:
    """What one client saw. Latencies are submit-to-mask seconds of its completed jobs, ``server_s`` the
    seconds the server's job records give for the same jobs."""

    latencies_s: list[float] = dataclasses.field(default_factory=list)
    server_s: list[float] = dataclasses.field(default_factory=list)
    refused: int = 0  # 503 answers (queue full), each retried after its Retry-After
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors.append(why)


def answer_detail(response) -> str:
    """``STATUS detail`` of an error answer (the service's errors are JSON ``{"detail": ...}``)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    return f"{response.status_code} {detail}"


def submit_job(client, scan: Path, deadline: float, tally: ClientTally) -> str | None:
    """POST /jobs until it is accepted; returns the job id. A 503 (queue full) is counted and retried after its
    Retry-After seconds, unless that wait ends past ``deadline`` (None: not submitted, not a failure)."""
    while True:
        with open(scan, "rb") as data:
            response = client.post("/jobs", files={"file": (scan.name, data, "application/gzip")})
        if response.status_code == 202:
            return response.json()["id"]
        if response.status_code != 503:
            tally.fail(f"POST /jobs: {answer_detail(response)}")
            return None
        tally.refused += 1
        wait_s = float(response.headers.get("Retry-After", "1"))
        if time.perf_counter() + wait_s > deadline:
            return None
        time.sleep(wait_s)


def await_job(client, job_id: str) -> dict:
    """The job's record once it is done or failed, polled every ``SERVE_POLL_S`` seconds."""
    started = time.perf_counter()
    while True:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code != 200:
            return {"state": "failed", "error": f"GET /jobs/{job_id}: {answer_detail(response)}"}
        job = response.json()
        if job["state"] in ("done", "failed"):
            return job
        if time.perf_counter() - started > SERVE_JOB_LIMIT_S:
            return {**job, "state": "failed", "error": f"no result after {SERVE_JOB_LIMIT_S} s"}
        time.sleep(SERVE_POLL_S)


def one_job(client, scan: Path, deadline: float, tally: ClientTally) -> None:
    """Submit ``scan``, wait for its job and download the mask. The latency counts from the first POST,
    refusals and their waits included: it is what a user of the service waits."""
    submitted = time.perf_counter()
    job_id = submit_job(client, scan, deadline, tally)
    if job_id is None:
        return
    job = await_job(client, job_id)
    if job["state"] == "failed":
        tally.fail(f"job {job_id}: {job['error']}")
        return
    mask = client.get(f"/jobs/{job_id}/mask")
    if mask.status_code != 200 or not mask.content:
        tally.fail(f"GET /jobs/{job_id}/mask: {answer_detail(mask)}")
        return
    tally.latencies_s.append(time.perf_counter() - submitted)
    tally.server_s.append(float(job["seconds"]))


def warm_up(url: str, token: str, scan: Path) -> float:
    """Seconds of one job through POST /segment before the clock starts: the first inference's one-time costs
    (kernel selection, first allocations) are not part of the steady-state figures."""
    import httpx
    started = time.perf_counter()
    with open(scan, "rb") as data:
        response = httpx.post(f"{url}/segment", files={"file": (scan.name, data, "application/gzip")},
                              headers={"Authorization": f"Bearer {token}"}, timeout=SERVE_JOB_LIMIT_S)
    if response.status_code != 200:
        raise ServeCheckError(f"the warm-up job failed: POST /segment: {answer_detail(response)}")
    return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float | None:
    """numpy's percentile (linear between the closest ranks) at ``fraction``; None for no values."""
    return float(np.percentile(values, 100 * fraction)) if values else None


def client_jobs(client, scans: list[Path], tally: ClientTally, first: int, deadline: float,
                jobs: int | None = None) -> None:
    """One client's jobs, one after another on ``client`` (an ``httpx.Client`` at the server's URL): scans taken
    in turn from ``scans[first]``, until ``deadline`` (``time.perf_counter()`` seconds; then its last job to the
    end) or, with ``jobs``, exactly that many. A transport error (the server gone) stops the client."""
    import httpx
    index = first
    while (index - first < jobs) if jobs is not None else time.perf_counter() < deadline:
        try:
            one_job(client, scans[index % len(scans)], deadline, tally)
        except httpx.HTTPError as exc:
            tally.fail(f"{exc.__class__.__name__}: {exc}")
            return
        index += 1


def serve_client(url: str, token: str, scans: list[Path], tally: ClientTally, first: int, deadline: float,
                 jobs: int | None = None) -> None:
    """:func:`client_jobs` on a connection pool of its own."""
    import httpx
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        client_jobs(client, scans, tally, first, deadline, jobs)


def run_clients(url: str, token: str, scans: list[Path], clients: int, seconds: float | None,
                jobs: int | None = None, bomb: bytes | None = None) -> tuple[list[ClientTally], float, dict | None]:
    """``clients`` threads submitting for ``seconds`` (or ``jobs`` jobs each), and ``bomb`` uploaded once, halfway
    through the window (at once with ``jobs``); returns their tallies, the seconds until the last of them
    finished its last job, and the bomb's answer."""
    tallies = [ClientTally() for _ in range(clients)]
    started = time.perf_counter()
    deadline = math.inf if jobs is not None else started + seconds
    threads = [threading.Thread(target=serve_client, args=(url, token, scans, tally, index, deadline, jobs),
                                name=f"client {index}", daemon=True) for index, tally in enumerate(tallies)]
    for thread in threads:
        thread.start()
    bomb_delay_s = 0.0 if jobs is not None else seconds / 2
    answer = post_bomb(url, token, bomb, bomb_delay_s) if bomb is not None else None
    for thread in threads:
        thread.join()
    return tallies, time.perf_counter() - started, answer


def tally_figures(tallies: list[ClientTally], elapsed_s: float) -> dict:
    """The clients' tallies together: jobs completed, failed and refused (503), jobs per minute over
    ``elapsed_s`` seconds, latency percentiles (seconds; None without completed jobs), the server's mean
    seconds per job, and the first ``ERRORS_KEPT`` errors."""
    latencies = [value for tally in tallies for value in tally.latencies_s]
    server_s = [value for tally in tallies for value in tally.server_s]
    return {
        "completed": len(latencies), "failed": sum(tally.failed for tally in tallies),
        "refused_503": sum(tally.refused for tally in tallies),
        "jobs_per_minute": 60.0 * len(latencies) / elapsed_s,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "max": max(latencies, default=None),
                      "mean": statistics.mean(latencies) if latencies else None},
        "server_seconds_mean": statistics.mean(server_s) if server_s else None,
        "errors": [error for tally in tallies for error in tally.errors][:ERRORS_KEPT],
    }


def serve_load(work: Path, clients: int = 4, seconds: float | None = 60.0, sizes: tuple[int, ...] = (64,),
               device: str = "cpu", checkpoint: Path | None = None, server_threads: int | None = None,
               bomb: bool = True, log: Callable[..., None] = print, jobs_per_client: int | None = None) -> dict:
    """The load check: ``clients`` clients submit phantoms (``sizes``: voxels square in-plane, taken in turn)
    to a real ``btcv-unetr serve`` for ``seconds`` seconds, then wait for their last jobs; or, with
    ``jobs_per_client`` (and ``seconds=None``), each runs exactly that many jobs. With ``bomb``, one 1 MB
    upload declaring a gigavoxel comes halfway through the window (at once with ``jobs_per_client``). The
    server's peak memory is read at the end.

    ``checkpoint`` defaults to the tiny model (written under ``work``). The server gets a queue with room
    for every client, a token of its own (so a ``BTCV_UNETR_TOKEN`` in the environment does not lock the
    clients out) and the precision ``auto`` resolves to here. Times are seconds.
    """
    import httpx  # the test extra's HTTP client: only the serve check needs it
    if (seconds is None) == (jobs_per_client is None):
        raise ValueError("serve_load: give seconds or jobs_per_client (and set the other to None)")
    torch_device = torch.device(device)
    named = checkpoint is not None
    checkpoint = checkpoint or tiny_checkpoint(work / "model")
    precision = checkpoint_precision(checkpoint, torch_device)
    scans = serve_scans(work / "phantoms", sizes)
    bomb_bytes = declared_nifti_gz(BOMB_SHAPE, (1.0, 1.0, 1.0)) if bomb else None
    token = secrets.token_hex(16)
    flags = ["--device", device, "--precision", precision.name, "--workers_queue", str(clients), "--token", token]
    load = f"for {seconds:g} s" if seconds is not None else f"{jobs_each(jobs_per_client)} each"
    log(f"btcv-unetr serve on {device} ({precision.name}), {clients} clients {load}; server log {work / 'server.log'}")
    with serve_process(checkpoint, work / "jobs", flags, work / "server.log", server_threads) as server:
        url = server.url
        info = httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        if info["spatial_dims"] != 3:
            raise ServeCheckError(f"{checkpoint} is a {info['spatial_dims']}D model: the serve check uploads CT "
                                  "volumes")
        warmup_s = warm_up(url, token, scans[0])
        log(f"  warm-up job {warmup_s:.2f} s")
        tallies, elapsed_s, bomb_answer = run_clients(url, token, scans, clients, seconds, jobs_per_client,
                                                      bomb_bytes)
        peak_memory = server.peak_memory_bytes()
    figures = tally_figures(tallies, elapsed_s)
    errors = figures.pop("errors")
    machine = machine_facts(torch_device, precision)
    if server_threads is not None:
        machine["threads"] = server_threads
    result = {
        "clients": clients, "serve_seconds": seconds, "elapsed_s": elapsed_s, "phantom_sizes": list(sizes),
        "scan_shapes": [list(nibabel.load(str(scan)).shape) for scan in scans],
        "checkpoint": str(checkpoint) if named else "tiny model (random weights)",
        **figures, "warmup_s": warmup_s, "errors": errors,
        "bomb": bomb_answer, "server_peak_memory_gb": None if peak_memory is None else peak_memory / 2**30,
        "server": {"precision": info.get("precision"), "device": info.get("device")},
        "machine": machine,
    }
    if jobs_per_client is not None:  # the command line's record keeps its keys; a fixed-jobs run says so
        result["jobs_per_client"] = jobs_per_client
    return result


def run_serve(args: argparse.Namespace) -> dict:
    """The serve load check with the command line's settings, in a fresh temporary folder (removed after a
    check that ran; kept, with the server's log, after one that could not)."""
    work = Path(tempfile.mkdtemp(prefix="btcv_bench_serve_"))
    log = print if not args.silent else (lambda *a, **k: None)
    checkpoint = args.serve_checkpoint.resolve() if args.serve_checkpoint else None
    results = serve_load(work, args.clients, args.serve_seconds, args.serve_sizes, args.device, checkpoint, log=log)
    shutil.rmtree(work, ignore_errors=True)  # phantoms and job folders: the figures are all that is kept
    return results


def jobs_each(jobs: int) -> str:
    """``jobs`` with its noun: 1 job, 3 jobs."""
    return f"{jobs} job" if jobs == 1 else f"{jobs} jobs"


def serve_table(r: dict) -> str:
    """The serve check's record ``r`` (:func:`serve_load`) as text: one line of settings, one row per figure."""
    m, latency = r["machine"], r["latency_s"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    shapes = ", ".join("x".join(map(str, shape)) for shape in r["scan_shapes"])
    peak_gb = r["server_peak_memory_gb"]
    rows = [("jobs completed", str(r["completed"])), ("jobs failed", str(r["failed"])),
            ("queue full (503), retried", str(r["refused_503"])), ("jobs per minute", f"{r['jobs_per_minute']:.1f}"),
            ("latency p50, s", seconds(latency["p50"])), ("latency p95, s", seconds(latency["p95"])),
            ("latency max, s", seconds(latency["max"])),
            ("server seconds per job (mean)", seconds(r["server_seconds_mean"])),
            ("server peak memory, GB", "-" if peak_gb is None else f"{peak_gb:.2f}")]
    load = f"submitting for {r['serve_seconds']:g} s" if r.get("jobs_per_client") is None \
        else f"{jobs_each(r['jobs_per_client'])} each"
    lines = [f"serve load check: {r['clients']} clients {load} "
             f"({r['elapsed_s']:.0f} s until their last jobs were done); {r['checkpoint']}; scans {shapes}"]
    lines += [f"{name:32s} {value:>8s}" for name, value in rows]
    lines += [
        "latency: from POST /jobs to the mask downloaded, polling the job every "
        f"{SERVE_POLL_S:g} s (warm-up job before the clock: {r['warmup_s']:.2f} s)",
        f"machine: {m['gpu'] or m['model']}, {m['threads']} threads, torch {m['torch']} ({m['capability']} kernels), "
        f"server on {r['server']['device']}",
        f"precision {m['precision']['name']}: {m['precision']['reason']}",
    ]
    if r["bomb"]:
        b = r["bomb"]
        lines.append(f"bomb: {b['bytes'] / 2**20:.1f} MB declaring {' x '.join(map(str, BOMB_SHAPE))} voxels, sent "
                     f"{'halfway' if r.get('jobs_per_client') is None else 'with the first jobs'}: answered in "
                     f"{b['answer_s']:.2f} s: {b['detail']}")
    lines += [f"error: {error}" for error in r["errors"]]
    return "\n".join(lines)
