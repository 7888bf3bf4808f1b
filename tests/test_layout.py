"""The package's layout: stages as sub-packages, the import contracts of .importlinter, and the old import paths."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import btcv_unetr

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"data", "synthetic", "model", "train", "inference", "serve", "testing"}
SHARED = {"__init__", "__main__", "_compat", "cli", "config", "errors", "files", "labels", "logs", "distributed",
          "allocator", "infer"}


def test_every_module_is_a_shared_one_or_lives_in_a_stage():
    package = Path(btcv_unetr.__file__).parent
    flat = {path.stem for path in package.glob("*.py")}
    assert flat <= SHARED, f"new top-level modules {sorted(flat - SHARED)}: put them in a stage's sub-package"
    folders = {path.name for path in package.iterdir() if (path / "__init__.py").exists()}
    assert folders == STAGES


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports (import-linter) is a test dependency: pip install -e '.[test]'")
    # Its report has box-drawing characters: read as UTF-8 whatever the locale (CI may have none).
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("old, new", [("btcv_unetr.checkpoint", "btcv_unetr.io.checkpoint"),
                                      ("btcv_unetr.images", "btcv_unetr.data.images"),
                                      ("btcv_unetr.phantoms", "btcv_unetr.synthetic.phantoms"),
                                      ("btcv_unetr.infer_parts", "btcv_unetr.inference.parts")])
def test_a_moved_module_names_its_new_home(old, new):
    with pytest.raises(ModuleNotFoundError, match=f"^{old} moved to {new} "):
        importlib.import_module(old)
    importlib.import_module(new)


def test_an_unknown_module_is_still_a_plain_missing_module():
    with pytest.raises(ModuleNotFoundError) as caught:
        importlib.import_module("btcv_unetr.no_such_module")
    assert "moved" not in str(caught.value)


def test_the_documented_old_paths_keep_their_names():
    from btcv_unetr import data, infer, model, train
    from btcv_unetr.inference.loader import load_model
    from btcv_unetr.inference.predictor import Predictor
    from btcv_unetr.model.speed import prepare_model
    from btcv_unetr.train.budget import BudgetPlanner
    from btcv_unetr.train.loop import run_training
    assert (infer.Predictor, infer.load_model) == (Predictor, load_model)
    assert (train.run_training, train.BudgetPlanner) == (run_training, BudgetPlanner)
    assert model.prepare_model is prepare_model
    assert data.read_datalist is importlib.import_module("btcv_unetr.data.datalist").read_datalist
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        infer.no_such_name  # noqa: B018
