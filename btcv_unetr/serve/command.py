"""``btcv-unetr serve``: the command line (flags, checks before the model loads, uvicorn).

    btcv-unetr serve --checkpoint runs/demo/model.pt [--host 127.0.0.1] [--port 8000] [--token T]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from ..config import Config, add_config_arguments, config_from_args
from ..errors import UserError
from .settings import TOKEN_VARIABLE, ServeSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; 0.0.0.0 exposes the service)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--jobs_dir", default=None,
                        help="job folders (inputs and results); default: btcv-unetr-jobs in the system's temp folder")
    parser.add_argument("--max_upload_mb", type=float, default=1024.0, help="largest upload to POST /jobs")
    parser.add_argument("--sync_max_mb", type=float, default=64.0, help="largest upload to POST /segment")
    parser.add_argument("--workers_queue", type=int, default=16, help="waiting jobs before 503 (queue full)")
    parser.add_argument("--keep_jobs", type=int, default=100, help="finished jobs kept (oldest removed first)")
    parser.add_argument("--keep_hours", type=float, default=24.0, help="finished jobs are removed after this age")
    parser.add_argument("--token", default=None,
                        help=f"bearer token every route but / and /health requires (or set {TOKEN_VARIABLE})")
    add_config_arguments(parser, "serve")


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    if args.max_upload_mb <= 0 or args.sync_max_mb <= 0:
        raise UserError("--max_upload_mb and --sync_max_mb must be > 0")
    jobs_dir = Path(args.jobs_dir) if args.jobs_dir else Path(tempfile.gettempdir()) / "btcv-unetr-jobs"
    return ServeSettings(jobs_dir=jobs_dir, max_upload_mb=args.max_upload_mb, sync_max_mb=args.sync_max_mb,
                         workers_queue=args.workers_queue, keep_jobs=args.keep_jobs, keep_hours=args.keep_hours,
                         token=args.token or os.environ.get(TOKEN_VARIABLE) or None)


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's log lines after the model has loaded."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") \
            from None


def predictor_config(config: Config) -> Config:
    """Inference settings for the service: the checkpoint as the pretrained model, no files or reports of its own."""
    if not config.train.checkpoint:
        raise UserError("serve: --checkpoint FILE is required (a training checkpoint, a state dict or a TorchScript "
                        "file)")
    path = Path(config.train.checkpoint)
    if not path.is_file():
        raise UserError(f"serve: checkpoint not found: {path}")
    from ..infer import with_weights_file
    config = with_weights_file(config, path)
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
    from ..infer import Predictor
    from .app import create_app
    predictor = Predictor(predictor_config(config_from_args(args)))
    app = create_app(predictor, settings)
    print(f"serving on http://{args.host}:{args.port} (jobs in {settings.jobs_dir})", flush=True)
    started = time.time()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print(f"stopped after {time.time() - started:.0f} s")
    return 0
