"""The package's layout: rooms as sub-packages, and the import contracts of .importlinter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import btcv_unetr

ROOT = Path(__file__).resolve().parent.parent
# Rooms: the pipeline's stages, file formats (io) and the running process (runtime). A module that fits none of
# the shared ones below goes into a room, so that every new module says where it belongs.
ROOMS = {"config", "data", "synthetic", "io", "model", "train", "inference", "serve", "testing", "runtime"}
SHARED = {"__init__", "__main__", "cli", "errors", "files", "labels", "logs", "distributed", "metrics"}


def test_every_module_is_a_shared_one_or_lives_in_a_room():
    package = Path(btcv_unetr.__file__).parent
    flat = {path.stem for path in package.glob("*.py")}
    assert flat <= SHARED, f"new top-level modules {sorted(flat - SHARED)}: put them in a room's sub-package"
    folders = {path.name for path in package.iterdir() if (path / "__init__.py").exists()}
    assert folders == ROOMS


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports (import-linter) is a test dependency: pip install -e '.[test]'")
    # Its report has box-drawing characters: read as UTF-8 whatever the locale (CI may have none).
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout
