"""The user's cache folder, where this machine's decisions (the precision probe's) and downloads (weights) are kept."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_FOLDER = "btcv-unetr"


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/btcv-unetr``, else ``~/.cache/btcv-unetr``; a relative XDG_CACHE_HOME is ignored, as the
    XDG specification says. Raises RuntimeError where there is no home folder to fall back on."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / CACHE_FOLDER
