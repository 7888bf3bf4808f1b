"""``btcv-unetr serve``'s application in the test's own process: the routes, the request gate, the job queue
and the worker thread exactly as the server runs them, without a child process or a socket.

    in_process_service  yields a client (``httpx.Client`` API) on the application built from ``serve`` flags,
                        its lifespan (the job worker) running; the service object is ``client.service``
    held_jobs           while the block runs, each job the worker takes waits in state "running" (a cancel, a
                        time limit or the server's stop still ends it), whatever the machine's speed

Starlette's ``TestClient`` is httpx over the ASGI application that also runs its lifespan (httpx's own
``ASGITransport`` does not, and the lifespan starts the job worker). The real uvicorn stays for what only a
real server shows: a refusal before the body is sent, signals and shutdown, the browser, DICOMweb.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def in_process_service(checkpoint: Path, jobs_dir: Path | None, *flags: str) -> Iterator:
    """The service for ``serve --checkpoint checkpoint --jobs_dir jobs_dir *flags`` (float32 on the CPU unless
    ``flags`` say otherwise), with the umask and upload spool that ``serve`` sets for its process, restored
    afterwards. ``jobs_dir`` None gives no ``--jobs_dir``: the default folder, as ``serve`` finds it."""
    from fastapi.testclient import TestClient

    from ..serve.command import add_arguments, build_app, private_files, settings_from_args
    from ..serve.jobs import open_jobs_folder

    folder = [] if jobs_dir is None else ["--jobs_dir", str(jobs_dir)]
    argv = ["--checkpoint", str(checkpoint), *folder, "--precision", "fp32", "--device", "cpu", *flags]
    parser = argparse.ArgumentParser(prog="btcv-unetr serve")
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    open_jobs_folder(settings.jobs_dir)
    with private_files(settings.jobs_dir):
        app = build_app(args, settings)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            client.service = app.state.service
            yield client


@contextlib.contextmanager
def held_jobs(service) -> Iterator[None]:
    """Each job ``service``'s worker takes during the block waits in "running" until the block ends, or until it is
    cancelled or its time is up (then it ends as such a job ends: :meth:`Job.check_cancelled` raises)."""
    release = threading.Event()
    work = service.queue.work

    def held(job) -> None:
        while not release.wait(0.02):
            job.check_cancelled()
        work(job)

    service.queue.work = held
    try:
        yield
    finally:
        release.set()
        service.queue.work = work
