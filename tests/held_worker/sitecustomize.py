"""A hold on the service's worker that the tests own, with nothing in the service itself.

Python imports ``sitecustomize`` at start-up from its path, so a server that tests/test_serve.py starts
with this folder on ``PYTHONPATH`` runs this first. With ``BTCV_UNETR_TEST_HOLD`` set to a file name, a job
that reaches the worker waits, in state "running", while that file exists (or until the job is cancelled or its
time limit passes, so a server stopped mid-test still ends): a test fills the queue behind it, whatever the
machine's speed, then removes the file. Without the variable this does nothing.
"""

import os

_HOLD = os.environ.get("BTCV_UNETR_TEST_HOLD")

if _HOLD:
    import time
    from pathlib import Path

    from btcv_unetr.serve import worker

    _run_job = worker.Segmenter.__call__

    def _held(self, job):
        while Path(_HOLD).exists():
            job.check_cancelled()  # a DELETE, the time limit or the server's stop ends a held job too
            time.sleep(0.02)
        return _run_job(self, job)

    worker.Segmenter.__call__ = _held
