"""The FastAPI application of ``btcv-unetr serve`` (routes listed in :mod:`btcv_unetr.serve`).

    public, api  the routes (the viewer's slices are in :mod:`.viewer`, what they share in :mod:`.service`)
    RequestGate  ASGI middleware: 401 (token), 503 (queue full) and 413 (over the limit) before a body is read
    create_app   the application around a loaded :class:`~btcv_unetr.inference.batch.Predictor`

Imported only by ``serve.command`` (FastAPI is the optional ``serve`` extra).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .service import PACS_REQUEST, SEGMENT_POLL_S, TOKEN_REFUSAL, Service, authorised, service, token_accepted
from .settings import MB, ServeSettings
from .viewer import router as viewer

UPLOAD_ROUTES = ("/jobs", "/segment")
PUBLIC_ROUTES = ("/", "/health")  # the page holds no data: every call it makes carries the token
SMALL_BODY_LIMIT = 64 * 1024  # any other request: JSON at most


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
async def submit(request: Request, file: UploadFile | None = File(None), series_uid: str | None = Form(None),
                 svc: Service = Depends(service)) -> dict:
    if file is not None:  # series_uid: the series of a DICOM zip that holds several
        job = await run_in_threadpool(svc.receive, file, series_uid)
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


def _dicom_object(job_id: str, svc: Service, kind: str) -> FileResponse:
    """The DICOM object ``kind`` (``seg``, ``rtstruct``) of a finished DICOM job, as a download."""
    job = svc.finished(job_id)
    if job.kind != "dicom":
        raise HTTPException(404, f"job {job.id} has no {kind}: only DICOM inputs get one")
    return svc.output(job, kind, "application/dicom", f"{job.name}_{kind}.dcm")


@api.get("/jobs/{job_id}/seg", response_model=None)
def seg(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    """A DICOM job's mask as a DICOM Segmentation referencing its series."""
    return _dicom_object(job_id, svc, "seg")


@api.get("/jobs/{job_id}/rtstruct", response_model=None)
def rtstruct(job_id: str, svc: Service = Depends(service)) -> FileResponse:
    """A DICOM job's mask as a DICOM RT Structure Set (contours) referencing its series."""
    return _dicom_object(job_id, svc, "rtstruct")


@api.get("/jobs/{job_id}/overlay_series", response_model=None)
def overlay_series(job_id: str, svc: Service = Depends(service)) -> Response:
    """A PACS job's coloured overlay series (asked for with ``store: ["overlay"]``) as a zip of its DICOM files."""
    job = svc.finished(job_id)
    if job.kind != "dicom" or "overlay_series" not in job.outputs:
        raise HTTPException(404, f"job {job.id} has no overlay_series: a PACS job writes one when its request "
                                 "asks to store \"overlay\"")
    return svc.zipped(job, "overlay_series", f"{job.name}_overlay_dcm.zip")


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
    app.include_router(viewer)
    app.add_exception_handler(RequestValidationError, one_line_validation_error)
    app.add_middleware(RequestGate, svc=svc, limits={"/jobs": int(settings.max_upload_mb * MB),
                                                      "/segment": int(settings.sync_max_mb * MB)})
    return app
