"""What the service's routes share: the loaded model, the job store and queue, the settings.

    Service         receives uploads (and PACS series) into checked jobs, answers for jobs and their outputs
    service         the FastAPI dependency that gives a route the application's :class:`Service`
    authorised      the FastAPI dependency of every API route: the bearer token
    token_accepted  the token check itself (the request gate uses it before a body is read)
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import secrets
import shutil
import zipfile

from fastapi import Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response

from .. import __version__
from ..data.checks import Expected
from ..data.datalist import class_names
from ..inference.plots import class_colours
from ..io.card import card_warning, model_card_lines
from .jobs import Job, JobQueue, JobStore, QueueFull
from .limits import GB, Declared, job_memory_bytes
from .pacs import PacsError, check_uid, retrieve_series
from .settings import MB, ServeSettings
from .uploads import MAX_ZIP_EXPANSION, BadUpload, input_notes, safe_name, store_series, store_upload
from .worker import Segmenter

SEGMENT_POLL_S = 0.05
PACS_REQUEST = ('send {"study_uid": "...", "series_uid": "..."} (the series to segment), optionally with "store": '
                '["seg", "rtstruct", "overlay"] (what to store back; default ["seg"])')
STORABLE = ("seg", "rtstruct", "overlay")
DELETE_WAIT_S = 10.0  # a DELETE of a running job waits this long for it to stop at its next window
TOKEN_REFUSAL = "missing or wrong token: send the header 'Authorization: Bearer <token>'"


class Service:
    """The loaded model and the jobs; one per application."""

    def __init__(self, predictor, settings: ServeSettings):
        self.predictor, self.settings = predictor, settings
        self.store = JobStore(settings.jobs_dir, settings.keep_jobs, settings.keep_hours)
        removed, waiting = self.store.open()
        if removed:
            print(f"removed {len(removed)} incomplete or expired job(s) from {settings.jobs_dir}")
        self.segmenter = Segmenter(predictor, self.store, settings.dicomweb)
        self.queue = JobQueue(self.store, self.segmenter, settings.workers_queue, settings.job_timeout_s)
        self._requeue(waiting)
        model, data = predictor.config.model, predictor.config.data
        # The model's preprocessed grid: how sheared a scan's affine may be and still map back (as test.py checks).
        self.expected = Expected(model.spatial_dims, model.in_channels, pixdim=data.pixdim, axcodes=data.axcodes)

    def _requeue(self, waiting: list[Job]) -> None:
        """The jobs a clean stop kept, in their order; beyond a lowered --workers_queue they fail."""
        for job in waiting:
            try:
                self.queue.submit(job)
            except QueueFull:
                job.state, job.error = "failed", "not run: the queue limit (--workers_queue) was lowered"
                job.finished_event.set()
                self.store.save(job)
        if waiting:
            print(f"{len(waiting)} job(s) kept from the last stop are queued again")

    def job_memory(self, declared: Declared) -> int:
        """Peak memory estimate of a job on ``declared`` with this model (bytes)."""
        config = self.predictor.config
        spacing = None if config.model.spatial_dims == 2 else (config.data.space_x, config.data.space_y,
                                                                config.data.space_z)
        return job_memory_bytes(declared, config.model, spacing, self.predictor.sw_batch_size,
                                len(self.predictor.models), self.predictor.member_models)

    def info(self) -> dict:
        """The model (with its card and what its masks are made with) and this server's limits."""
        config = self.predictor.config
        model, data = config.model, config.data
        names = ["background"] + class_names(data, model.out_channels)
        colours = class_colours(model.out_channels).tolist()
        # The net by name ("Swin UNETR", "ensemble of 2: UNETR, SegResNet"); each one's settings: provenance.networks.
        return {"name": "btcv-unetr", "version": __version__, "model": self.predictor.network,
                "model_name": model.model_name if len(self.predictor.models) == 1 else "ensemble",
                "spatial_dims": model.spatial_dims, "in_channels": model.in_channels, "roi_size": list(model.roi_size),
                "classes": [{"index": i, "name": n, "color": colours[i]} for i, n in enumerate(names)],
                "spacing": None if model.spatial_dims == 2 else [data.space_x, data.space_y, data.space_z],
                "precision": self.predictor.precision.name, "device": str(self.predictor.device),
                "max_upload_mb": self.settings.max_upload_mb, "sync_max_mb": self.settings.sync_max_mb,
                "inputs": [".png", ".jpg", ".jpeg"] if model.spatial_dims == 2 else [".nii", ".nii.gz", ".zip"],
                "model_card": self.model_card(), "provenance": self.predictor.provenance(),
                "limits": dataclasses.asdict(self.settings.limits) | {
                    "max_job_memory_gb": round(self.settings.limits.job_memory_bytes / GB, 2),
                    "job_timeout_s": self.settings.job_timeout_s},
                "pacs": bool(self.settings.dicomweb)}

    def model_card(self) -> dict:
        """The checkpoint's model card (an empty one for files without), with the lines ``test.py`` prints as
        ``summary`` (its first) and ``lines``, and ``warning``: the plain sentence a page shows beside every
        result of a model trained on synthetic data or never trained (None otherwise)."""
        card = self.predictor.model_card
        lines = model_card_lines(card)
        return {**(card or {}), "warning": card_warning(card), "summary": lines[0], "lines": lines}

    def receive(self, upload: UploadFile, series_uid: str | None = None) -> Job:
        """The upload in a new job folder as a checked ``input.*`` (blocking: call it in a worker thread);
        ``series_uid`` picks the series of a DICOM zip that holds several."""
        if series_uid is not None:
            try:
                check_uid(series_uid, "series_uid")
            except PacsError as exc:
                raise HTTPException(exc.status, exc.detail) from None
        job_id, folder = self.store.new_folder()
        display = safe_name(upload.filename)
        try:
            part = folder / "upload.part"
            with open(part, "wb") as out:
                shutil.copyfileobj(upload.file, out, MB)
            kind, path, declared = store_upload(part, folder, display, self.expected,
                                                int(self.settings.max_upload_mb * MB), self.settings.limits,
                                                self.job_memory, series_uid)
        except BadUpload as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, exc.detail) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job(job_id, display, kind, path.name, [int(n) for n in declared.shape],
                   [round(float(s), 4) for s in declared.spacing], notes=input_notes(folder))

    def receive_from_pacs(self, body: object) -> Job:
        """Series ``{"study_uid", "series_uid"}`` of the ``--dicomweb`` PACS in a new job folder's ``dicom/``, checked
        and converted as an uploaded DICOM zip is (blocking: call it in a worker thread)."""
        if not self.settings.dicomweb:
            raise HTTPException(400, "this server has no PACS (start it with --dicomweb URL): send the image as the "
                                     "multipart form field 'file'")
        if not isinstance(body, dict) or not {"study_uid", "series_uid"} <= set(body):
            raise HTTPException(400, PACS_REQUEST)
        if self.expected.spatial_dims != 3:
            raise HTTPException(400, "this model takes pictures, not DICOM series: send a PNG or JPEG file")
        store = body.get("store", ["seg"])
        if not isinstance(store, list) or not all(isinstance(s, str) and s in STORABLE for s in store):
            raise HTTPException(400, f"'store' must be a list of {', '.join(STORABLE)}: {PACS_REQUEST}")
        try:
            study, series = check_uid(body["study_uid"], "study_uid"), check_uid(body["series_uid"], "series_uid")
        except PacsError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        job_id, folder = self.store.new_folder()
        display = safe_name(series)
        try:
            # The series unpacked, as a zip's is: at most MAX_ZIP_EXPANSION times the upload limit.
            retrieve_series(self.settings.dicomweb, study, series, folder / "dicom",
                            int(MAX_ZIP_EXPANSION * self.settings.max_upload_mb * MB),
                            self.settings.limits.max_dicom_files)
            kind, path, declared = store_series(folder / "dicom", folder, display, self.settings.limits,
                                                self.job_memory)
        except (BadUpload, PacsError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, exc.detail) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = Job(job_id, display, kind, path.name, [int(n) for n in declared.shape],
                  [round(float(s), 4) for s in declared.spacing], notes=input_notes(folder))
        job.pacs = {"study_uid": study, "series_uid": series, "store": list(dict.fromkeys(store))}
        return job

    def queue_full(self) -> HTTPException:
        return HTTPException(503, f"the queue holds its limit of {self.settings.workers_queue} waiting jobs: try again "
                                  "later", headers={"Retry-After": str(self.queue.retry_after())})

    def enqueue(self, job: Job) -> None:
        self.store.prune()  # expired jobs go at each new one too, not only when a job finishes
        self.store.add(job)
        try:
            self.queue.submit(job)
        except QueueFull:  # filled while this upload was read (the gate refuses uploads to a full queue)
            self.store.delete(job.id)
            raise self.queue_full() from None

    async def delete(self, job: Job) -> Response:
        """204 once the job and its files are gone; 202 for a running job that has not yet reached its next
        window (it stops there and is removed)."""
        if job.state == "running":
            self.queue.delete_running(job)
            waited = 0.0
            while not job.finished_event.is_set() and waited < DELETE_WAIT_S:
                await asyncio.sleep(SEGMENT_POLL_S)
                waited += SEGMENT_POLL_S
            return Response(status_code=204 if job.finished_event.is_set() else 202)
        if job.state == "queued":  # the worker skips it; a /segment call waiting for it is answered
            job.state, job.error = "failed", "deleted before it ran"
            job.finished_event.set()
        self.store.delete(job.id)
        return Response(status_code=204)

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id} (unknown, deleted, or removed by the retention limit)")
        return job

    def finished(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.state != "done":
            why = f": {job.error}" if job.error else ": poll GET /jobs/{id} until it is done"
            raise HTTPException(409, f"job {job_id} is {job.state}{why}")
        return job

    def output(self, job: Job, key: str, media_type: str, download: str | None = None) -> FileResponse:
        name = job.outputs.get(key)
        if name is None:
            raise HTTPException(404, f"job {job.id} has no {key}: not written")
        headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else None
        return FileResponse(self.store.folder(job.id) / name, media_type=media_type, headers=headers)

    def zipped(self, job: Job, key: str, download: str) -> Response:
        """The folder output ``key`` of a job as one zip (stored: DICOM images compress little), in memory."""
        folder = self.store.folder(job.id) / job.outputs[key]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, path.name)
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{download}"'})

    def mask(self, job: Job) -> FileResponse:
        picture = job.outputs["mask"].endswith(".png")
        suffix = ".png" if picture else ".nii.gz"
        return self.output(job, "mask", "image/png" if picture else "application/gzip", f"{job.name}_seg{suffix}")

    def view(self, job: Job) -> dict:
        base = f"/jobs/{job.id}"
        links = {"mask": f"{base}/mask", "overlay": f"{base}/overlay.png", "volumes": f"{base}/volumes",
                 **({kind: f"{base}/{kind}" for kind in ("seg", "rtstruct", "overlay_series") if kind in job.outputs})}
        return {"id": job.id, "state": job.state, "progress": round(job.progress, 4),
                "windows_done": job.windows_done, "windows_total": job.windows_total, "error": job.error,
                "name": job.name, "kind": job.kind, "shape": job.shape, "spacing": job.spacing,
                "created": job.created, "started": job.started, "finished": job.finished, "seconds": job.seconds,
                "queue_position": self.queue.position(job.id) if job.state == "queued" else None, "links": links,
                "pacs": job.pacs, "stored_to_pacs": job.stored_to_pacs, "provenance": job.provenance,
                "notes": job.notes}


def service(request: Request) -> Service:
    return request.app.state.service


def token_accepted(token: str | None, authorization: str | None) -> bool:
    """Whether ``authorization`` carries ``token`` (any token when none is set); the scheme's name is
    case-insensitive (RFC 7235)."""
    if not token:
        return True
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(), token.encode())


def authorised(request: Request, authorization: str | None = Header(default=None)) -> None:
    """The routes' own check (the gate has already refused a wrong token before reading the body)."""
    if not token_accepted(service(request).settings.token, authorization):
        raise HTTPException(401, TOKEN_REFUSAL, headers={"WWW-Authenticate": "Bearer"})
