"""The FastAPI application of ``btcv-unetr serve`` (routes listed in :mod:`btcv_unetr.serve`).

    Service      what the routes share: the loaded predictor, the job store and queue, the settings
    UploadGate   ASGI middleware: 503 (queue full) and 413 (over the limit) before an upload is read
    create_app   the application around a loaded :class:`~btcv_unetr.infer.Predictor`

Imported only by ``serve.command`` (FastAPI is the optional ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..checks import Expected
from ..data import class_names
from ..plots import class_colours
from .jobs import Job, JobQueue, JobStore, QueueFull
from .settings import MB, ServeSettings
from .uploads import BadUpload, safe_name, store_upload
from .worker import Segmenter

UPLOAD_ROUTES = ("/jobs", "/segment")
SEGMENT_POLL_S = 0.05


class Service:
    """The loaded model and the jobs; one per application."""

    def __init__(self, predictor, settings: ServeSettings):
        self.predictor, self.settings = predictor, settings
        self.store = JobStore(settings.jobs_dir, settings.keep_jobs, settings.keep_hours)
        removed = self.store.open()
        if removed:
            print(f"removed {len(removed)} unfinished or expired job(s) from {settings.jobs_dir}")
        self.segmenter = Segmenter(predictor, self.store)
        self.queue = JobQueue(self.store, self.segmenter, settings.workers_queue)
        model = predictor.config.model
        self.expected = Expected(model.spatial_dims, model.in_channels)

    def info(self) -> dict:
        config = self.predictor.config
        model, data = config.model, config.data
        names = ["background"] + class_names(data, model.out_channels)
        colours = class_colours(model.out_channels).tolist()
        return {"name": "btcv-unetr", "version": __version__, "model": "UNETR", "spatial_dims": model.spatial_dims,
                "in_channels": model.in_channels, "roi_size": list(model.roi_size),
                "classes": [{"index": i, "name": n, "color": colours[i]} for i, n in enumerate(names)],
                "spacing": None if model.spatial_dims == 2 else [data.space_x, data.space_y, data.space_z],
                "precision": self.predictor.precision.name, "device": str(self.predictor.device),
                "max_upload_mb": self.settings.max_upload_mb, "sync_max_mb": self.settings.sync_max_mb,
                "inputs": [".png", ".jpg", ".jpeg"] if model.spatial_dims == 2 else [".nii", ".nii.gz", ".zip"]}

    def receive(self, upload: UploadFile) -> Job:
        """The upload in a new job folder as a checked ``input.*`` (blocking: call it in a worker thread)."""
        job_id, folder = self.store.new_folder()
        display = safe_name(upload.filename)
        try:
            part = folder / "upload.part"
            with open(part, "wb") as out:
                shutil.copyfileobj(upload.file, out, MB)
            kind, path, volume = store_upload(part, folder, display, self.expected,
                                              int(self.settings.max_upload_mb * MB))
            shape = volume.spatial_shape[:2] if kind == "picture" else volume.shape[:3]
            spacing = [1.0, 1.0] if kind == "picture" else np.linalg.norm(volume.affine[:3, :3], axis=0).tolist()
        except BadUpload as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, exc.detail) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job(job_id, display, kind, path.name, [int(n) for n in shape], [round(float(s), 4) for s in spacing])

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

    def delete(self, job: Job) -> None:
        if job.state == "running":
            raise HTTPException(409, f"job {job.id} is running: delete it once it is done")
        if job.state == "queued":  # the worker skips it; a /segment call waiting for it is answered
            job.state, job.error = "failed", "deleted before it ran"
            job.finished_event.set()
        self.store.delete(job.id)

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
            reason = "2D jobs have none, see their overlay" if key == "preview" else "not written"
            raise HTTPException(404, f"job {job.id} has no {key}: {reason}")
        headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else None
        return FileResponse(self.store.folder(job.id) / name, media_type=media_type, headers=headers)

    def mask(self, job: Job) -> FileResponse:
        picture = job.outputs["mask"].endswith(".png")
        suffix = ".png" if picture else ".nii.gz"
        return self.output(job, "mask", "image/png" if picture else "application/gzip", f"{job.name}_seg{suffix}")

    def view(self, job: Job) -> dict:
        base = f"/jobs/{job.id}"
        links = {"mask": f"{base}/mask", "overlay": f"{base}/overlay.png", "volumes": f"{base}/volumes",
                 "preview": f"{base}/preview"}
        return {"id": job.id, "state": job.state, "progress": round(job.progress, 4),
                "windows_done": job.windows_done, "windows_total": job.windows_total, "error": job.error,
                "name": job.name, "kind": job.kind, "shape": job.shape, "spacing": job.spacing,
                "created": job.created, "started": job.started, "finished": job.finished, "seconds": job.seconds,
                "queue_position": self.queue.position(job.id) if job.state == "queued" else None, "links": links}


def service(request: Request) -> Service:
    return request.app.state.service


def token_accepted(svc: Service, authorization: str | None) -> bool:
    token = svc.settings.token
    return not token or secrets.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


def authorised(request: Request, authorization: str | None = Header(default=None)) -> None:
    if not token_accepted(service(request), authorization):
        raise HTTPException(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


public = APIRouter()
api = APIRouter(dependencies=[Depends(authorised)])


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
def web_page() -> str:
    # The page holds no data (every call it makes carries the token), so it needs none itself.
    return resources.files("btcv_unetr.serve").joinpath("web/index.html").read_text(encoding="utf-8")


@public.get("/health")
def health() -> dict:
    return {"status": "ok"}


@api.get("/info")
def info(svc: Service = Depends(service)) -> dict:
    return svc.info()


@api.post("/jobs", status_code=202)
async def submit(file: UploadFile = File(...), svc: Service = Depends(service)) -> dict:
    job = await run_in_threadpool(svc.receive, file)
    svc.enqueue(job)
    return svc.view(job)


@api.post("/segment", response_model=None)
async def segment(file: UploadFile = File(...), svc: Service = Depends(service)) -> FileResponse:
    job = await run_in_threadpool(svc.receive, file)
    svc.enqueue(job)
    while not job.finished_event.is_set():  # polled: a thread per waiting caller would drain the thread pool
        await asyncio.sleep(SEGMENT_POLL_S)
    if job.state == "failed":
        raise HTTPException(410 if job.error == "deleted before it ran" else 422, job.error)
    response = svc.mask(job)
    response.headers["X-Job-Id"] = job.id  # its overlay and volumes stay available under /jobs/{id}
    return response


@api.get("/jobs")
def list_jobs(svc: Service = Depends(service)) -> dict:
    return {"jobs": [svc.view(job) for job in svc.store.jobs()]}


@api.get("/jobs/{job_id}")
def job_state(job_id: str, svc: Service = Depends(service)) -> dict:
    return svc.view(svc.job(job_id))


@api.get("/jobs/{job_id}/mask", response_model=None)
def mask(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    return svc.mask(svc.finished(job_id))


@api.get("/jobs/{job_id}/overlay.png", response_model=None)
def overlay(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    job = svc.finished(job_id)
    path = svc.segmenter.draw_overlay(job)
    if path is None:
        raise HTTPException(404, f"job {job.id} has no overlay: matplotlib is not installed on the server")
    return FileResponse(path, media_type="image/png")


@api.get("/jobs/{job_id}/volumes", response_model=None)
def volumes(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    return svc.output(svc.finished(job_id), "volumes", "application/json")


@api.get("/jobs/{job_id}/preview", response_model=None)
def preview(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    job = svc.finished(job_id)
    response = svc.output(job, "preview", "application/octet-stream")
    response.headers["X-Shape"] = ",".join(map(str, job.preview["shape"]))
    response.headers["X-Spacing"] = ",".join(map(str, job.preview["spacing"]))
    return response


@api.delete("/jobs/{job_id}", status_code=204, response_class=Response, response_model=None)
def delete(job_id: str, svc: Service = Depends(service)) -> Response:
    svc.delete(svc.job(job_id))
    return Response(status_code=204)


async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": f"{request.method} {request.url.path}: send the image as the multipart form "
                                   "field 'file' (curl -F file=@scan.nii.gz)"}, status_code=400)


class UploadGate:
    """Refuses an upload before its body is read when the queue is full (503) or its Content-Length is
    over its route's limit (413); a body without a length is counted as it is read (413 at the limit)."""

    def __init__(self, app, svc: Service, limits: dict[str, int], default: int):
        self.app, self.svc, self.limits, self.default = app, svc, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in UPLOAD_ROUTES:
            return await self.app(scope, receive, send)
        path = scope["path"]
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        if not token_accepted(self.svc, authorization):
            return await self.app(scope, receive, send)  # the route answers 401 before reading the body
        if self.svc.queue.full():
            refusal = self.svc.queue_full()
            response = JSONResponse({"detail": refusal.detail}, status_code=503, headers=refusal.headers)
            return await response(scope, receive, send)
        limit = self.limits.get(path, self.default)
        flag = "--sync_max_mb" if path == "/segment" else "--max_upload_mb"
        detail = f"upload larger than this server's {flag} {limit / MB:g} MB" + \
            (": send it to POST /jobs instead" if path == "/segment" else "")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, detail)
            return message

        return await self.app(scope, counted, send)


def create_app(predictor, settings: ServeSettings) -> FastAPI:
    """The application: the job worker starts and stops with it."""
    svc = Service(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.queue.start()
        yield
        svc.queue.stop()

    app = FastAPI(title="btcv-unetr", version=__version__, lifespan=lifespan)
    app.state.service = svc
    app.include_router(public)
    app.include_router(api)
    app.add_exception_handler(RequestValidationError, one_line_validation_error)
    app.add_middleware(UploadGate, svc=svc, limits={"/segment": int(settings.sync_max_mb * MB)},
                       default=int(settings.max_upload_mb * MB))
    return app
