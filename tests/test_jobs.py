"""btcv_unetr.serve.jobs: job folders (private, marked, recorded at each state), what a restart keeps, retention,
and the bounded queue with its one worker, held by a work function the test releases (no model, no timing)."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest

from btcv_unetr.errors import UserError
from btcv_unetr.serve.jobs import MARKER, RECORD, SPOOL, Job, JobCancelled, JobQueue, JobStore, QueueFull

WAIT_S = 30  # bounds only a test that went wrong: every wait below ends on an event the test causes


class HeldWork:
    """The queue's work function, controlled by the test: a job signals that it started, then runs until
    :attr:`release` is set, checking for cancellation as the real worker does at each window; ``raises``
    maps a job's name to the exception it ends with."""

    def __init__(self, raises: dict[str, Exception] | None = None):
        self.release = threading.Event()
        self.raises = raises or {}
        self._started: dict[str, threading.Event] = {}

    def started(self, name: str) -> threading.Event:
        return self._started.setdefault(name, threading.Event())

    def __call__(self, job: Job) -> None:
        self.started(job.name).set()
        while not self.release.wait(0.005):
            job.check_cancelled()
        if job.name in self.raises:
            raise self.raises[job.name]
        job.windows_done = job.windows_total = 4


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _job(store: JobStore, name: str, **fields) -> Job:
    """A job in a new folder of ``store``, recorded."""
    job_id, _ = store.new_folder()
    job = Job(job_id, name, "nifti", "input.nii.gz", [4, 4, 4], [1.0, 1.0, 1.0], **fields)
    store.add(job)
    return job


def _record(store: JobStore, job: Job) -> dict:
    return json.loads((store.folder(job.id) / RECORD).read_text())


@pytest.fixture
def store(tmp_path) -> JobStore:
    store = JobStore(tmp_path / "jobs", keep_jobs=10, keep_hours=1)
    store.open()
    return store


@pytest.fixture
def queue(store):
    """A queue of capacity 1 whose work the test holds; its worker is stopped afterwards."""
    work = HeldWork(raises={"bad input": UserError("scan.nii.gz: image is 2D"),
                            "bug": ValueError("index 7 out of range\nmore detail")})
    jobs = JobQueue(store, work, capacity=1)
    jobs.start()
    yield jobs, work
    work.release.set()
    jobs.stop()


def _finished(job: Job) -> Job:
    assert job.finished_event.wait(WAIT_S), job
    return job


def test_the_jobs_folder_and_every_job_folder_and_file_are_private(store):
    """Scans are patient data: folders 0700, files 0600, whatever the umask grants others."""
    assert _mode(store.root) == 0o700 and _mode(store.root / SPOOL) == 0o700
    job = _job(store, "scan")
    folder = store.folder(job.id)
    assert folder.parent == store.root and len(job.id) == 32 and _mode(folder) == 0o700
    assert _mode(folder / MARKER) == 0o600 and _mode(folder / RECORD) == 0o600
    assert _record(store, job) == job.record() and _record(store, job)["state"] == "queued"


def test_a_folder_others_can_write_is_refused_and_one_they_can_read_is_made_private(tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    with pytest.raises(UserError, match=r"can be written by other users \(mode drwxrwx---.*use a folder of your own"):
        JobStore(shared, 2, 1).open()
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)
    JobStore(readable, 2, 1).open()
    assert _mode(readable) == 0o700 and capsys.readouterr().out == f"made {readable} private (0700): it holds " \
                                                                   "patient scans\n"


def test_a_folder_holding_files_the_service_did_not_make_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "jobs"
    (root / "my_scans").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as refused:
        JobStore(root, 2, 1).open()
    assert "holds files that are not this service's jobs ('my_scans', 'notes.txt')" in str(refused.value)
    assert (root / "notes.txt").read_text() == "mine" and (root / "my_scans").is_dir()


def test_a_restart_fails_the_job_that_ran_keeps_the_waiting_ones_and_removes_the_incomplete(store):
    now = time.time()
    waiting_late = _job(store, "late", created=now - 10)
    waiting_early = _job(store, "early", created=now - 20)
    ran = _job(store, "ran", state="running", started=now - 5)
    done = _job(store, "done", state="done", finished=now - 60)
    expired = _job(store, "expired", state="failed", finished=now - 2 * 3600)
    _, cut_short = store.new_folder()  # an upload cut short: a folder without a record
    (cut_short / "upload.part").write_bytes(b"half")
    (store.root / SPOOL / "tmpupload").write_bytes(b"spooled")

    again = JobStore(store.root, keep_jobs=10, keep_hours=1)
    removed, waiting = again.open()
    assert sorted(removed) == sorted([cut_short.name, expired.id])
    assert not cut_short.exists() and not store.folder(expired.id).exists()
    assert not any((store.root / SPOOL).iterdir())
    assert [job.id for job in waiting] == [waiting_early.id, waiting_late.id]  # oldest first
    failed = again.get(ran.id)
    assert failed.state == "failed" and failed.error == "the server stopped while this job ran: send it again"
    assert failed.finished_event.is_set() and _record(again, failed)["state"] == "failed"
    assert again.get(done.id).state == "done" and again.get(done.id).finished_event.is_set()


def test_retention_keeps_the_newest_finished_jobs_and_never_touches_unmarked_folders(tmp_path):
    store = JobStore(tmp_path / "jobs", keep_jobs=2, keep_hours=1)
    store.open()
    now = time.time()
    old, middle, new = (_job(store, name, state="done", created=now - age, finished=now - age)
                        for name, age in (("old", 30), ("middle", 20), ("new", 10)))
    waiting = _job(store, "waiting", created=now - 40)
    assert store.prune() == [old.id]
    assert [job.id for job in store.jobs()] == [new.id, middle.id, waiting.id]  # newest first
    (store.folder(new.id) / MARKER).unlink()  # a folder the service cannot prove it made
    store.delete(new.id)
    assert store.get(new.id) is None and store.folder(new.id).is_dir()
    store.delete(middle.id)
    assert not store.folder(middle.id).exists()


def test_a_job_record_round_trips_without_its_runtime_state():
    job = Job("a" * 32, "scan", "dicom", "input.nii.gz", [3, 4, 5], [0.8, 0.8, 2.5], state="running", windows_done=3,
              windows_total=4, started=100.0, finished=102.5, outputs={"mask": "mask.nii.gz"})
    job.cancel_reason = "deleted by its client"
    record = json.loads(json.dumps(job.record()))
    assert "cancel_reason" not in record and "finished_event" not in record
    again = Job.from_record(record)
    assert again == job and again.cancel_reason is None and not again.finished_event.is_set()
    assert (job.progress, job.seconds) == (0.75, 2.5)
    assert Job.from_record({**record, "state": "done"}).progress == 1.0
    assert Job.from_record({**record, "state": "done"}).finished_event.is_set()


def test_a_job_past_its_deadline_or_cancelled_stops_with_the_reason():
    job = Job("a" * 32, "scan", "nifti", "input.nii", [4, 4, 4], [1.0] * 3, started=100.0, deadline=130.0)
    with pytest.raises(JobCancelled, match=r"stopped at its time limit of 30 s \(--job_timeout_s\)"):
        job.check_cancelled()  # the deadline is long past
    job.deadline, job.cancel_reason = None, "the server is stopping"
    with pytest.raises(JobCancelled, match="the server is stopping"):
        job.check_cancelled()


def test_one_job_runs_one_waits_and_the_next_is_refused_until_the_worker_frees_a_place(queue, store):
    jobs, work = queue
    first, second, third = (_job(store, name) for name in ("first", "second", "third"))
    jobs.submit(first)
    assert work.started("first").wait(WAIT_S)  # the worker took it: the queue's one place is free again
    assert first.state == "running" and _record(store, first)["state"] == "running" and first.started is not None
    jobs.submit(second)
    assert jobs.full() and jobs.position(second.id) == 1 and jobs.position(first.id) is None
    assert _record(store, second)["state"] == "queued"
    with pytest.raises(QueueFull):
        jobs.submit(third)
    assert jobs.retry_after() == 10  # no job finished yet: 10 s for the one waiting
    work.release.set()
    for job in (first, second):
        assert _finished(job).state == "done" and job.progress == 1.0 and job.finished >= job.started
        assert _record(store, job)["state"] == "done"
    assert not jobs.full() and jobs.retry_after() >= 1


def test_a_failed_job_gets_one_line_and_the_worker_goes_on(queue, store):
    jobs, work = queue
    work.release.set()
    bad, bug, good = (_job(store, name) for name in ("bad input", "bug", "good"))
    for job in (bad, bug):
        jobs.submit(job)
        _finished(job)
    jobs.submit(good)
    assert bad.state == "failed" and bad.error == "scan.nii.gz: image is 2D"
    assert bug.state == "failed" and bug.error == "internal error (ValueError: index 7 out of range)"
    assert _finished(good).state == "done" and _record(store, bug)["error"] == bug.error


def test_deleting_jobs_stops_the_running_one_and_skips_a_waiting_one(store):
    work = HeldWork()
    jobs = JobQueue(store, work, capacity=2)
    jobs.start()
    try:
        running, waiting, after = (_job(store, name) for name in ("running", "waiting", "after"))
        jobs.submit(running)
        assert work.started("running").wait(WAIT_S)
        jobs.submit(waiting)
        jobs.submit(after)
        store.delete(waiting.id)  # a DELETE of a waiting job: the store forgets it, the worker skips it
        assert not store.folder(waiting.id).exists()
        jobs.delete_running(running)
        assert _finished(running).state == "failed" and running.error == "deleted by its client"
        work.release.set()
        assert _finished(after).state == "done"  # the worker removed the deleted job's folder before this one
        assert not store.folder(running.id).exists() and store.get(running.id) is None
        assert not work.started("waiting").is_set() and waiting.state == "queued"
    finally:
        work.release.set()
        jobs.stop()


def test_stopping_keeps_the_running_and_the_waiting_jobs_queued_for_the_next_start(store):
    work = HeldWork()
    jobs = JobQueue(store, work, capacity=1)
    jobs.start()
    running, waiting = _job(store, "running"), _job(store, "waiting")
    jobs.submit(running)
    assert work.started("running").wait(WAIT_S)
    jobs.submit(waiting)
    assert jobs.stop() == 2  # returns once the worker has ended
    assert not work.started("waiting").is_set()
    assert running.state == "queued" and running.started is None and running.windows_done == 0
    assert [_record(store, job)["state"] for job in (running, waiting)] == ["queued", "queued"]
    _, kept = JobStore(store.root, 10, 1).open()
    assert {job.id for job in kept} == {running.id, waiting.id}


def test_a_job_over_its_time_limit_fails_with_the_limit(store):
    work = HeldWork()  # never released: only the limit ends the job
    jobs = JobQueue(store, work, capacity=1, timeout_s=0.05)
    jobs.start()
    try:
        job = _job(store, "slow")
        jobs.submit(job)
        assert _finished(job).state == "failed"
        assert job.error == "stopped at its time limit of 0.05 s (--job_timeout_s)"
    finally:
        jobs.stop()


@pytest.mark.parametrize("make, message", [
    (lambda store: JobQueue(store, HeldWork(), capacity=0), "--workers_queue must be >= 1"),
    (lambda store: JobQueue(store, HeldWork(), capacity=1, timeout_s=-1), "--job_timeout_s must be >= 0"),
    (lambda store: JobStore(store.root, keep_jobs=0, keep_hours=1), "--keep_jobs must be >= 1"),
    (lambda store: JobStore(store.root, keep_jobs=1, keep_hours=0), "--keep_hours > 0"),
])
def test_bad_settings_are_one_line(store, make, message):
    with pytest.raises(UserError, match=message):
        make(store)
