"""The service's jobs: one folder each, kept within a retention limit, run one at a time from a bounded queue.

    Job        one segmentation request: state, window progress, timings, facts about its input
    JobStore   the job folders under ``--jobs_dir``: create, find, delete, retention by count and age
    JobQueue   a bounded first-in first-out queue and the one worker thread that empties it

A job's record is ``job.json`` in its folder, written atomically at every change of state, so a
restarted server still serves the results it finished before (within the retention limit).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import shutil
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text

RECORD = "job.json"
FINISHED = ("done", "failed")


@dataclass
class Job:
    """One request. ``name`` is the client's file name made safe, for display and download names only."""

    id: str
    name: str
    kind: str  # nifti | dicom | picture
    input: str  # the input's file name inside the job folder
    shape: list[int]
    spacing: list[float]
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued -> running -> done | failed
    windows_done: int = 0
    windows_total: int = 0
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # mask, overlay, volumes, preview -> file name
    preview: dict | None = None  # {"shape": [nx, ny, nz], "spacing": [sx, sy, sz]} of the 3D preview
    finished_event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return min(1.0, self.windows_done / self.windows_total) if self.windows_total else 0.0

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.finished is None else round(self.finished - self.started, 3)

    def record(self) -> dict:
        """The fields saved in ``job.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "finished_event"}

    @classmethod
    def from_record(cls, record: dict) -> Job:
        names = {f.name for f in dataclasses.fields(cls)} - {"finished_event"}
        job = cls(**{key: value for key, value in record.items() if key in names})
        if job.state in FINISHED:
            job.finished_event.set()
        return job


class JobStore:
    """Job folders under ``root``: at most ``keep_jobs`` finished jobs, none older than ``keep_hours``."""

    def __init__(self, root: Path, keep_jobs: int, keep_hours: float):
        if keep_jobs < 1 or keep_hours <= 0:
            raise UserError("--keep_jobs must be >= 1 and --keep_hours > 0")
        self.root, self.keep_jobs, self.keep_hours = Path(root), keep_jobs, keep_hours
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def open(self) -> list[str]:
        """Read the folders a previous server left; returns the ids removed: unfinished jobs (their
        server stopped), folders without a readable record (an upload cut short) and jobs past retention."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--jobs_dir {self.root} cannot be created ({exc.strerror}): choose another folder") \
                from None
        removed = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                job = Job.from_record(json.loads((folder / RECORD).read_text()))
            except (OSError, ValueError, TypeError):
                job = None
            if job is None or job.state not in FINISHED or job.id != folder.name:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            else:
                self._jobs[job.id] = job
        return removed + self.prune()

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its (empty) folder."""
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir()
        return job_id, folder

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
        self.save(job)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)

    def save(self, job: Job) -> None:
        if (self.root / job.id).is_dir():  # a job deleted while it ran leaves no folder behind
            atomic_write_text(self.root / job.id / RECORD, json.dumps(job.record()))

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def prune(self) -> list[str]:
        """Remove finished jobs older than ``keep_hours`` and all but the newest ``keep_jobs``; returns their ids."""
        now = time.time()
        finished = [job for job in self.jobs() if job.state in FINISHED]
        expired = [job for job in finished if now - (job.finished or job.created) > 3600 * self.keep_hours]
        surplus = [job for job in finished if job not in expired][self.keep_jobs:]
        for job in expired + surplus:
            self.delete(job.id)
        return [job.id for job in expired + surplus]


class QueueFull(Exception):
    """The queue holds its capacity of waiting jobs."""


class JobQueue:
    """At most ``capacity`` waiting jobs; one worker thread runs ``work(job)`` on them in order.

    ``work`` raises :class:`UserError` for a problem with the input (the job fails with that line);
    any other exception fails the job with its first line and prints the traceback to the server log.
    """

    def __init__(self, store: JobStore, work: Callable[[Job], None], capacity: int):
        if capacity < 1:
            raise UserError("--workers_queue must be >= 1")
        self.store, self.work = store, work
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._recent_seconds: list[float] = []
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the running job finish (up to ``timeout``); waiting jobs stay unfinished and are removed on
        the next start."""
        try:
            self._waiting.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def full(self) -> bool:
        return self._waiting.full()

    def submit(self, job: Job) -> None:
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def position(self, job_id: str) -> int | None:
        """1 for the next job to run, None when the job is not waiting."""
        with self._waiting.mutex:
            ids = [job.id for job in self._waiting.queue if job is not None]
        return ids.index(job_id) + 1 if job_id in ids else None

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the waiting jobs times the recent job duration."""
        typical = sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 10.0
        return max(1, round(typical * max(1, self._waiting.qsize())))

    def _run(self) -> None:
        while (job := self._waiting.get()) is not None:
            if self.store.get(job.id) is not job:  # deleted while it waited
                continue
            job.state, job.started = "running", time.time()
            self.store.save(job)
            try:
                self.work(job)
                job.state = "done"
            except UserError as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 - a failed job must not stop the worker
                traceback.print_exc(file=sys.stderr)
                job.state = "failed"
                job.error = f"internal error ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]})"
            job.finished = time.time()
            self._recent_seconds = (self._recent_seconds + [job.finished - job.started])[-8:]
            self.store.save(job)
            job.finished_event.set()
            self.store.prune()
