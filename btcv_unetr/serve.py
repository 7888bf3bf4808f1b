"""``btcv-unetr serve``: a REST service and a web page for people who do not run Python.

    btcv-unetr serve --checkpoint runs/demo/model.pt [--host 127.0.0.1] [--port 8000] [--token T]

FastAPI on uvicorn (``pip install 'btcv-unetr[serve]'``). The model is loaded once; uploads become
jobs that one worker thread runs in order (one inference at a time on the device), so a client gets
``202`` and a job id at once and polls the job. Routes:

    GET    /                       the web page (btcv_unetr/web/index.html)
    GET    /health                 liveness (never needs the token)
    GET    /info                   model, classes with names and colours, ROI, spacing, precision, version
    POST   /jobs                   multipart field ``file``: .nii/.nii.gz, a .zip of one DICOM series, or
                                   (2D models) PNG/JPEG -> 202 {"id": ...}
    GET    /jobs, /jobs/{id}       state (queued, running with window progress, done, failed with a reason)
    GET    /jobs/{id}/mask         the mask in the input's geometry (NIfTI uint8; PNG for pictures)
    GET    /jobs/{id}/overlay.png  slices (3D) or the picture (2D) with the mask in the class colours
    GET    /jobs/{id}/volumes      per-class volume in mL (pixel counts in 2D)
    GET    /jobs/{id}/preview      3D: windowed CT and mask bytes for the page's slice viewer (see preview_bytes)
    DELETE /jobs/{id}              removes a job and its files
    POST   /segment                the same upload for small inputs; answers with the mask itself

A job's record gives its state, ``progress`` (windows run / windows to run, 0..1), ``queue_position``
(1: next to run) while it waits, its input's ``shape`` and ``spacing`` (mm; 1 for pictures), the
``seconds`` it ran and the ``error`` line of a failed job. ``/info`` gives ``spacing`` null for 2D models.

Every client mistake is a 4xx with ``{"detail": "one line"}``: unreadable or truncated files, wrong
dimensions, too large (413), queue full (503 with ``Retry-After``), unknown job (404), no token (401).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .config import Config, add_config_arguments, config_from_args
from .data import class_names
from .errors import UserError
from .files import atomic_write, atomic_write_text
from .images import read_volume, write_mask
from .jobs import Job, JobStore

TOKEN_VARIABLE = "BTCV_UNETR_TOKEN"
PREVIEW_SIDE = 256  # the page's slice viewer gets at most this many voxels along each axis
MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The service's own settings (the model's come from its checkpoint)."""

    jobs_dir: Path
    max_upload_mb: float = 1024.0
    sync_max_mb: float = 64.0
    workers_queue: int = 16
    keep_jobs: int = 100
    keep_hours: float = 24.0
    token: str | None = None


# --- the work of one job --------------------------------------------------------------------------


def organ_volumes(labels: np.ndarray, affine: np.ndarray | None, names: list[str]) -> dict:
    """Voxel counts and volumes in mL of classes ``1..len(names)``; pictures (no ``affine``): pixel counts."""
    counts = np.bincount(labels.ravel(), minlength=len(names) + 1)
    from .plots import class_colours
    colours = class_colours(len(names) + 1).tolist()
    millilitres = None if affine is None else abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {"unit": "pixels" if affine is None else "mL",
            "organs": [{"index": index, "name": name, "color": colours[index], "voxels": int(counts[index]),
                        "volume_ml": None if millilitres is None else round(float(counts[index]) * millilitres, 3)}
                       for index, name in enumerate(names, start=1)]}


def preview_bytes(image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  window: tuple[float, float]) -> tuple[bytes, dict]:
    """The page's viewer data: CT windowed to uint8 and the mask, both ``(nx, ny, nz)`` in RAS+ voxel order
    (x grows toward the patient's right, y anterior, z superior), C order, one after the other; strided
    so that ``nx, ny <= PREVIEW_SIDE`` and ``nz <= PREVIEW_SIDE``; and ``{"shape", "spacing"}`` (mm,
    after the stride), sent as the ``X-Shape`` and ``X-Spacing`` headers."""
    from .plots import to_display_order
    image, labels, spacing = to_display_order(image, labels, affine)
    step_xy = max(1, math.ceil(max(image.shape[:2]) / PREVIEW_SIDE))
    step_z = max(1, math.ceil(image.shape[2] / PREVIEW_SIDE))
    image, labels = image[::step_xy, ::step_xy, ::step_z], labels[::step_xy, ::step_xy, ::step_z]
    low, high = window
    grey = np.clip((image.astype(np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    facts = {"shape": list(grey.shape),
             "spacing": [round(float(s) * k, 4) for s, k in zip(spacing, (step_xy, step_xy, step_z))]}
    return np.ascontiguousarray(grey).tobytes() + np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), facts


class Segmenter:
    """Runs one job: the predictor on the job's input, then mask, volumes, overlay and preview in its folder."""

    def __init__(self, predictor, store: JobStore):
        self.predictor, self.store = predictor, store
        model = predictor.config.model
        self.names = class_names(predictor.config.data, model.out_channels)
        self.pictures = model.spatial_dims == 2
        self._drawing = threading.Lock()

    def __call__(self, job: Job) -> None:
        folder = self.store.folder(job.id)
        path = folder / job.input
        predictor = self.predictor
        image = predictor.prepare(path)
        job.windows_total = predictor.window_count(image)

        def count(windows: int) -> None:
            job.windows_done += windows

        predictor.on_windows = count
        try:
            labels, _ = predictor.to_scan(predictor.probabilities(image), image, keep_probabilities=False)
        finally:
            predictor.on_windows = None
        if not folder.is_dir():  # deleted while it ran
            return
        self._write_outputs(job, folder, path, labels)

    def _write_outputs(self, job: Job, folder: Path, path: Path, labels: np.ndarray) -> None:
        mask = folder / ("mask.png" if self.pictures else "mask.nii.gz")
        write_mask(labels, path, mask)
        # The scan is read again for its own voxels (the predictor saw them preprocessed); a picture needs none.
        volume = None if self.pictures else read_volume(path)
        affine = None if volume is None else np.asarray(volume.affine)
        atomic_write_text(folder / "volumes.json", json.dumps(organ_volumes(labels, affine, self.names)))
        job.outputs = {"mask": mask.name, "volumes": "volumes.json"}
        if volume is not None:
            image = np.asarray(volume.data).reshape(volume.shape[:3])
            data = self.predictor.config.data
            content, job.preview = preview_bytes(image, labels, affine, (data.a_min, data.a_max))
            atomic_write(folder / "preview.bin", lambda tmp: tmp.write_bytes(content))
            job.outputs["preview"] = "preview.bin"

    def draw_overlay(self, job: Job) -> Path | None:
        """``overlay.png`` of a done job, drawn on first request (outside the inference worker: matplotlib
        takes longer than a small scan's windows); None without matplotlib."""
        folder = self.store.folder(job.id)
        out = folder / "overlay.png"
        with self._drawing:  # one picture at a time: pyplot's state is global
            if out.is_file():
                return out
            path, mask = folder / job.input, folder / job.outputs["mask"]
            volume, labels = read_volume(path), np.asarray(read_volume(mask).data)
            if self.pictures:
                from .plots import save_picture_overlay
                save_picture_overlay(np.asarray(volume.data), labels, out)
                return out
            from .plots import save_overlay, to_display_order
            image, labels, spacing = to_display_order(np.asarray(volume.data).reshape(volume.shape[:3]), labels,
                                                      np.asarray(volume.affine))
            return out if save_overlay(image, labels, spacing, out, title=job.name) else None


# --- the command ------------------------------------------------------------------------------------


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
    from .infer import with_weights_file
    config = with_weights_file(config, path)
    return dataclasses.replace(config, infer=dataclasses.replace(config.infer, sw_progress=False))


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: FastAPI's form uploads)
        import uvicorn
    except ImportError:
        raise UserError("serve needs the serve extra: pip install 'btcv-unetr[serve]' (FastAPI, uvicorn, "
                        "python-multipart, matplotlib)") from None
    settings = settings_from_args(args)
    check_port_free(args.host, args.port)  # before the model loads: that takes seconds
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(f"warning: serving on {args.host} without a token: anyone who reaches this port can use the service "
              f"(set --token or {TOKEN_VARIABLE})", file=sys.stderr)
    from .infer import Predictor
    from .webapp import create_app
    predictor = Predictor(predictor_config(config_from_args(args)))
    app = create_app(predictor, settings)
    print(f"serving on http://{args.host}:{args.port} (jobs in {settings.jobs_dir})", flush=True)
    started = time.time()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print(f"stopped after {time.time() - started:.0f} s")
    return 0
