"""The service's own settings (the model's come from its checkpoint)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .limits import JobLimits

TOKEN_VARIABLE = "BTCV_UNETR_TOKEN"
MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Flags of ``btcv-unetr serve`` that are not the model's."""

    jobs_dir: Path
    max_upload_mb: float = 1024.0
    sync_max_mb: float = 64.0
    workers_queue: int = 16
    keep_jobs: int = 100
    keep_hours: float = 24.0
    token: str | None = None
    limits: JobLimits = JobLimits()
    job_timeout_s: float = 3600.0  # 0: no limit
    dicomweb: str | None = None  # the PACS's DICOMweb root: POST /jobs takes its series by UID, SEGs go back


def default_jobs_dir() -> Path:
    """``$XDG_DATA_HOME/btcv-unetr/jobs`` (``~/.local/share/...``): the user's own, never a shared temp folder."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "btcv-unetr" / "jobs"
