"""The FastAPI application of ``btcv-unetr serve`` (routes listed in :mod:`btcv_unetr.serve`).

    Service      what the routes share: the loaded predictor, the job store and queue, the settings
    RequestGate  ASGI middleware: 401 (token), 503 (queue full) and 413 (over the limit) before a body is read
    create_app   the application around a loaded :class:`~btcv_unetr.infer.Predictor`

Imported only by ``serve.command`` (FastAPI is the optional ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..checks import Expected
from ..data import class_names
from ..plots import class_colours
from .jobs import Job, JobQueue, JobStore, QueueFull
from .limits import Declared, job_memory_bytes
from .settings import MB, ServeSettings
from .pacs import PacsError, check_uid, retrieve_series
from .uploads import MAX_ZIP_EXPANSION, BadUpload, safe_name, store_series, store_upload
from .worker import Segmenter

UPLOAD_ROUTES = ("/jobs", "/segment")
PUBLIC_ROUTES = ("/", "/health")  # the page holds no data: every call it makes carries the token
SMALL_BODY_LIMIT = 64 * 1024  # any other request: JSON at most
SEGMENT_POLL_S = 0.05
PACS_REQUEST = 'send {"study_uid": "...", "series_uid": "..."} (the series to segment)'
DELETE_WAIT_S = 10.0  # a DELETE of a running job waits this long for it to stop at its next window


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
        model = predictor.config.model
        self.expected = Expected(model.spatial_dims, model.in_channels)

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
        return job_memory_bytes(declared, config.model, spacing, self.predictor.sw_batch_size)

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
            kind, path, declared = store_upload(part, folder, display, self.expected,
                                                int(self.settings.max_upload_mb * MB), self.settings.limits,
                                                self.job_memory)
        except BadUpload as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, exc.detail) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Job(job_id, display, kind, path.name, [int(n) for n in declared.shape],
                   [round(float(s), 4) for s in declared.spacing])

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
                  [round(float(s), 4) for s in declared.spacing])
        job.pacs = {"study_uid": study, "series_uid": series}
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
                 "preview": f"{base}/preview", **({"seg": f"{base}/seg"} if job.kind == "dicom" else {})}
        return {"id": job.id, "state": job.state, "progress": round(job.progress, 4),
                "windows_done": job.windows_done, "windows_total": job.windows_total, "error": job.error,
                "name": job.name, "kind": job.kind, "shape": job.shape, "spacing": job.spacing,
                "created": job.created, "started": job.started, "finished": job.finished, "seconds": job.seconds,
                "queue_position": self.queue.position(job.id) if job.state == "queued" else None, "links": links,
                "pacs": job.pacs, "stored_to_pacs": job.stored_to_pacs}


def service(request: Request) -> Service:
    return request.app.state.service


def token_accepted(token: str | None, authorization: str | None) -> bool:
    """Whether ``authorization`` carries ``token`` (any token when none is set); the scheme's name is
    case-insensitive (RFC 7235)."""
    if not token:
        return True
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(), token.encode())


TOKEN_REFUSAL = "missing or wrong token: send the header 'Authorization: Bearer <token>'"


def authorised(request: Request, authorization: str | None = Header(default=None)) -> None:
    """The routes' own check (the gate has already refused a wrong token before reading the body)."""
    if not token_accepted(service(request).settings.token, authorization):
        raise HTTPException(401, TOKEN_REFUSAL, headers={"WWW-Authenticate": "Bearer"})


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
async def submit(request: Request, file: UploadFile | None = File(None), svc: Service = Depends(service)) -> dict:
    if file is not None:
        job = await run_in_threadpool(svc.receive, file)
    elif request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, PACS_REQUEST) from None
        job = await run_in_threadpool(svc.receive_from_pacs, body)
    else:
        raise HTTPException(400, no_file_detail(request))
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


@api.get("/jobs/{job_id}/seg", response_model=None)
def seg(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    """A DICOM job's mask as a DICOM Segmentation referencing its series."""
    job = svc.finished(job_id)
    if job.kind != "dicom":
        raise HTTPException(404, f"job {job.id} has no seg: only DICOM inputs get one")
    return svc.output(job, "seg", "application/dicom", f"{job.name}_seg.dcm")


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
async def delete(job_id: str, svc: Service = Depends(service)) -> Response:
    return await svc.delete(svc.job(job_id))


def no_file_detail(request: Request) -> str:
    return f"{request.method} {request.url.path}: send the image as the multipart form field 'file' (curl -F " \
        "file=@scan.nii.gz)"


async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": no_file_detail(request)}, status_code=400)


def _refusal(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    # Connection: close, as the body this answers was not read: the connection cannot carry another request.
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})})


class RequestGate:
    """Answers before a request's body is read: 401 without the token (every route but the page and
    /health, the API docs included), 503 for an upload to a full queue, 413 for a Content-Length over the
    route's limit. A body without a length is counted as it is read (413 at the limit)."""

    def __init__(self, app, svc: Service, limits: dict[str, int]):
        self.app, self.svc, self.limits = app, svc, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        if path not in PUBLIC_ROUTES and not token_accepted(self.svc.settings.token, authorization):
            return await _refusal(401, TOKEN_REFUSAL, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        upload = scope["method"] == "POST" and path in UPLOAD_ROUTES
        if upload and self.svc.queue.full():
            refusal = self.svc.queue_full()
            return await _refusal(503, refusal.detail, refusal.headers)(scope, receive, send)
        limit = self.limits.get(path, SMALL_BODY_LIMIT) if upload else SMALL_BODY_LIMIT
        detail = self._too_large(path, limit, upload)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _refusal(413, detail)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, detail)
            return message

        return await self.app(scope, counted, send)

    @staticmethod
    def _too_large(path: str, limit: int, upload: bool) -> str:
        if not upload:
            return f"request body larger than {limit // 1024} KB: only uploads to POST /jobs and /segment are large"
        flag = "--sync_max_mb" if path == "/segment" else "--max_upload_mb"
        return f"upload larger than this server's {flag} {limit / MB:g} MB" + \
            (": send it to POST /jobs instead" if path == "/segment" else "")


def create_app(predictor, settings: ServeSettings) -> FastAPI:
    """The application: the job worker starts and stops with it."""
    svc = Service(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.queue.start()
        yield
        kept = await run_in_threadpool(svc.queue.stop)
        print(f"stopped; {kept} queued job(s) kept: they run at the next start" if kept else "stopped")

    app = FastAPI(title="btcv-unetr", version=__version__, lifespan=lifespan)
    app.state.service = svc
    app.include_router(public)
    app.include_router(api)
    from .viewer import router as viewer  # not at the top: viewer imports authorised from here
    app.include_router(viewer)
    app.add_exception_handler(RequestValidationError, one_line_validation_error)
    app.add_middleware(RequestGate, svc=svc, limits={"/jobs": int(settings.max_upload_mb * MB),
                                                      "/segment": int(settings.sync_max_mb * MB)})
    return app
