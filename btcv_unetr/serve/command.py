"""``btcv-unetr serve``: the command line (flags, checks before the model loads, uvicorn).

    btcv-unetr serve --checkpoint runs/demo/model.pt [--host 127.0.0.1] [--port 8000] [--token T]
    btcv-unetr serve --checkpoint runs/cv   (an ensemble: the folds' fold_K/model.pt; or --checkpoints A.pt B.pt)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import Config
from ..errors import UserError
from .jobs import SPOOL, open_jobs_folder
from .limits import JOB_MEMORY_FRACTION, MAX_DICOM_FILES, MAX_EXTENT_MM, MAX_PIXELS, MAX_VOXELS, JobLimits
from .settings import TOKEN_VARIABLE, ServeSettings, default_jobs_dir

# The config flags of ``serve``: the model and its weights, and how each job's inference runs.
SERVE_FLAGS: CommandFlags = {
    "model": None, "train": ("checkpoint", "precision"),
    "infer": ("infer_overlap", "sw_batch_size", "mode", "tta", "device", "checkpoints"),
    "data": ("crop_before_resampling",), "fast": ("malloc_tuning", "sdpa", "compile", "channels_last")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; 0.0.0.0 exposes the service)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--jobs_dir", default=None,
                        help="job folders (inputs and results: patient data, kept private); default: "
                             "$XDG_DATA_HOME/btcv-unetr/jobs (~/.local/share/btcv-unetr/jobs)")
    parser.add_argument("--max_upload_mb", type=float, default=1024.0, help="largest upload to POST /jobs")
    parser.add_argument("--sync_max_mb", type=float, default=64.0, help="largest upload to POST /segment")
    parser.add_argument("--workers_queue", type=int, default=16, help="waiting jobs before 503 (queue full)")
    parser.add_argument("--keep_jobs", type=int, default=100, help="finished jobs kept (oldest removed first)")
    parser.add_argument("--keep_hours", type=float, default=24.0, help="finished jobs are removed after this age")
    parser.add_argument("--max_voxels", type=float, default=MAX_VOXELS,
                        help="largest 3D scan in voxels, from its header (default 1e9: a whole-body CT at 0.8 mm "
                             "is about 6e8)")
    parser.add_argument("--max_extent_mm", default=",".join(f"{v:g}" for v in MAX_EXTENT_MM),
                        help="largest field of view in mm, three numbers compared with the scan's extents sorted "
                             "(default 800,800,2200: wider than a CT gantry or longer than a body is refused)")
    parser.add_argument("--max_pixels", type=float, default=MAX_PIXELS,
                        help="largest picture for a 2D model, from its header (default 6.4e7: 8000 x 8000)")
    parser.add_argument("--max_dicom_files", type=int, default=MAX_DICOM_FILES, help="most files in a DICOM zip")
    parser.add_argument("--max_job_memory_gb", type=float, default=0.0,
                        help=f"refuse a scan whose job would need more memory than this, estimated from its header "
                             f"(default 0: {JOB_MEMORY_FRACTION:.0%}% of this machine's memory)")  # %% for argparse
    parser.add_argument("--job_timeout_s", type=float, default=3600.0,
                        help="a running job is stopped (failed) after this many seconds (0: no limit)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token every route but / and /health requires (or set {TOKEN_VARIABLE})")
    parser.add_argument("--dicomweb", default=None, metavar="URL",
                        help="a PACS's DICOMweb root (Orthanc: http://host:8042/dicom-web): POST /jobs then takes "
                             '{"study_uid", "series_uid"} of a series there, and stores its DICOM SEG back (STOW-RS)')
    add_config_arguments(parser, SERVE_FLAGS)


def limits_from_args(args: argparse.Namespace) -> JobLimits:
    try:
        extent = tuple(float(v) for v in args.max_extent_mm.split(","))
    except ValueError:
        extent = ()
    if len(extent) != 3 or min(extent) <= 0:
        raise UserError(f"--max_extent_mm {args.max_extent_mm!r}: give three positive numbers, e.g. 800,800,2200")
    if min(args.max_voxels, args.max_pixels, args.max_dicom_files) <= 0 or args.max_job_memory_gb < 0:
        raise UserError("--max_voxels, --max_pixels and --max_dicom_files must be > 0, --max_job_memory_gb >= 0")
    return JobLimits(max_voxels=int(args.max_voxels), max_extent_mm=extent, max_pixels=int(args.max_pixels),
                     max_dicom_files=args.max_dicom_files, max_job_memory_gb=args.max_job_memory_gb)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    if args.max_upload_mb <= 0 or args.sync_max_mb <= 0:
        raise UserError("--max_upload_mb and --sync_max_mb must be > 0")
    jobs_dir = Path(args.jobs_dir).expanduser() if args.jobs_dir else default_jobs_dir()
    return ServeSettings(jobs_dir=jobs_dir, max_upload_mb=args.max_upload_mb, sync_max_mb=args.sync_max_mb,
                         workers_queue=args.workers_queue, keep_jobs=args.keep_jobs, keep_hours=args.keep_hours,
                         token=args.token or os.environ.get(TOKEN_VARIABLE) or None, limits=limits_from_args(args),
                         job_timeout_s=args.job_timeout_s, dicomweb=dicomweb_from_args(args.dicomweb))


def dicomweb_from_args(url: str | None) -> str | None:
    """``--dicomweb``: an http(s) URL without credentials, and the dicom extra that writes the SEGs it stores."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
        raise UserError(f"--dicomweb {url!r}: give the PACS's DICOMweb root as http(s)://host:port/path, without "
                        "credentials or query (Orthanc: http://host:8042/dicom-web)")
    from ..inference.dicom_seg import require_highdicom
    require_highdicom("--dicomweb")
    return url.rstrip("/")


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's log lines after the model has loaded."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") \
            from None


def predictor_config(config: Config) -> Config:
    """Inference settings for the service: the checkpoint as the pretrained model, no files or reports of its own.

    An ensemble: ``--checkpoints FILE ...`` (as ``test.py`` takes it), or ``--checkpoint`` a cross-validation run
    folder (its ``fold_K/model.pt``).
    """
    given, ensemble = config.train.checkpoint, config.infer.checkpoints
    if given and ensemble:
        raise UserError("serve: give --checkpoint (one model, or a run folder's folds) or --checkpoints (an "
                        "ensemble), not both")
    if not given and not ensemble:
        raise UserError("serve: --checkpoint FILE is required (a training checkpoint, a state dict or a TorchScript "
                        "file; a cross-validation run folder, or --checkpoints FILE ..., serves an ensemble)")
    if given and Path(given).is_dir():
        config = dataclasses.replace(config, infer=dataclasses.replace(config.infer, checkpoints=[given]))
    elif given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"serve: checkpoint not found: {path}")
        from ..inference.loader import with_weights_file
        config = with_weights_file(config, path)  # a TorchScript file sets --saved_checkpoint torchscript: kept
    return dataclasses.replace(config, infer=dataclasses.replace(config.infer, sw_progress=False))


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (FastAPI's form uploads)
        import uvicorn
    except ImportError:
        raise UserError("serve needs the serve extra: pip install 'btcv-unetr[serve]' (FastAPI, uvicorn, "
                        "python-multipart, matplotlib)") from None
    settings = settings_from_args(args)
    check_port_free(args.host, args.port)  # before the model loads: that takes seconds
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(f"warning: serving on {args.host} without a token: anyone who reaches this port can use the service "
              f"(set --token or {TOKEN_VARIABLE})", file=sys.stderr)
    open_jobs_folder(settings.jobs_dir)  # before the model loads: that takes seconds
    with private_files(settings.jobs_dir):
        app = build_app(args, settings)
        print(f"serving on http://{args.host}:{args.port} (jobs in {settings.jobs_dir})", flush=True)
        started = time.time()
        serve_until_signal(uvicorn, app, args.host, args.port)
    print(f"stopped after {time.time() - started:.0f} s")
    return 0


@contextlib.contextmanager
def private_files(jobs_dir: Path) -> Iterator[None]:
    """While the block runs, every file and folder this process writes (scans, masks, spooled uploads) is the
    user's only, and the web framework spools large uploads to the private jobs folder, not /tmp. Both are
    restored afterwards, so that a caller in the same process (cli.main in a test, a refusal while the model
    loads, the in-process service of the tests) is left as it was."""
    umask, spool = os.umask(0o077), tempfile.tempdir
    tempfile.tempdir = str(jobs_dir / SPOOL)
    try:
        yield
    finally:
        os.umask(umask)
        tempfile.tempdir = spool


def build_app(args: argparse.Namespace, settings: ServeSettings):
    """The FastAPI application for parsed ``serve`` flags: the model loaded once, the job queue ready to start
    with the application. The process-wide settings (umask, spool folder) are :func:`run`'s, so that tests
    can build the same application in their own process (``btcv_unetr.testing.app``)."""
    from ..inference.predictor import Predictor
    from .app import create_app
    return create_app(Predictor(predictor_config(config_from_args(args))), settings)


def serve_until_signal(uvicorn, app, host: str, port: int) -> None:
    """Run uvicorn until Ctrl-C or SIGTERM, then stop cleanly: the application's shutdown keeps the queued jobs.

    uvicorn re-raises the signal it caught once it has stopped, which would end the process by the signal
    (SIGTERM: killed; SIGINT: a KeyboardInterrupt). The handlers in place while it runs swallow that
    repeat, so a requested stop exits 0.
    """
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
