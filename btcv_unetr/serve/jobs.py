"""The service's jobs: one folder each, kept within a retention limit, run one at a time from a bounded queue.

    Job           one segmentation request: state, window progress, timings, facts about its input
    JobCancelled  raised inside a running job (at its next window) when it is cancelled or out of time
    JobStore      the job folders under ``--jobs_dir``: private, create, find, delete, retention by count and age
    JobQueue      a bounded first-in first-out queue and the one worker thread that empties it

A job's record is ``job.json`` in its folder, written atomically at every change of state, so a
restarted server still serves the results it finished before (within the retention limit) and runs
the jobs that were waiting when it stopped. Scans are patient data: the jobs folder is the user's own
(0700, files 0600 by the server's umask), and the service only ever removes folders it marked as its
own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import stat
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
MARKER = ".btcv-unetr-job"  # in every folder the service created: nothing else is ever removed
SPOOL = ".uploads"  # the web framework's temporary copies of uploads, inside the private jobs folder
FINISHED = ("done", "failed")


class JobCancelled(Exception):
    """Stops a running job at its next window; the message is the reason."""


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
    outputs: dict[str, str] = field(default_factory=dict)  # mask, overlay, volumes, seg -> file name
    provenance: dict | None = None  # version, weights checksum, net(s), precision, device, overlap, TTA of the result
    pacs: dict | None = None  # {"study_uid", "series_uid"}: a series taken from the --dicomweb PACS
    stored_to_pacs: bool | str | None = None  # such a job's SEG: True once stored back (STOW-RS), else why not
    notes: list[str] = field(default_factory=list)  # what the input needed (a DICOM series chosen, repaired; no SEG)
    finished_event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    # Set by a client's DELETE, the time limit or the server's shutdown; the worker checks it at each window.
    cancel_reason: str | None = field(default=None, repr=False, compare=False)
    deadline: float | None = field(default=None, repr=False, compare=False)
    delete_when_stopped: bool = field(default=False, repr=False, compare=False)

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when the job was cancelled or its time is up."""
        if self.cancel_reason is not None:
            raise JobCancelled(self.cancel_reason)
        if self.deadline is not None and time.time() > self.deadline:
            raise JobCancelled(f"stopped at its time limit of {self.deadline - self.started:g} s (--job_timeout_s)")

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
        return {name: getattr(self, name) for name in _record_fields()}

    @classmethod
    def from_record(cls, record: dict) -> Job:
        names = _record_fields()
        job = cls(**{key: value for key, value in record.items() if key in names})
        if job.state in FINISHED:
            job.finished_event.set()
        return job


def _record_fields() -> list[str]:
    runtime = {"finished_event", "cancel_reason", "deadline", "delete_when_stopped"}
    return [f.name for f in dataclasses.fields(Job) if f.name not in runtime]


def check_private_folder(folder: Path) -> None:
    """Refuse a jobs folder another user owns or can write (they could read or replace patient scans);
    one of ours that others can read is made private (0700)."""
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(f"--jobs_dir {folder} can be written by other users (mode {stat.filemode(info.st_mode)}, "
                        f"owner uid {info.st_uid}): scans are patient data; use a folder of your own (chmod 700)")
    if info.st_mode & 0o077:
        folder.chmod(0o700)
        print(f"made {folder} private (0700): it holds patient scans")


def _is_plain(path: Path, kind: Callable[[int], bool]) -> bool:
    """Whether ``path`` is of ``kind`` (``stat.S_ISDIR``, ``stat.S_ISREG``) itself, not through a symbolic link."""
    try:
        return kind(path.lstat().st_mode)
    except OSError:
        return False


def is_job_folder(path: Path) -> bool:
    """A folder the service created (:meth:`JobStore.new_folder`): a real folder holding the :data:`MARKER`
    file, neither of them a link (a link to another jobs folder would have that one's jobs removed)."""
    return _is_plain(path, stat.S_ISDIR) and _is_plain(path / MARKER, stat.S_ISREG)


def open_jobs_folder(root: Path) -> None:
    """Create ``root`` (0700) or check it: holding nothing but the service's job folders (:func:`is_job_folder`)
    and its upload spool, so that cleaning it can never remove another's files, and private
    (:func:`check_private_folder`). Anything else is refused in one line before anything in it is changed."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--jobs_dir {root} cannot be created ({exc.strerror}): choose another folder") from None
    try:
        foreign = foreign_entries(root)
    except OSError as exc:
        raise UserError(f"--jobs_dir {root} cannot be read ({exc.strerror}): choose a folder of your own") from None
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"--jobs_dir {root} holds files that are not this service's jobs ({shown}): choose an "
                        "empty or new folder; the service never removes what it did not create")
    check_private_folder(root)
    spool = root / SPOOL
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--jobs_dir {root}: {SPOOL} cannot be created ({exc.strerror}): choose another folder") \
            from None
    for leftover in spool.iterdir():  # uploads a killed server was receiving (foreign_entries: plain files)
        leftover.unlink(missing_ok=True)


def foreign_entries(root: Path) -> list[str]:
    """What in the jobs folder ``root`` the service did not create, sorted: anything but job folders and a spool
    folder of plain files (a link there would have its target's files removed as leftovers)."""
    foreign = [p.name for p in root.iterdir() if p.name != SPOOL and not is_job_folder(p)]
    spool = root / SPOOL
    if _is_plain(spool, stat.S_ISDIR):
        foreign += [f"{SPOOL}/{p.name}" for p in spool.iterdir() if not _is_plain(p, stat.S_ISREG)]
    elif spool.exists() or spool.is_symlink():
        foreign.append(SPOOL)
    return sorted(foreign)


class JobStore:
    """Job folders under ``root``: at most ``keep_jobs`` finished jobs, none older than ``keep_hours``."""

    def __init__(self, root: Path, keep_jobs: int, keep_hours: float):
        if keep_jobs < 1 or keep_hours <= 0:
            raise UserError("--keep_jobs must be >= 1 and --keep_hours > 0")
        self.root, self.keep_jobs, self.keep_hours = Path(root), keep_jobs, keep_hours
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def open(self) -> tuple[list[str], list[Job]]:
        """Read the folders a previous server left. Returns the ids removed (folders without a readable
        record: an upload cut short; jobs past retention) and the jobs still waiting, oldest first (a clean
        stop keeps them). A job that was running when its server died fails: it may be what killed it.

        The folder must be private and hold nothing but the service's own (:func:`open_jobs_folder`).
        """
        open_jobs_folder(self.root)
        removed, waiting = [], []
        for folder in sorted(p for p in self.root.iterdir() if p.name != SPOOL):
            try:
                job = Job.from_record(json.loads((folder / RECORD).read_text()))
            except (OSError, ValueError, TypeError):
                job = None
            if job is None or job.id != folder.name:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
                continue
            if job.state == "running":
                job.state, job.error, job.finished = "failed", "the server stopped while this job ran: send it again", \
                    time.time()
                job.finished_event.set()
                self.save(job)
            self._jobs[job.id] = job
            if job.state == "queued":
                waiting.append(job)
        return removed + self.prune(), sorted(waiting, key=lambda job: job.created)

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its (empty) folder."""
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(mode=0o700)
        (folder / MARKER).touch(mode=0o600)
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
        folder = self.root / job_id
        if is_job_folder(folder):
            shutil.rmtree(folder, ignore_errors=True)

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

    ``work`` raises :class:`UserError` for a problem with the input (the job fails with that line) and
    :class:`JobCancelled` when the job was stopped; any other exception fails the job with its first line
    and prints the traceback to the server log. ``timeout_s`` (0: none) bounds a job's running time.
    """

    def __init__(self, store: JobStore, work: Callable[[Job], None], capacity: int, timeout_s: float = 0.0):
        if capacity < 1:
            raise UserError("--workers_queue must be >= 1")
        if timeout_s < 0:
            raise UserError("--job_timeout_s must be >= 0 (0: no limit)")
        self.store, self.work, self.timeout_s = store, work, timeout_s
        self._waiting: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._recent_seconds: list[float] = []
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop the running job at its next window and keep it and the waiting ones queued (their records
        say so; the next start runs them); wait for the worker to end. Returns the number of jobs kept."""
        self._stopping = True
        running = self._running
        if running is not None:
            running.cancel_reason = "the server is stopping"
        try:
            self._waiting.put_nowait(None)  # wakes an idle worker; a busy one sees _stopping
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join()
        return sum(1 for job in self.store.jobs() if job.state == "queued")

    def full(self) -> bool:
        return self._waiting.full()

    def submit(self, job: Job) -> None:
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def delete_running(self, job: Job) -> None:
        """Stop a running job at its next window and remove it once stopped."""
        job.delete_when_stopped = True
        job.cancel_reason = "deleted by its client"

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
        while (job := self._waiting.get()) is not None and not self._stopping:
            if self.store.get(job.id) is not job:  # deleted while it waited
                continue
            self._run_one(job)
            self.store.prune()

    def _run_one(self, job: Job) -> None:
        job.state, job.started, job.windows_done = "running", time.time(), 0
        job.deadline = job.started + self.timeout_s if self.timeout_s else None
        self._running = job
        self.store.save(job)
        try:
            self.work(job)
            job.state = "done"
        except JobCancelled as exc:
            if self._stopping:  # kept for the next start, as if it had never run
                job.state, job.started, job.windows_done, job.cancel_reason = "queued", None, 0, None
                self._running = None
                self.store.save(job)
                return
            job.state, job.error = "failed", str(exc)
        except UserError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed job must not stop the worker
            traceback.print_exc(file=sys.stderr)
            job.state = "failed"
            job.error = f"internal error ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]})"
        self._running = None
        job.finished = time.time()
        self._recent_seconds = (self._recent_seconds + [job.finished - job.started])[-8:]
        self.store.save(job)
        job.finished_event.set()
        if job.delete_when_stopped:
            self.store.delete(job.id)
