"""Shared fixtures: a tiny phantom dataset and a tiny trained run (each made once per test process), the tiny
test config, and the service in the test's own process.

Tests run over several processes (``--dist loadgroup``): a test file whose tests share an expensive module
fixture (a server, a trained run of its own) marks itself ``pytestmark = pytest.mark.xdist_group("NAME")`` so
that they stay in one process and the fixture is made once.

The user's cache (the precision decisions, ``~/.cache/btcv-unetr``) is a temporary folder for the
whole session, set in the environment before anything runs, so the processes the tests start
inherit it and nothing is written to the real one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

TEST_CACHE_HOME = tempfile.mkdtemp(prefix="btcv-unetr-tests-cache-")
os.environ["XDG_CACHE_HOME"] = TEST_CACHE_HOME

from btcv_unetr.config.load import (  # noqa: E402  (after the cache is set)
    CONFIG_DIR,
    build_config,
    read_yaml,  # noqa: E402
)
from btcv_unetr.config.schema import Config  # noqa: E402  (after the cache is set)
from btcv_unetr.synthetic.phantoms import write_dataset  # noqa: E402

PHANTOM_SIZE = 64
# The model section of a tiny network of each architecture (issue 28), for tiny_config(model=TINY_NETS[name]):
# the smallest sizes each builds and trains with on the tiny phantoms (Swin UNETR needs a 64-voxel ROI).
TINY_NETS: dict[str, dict] = {
    "unetr": {},
    "swin_unetr": {"model_name": "swin_unetr", "roi_x": 64, "roi_y": 64, "roi_z": 64, "feature_size": 12},
    "segresnet": {"model_name": "segresnet", "init_filters": 8, "blocks_down": "1,1,1", "blocks_up": "1,1"},
    "dynunet": {"model_name": "dynunet", "init_filters": 4},
    "mednext": {"model_name": "mednext", "init_filters": 8},
}


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache_home():
    yield
    shutil.rmtree(TEST_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Four labelled 64x64xN phantoms (3 training, 1 validation) and one test image."""
    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(out, cases=4, seed=7, size=PHANTOM_SIZE, test_cases=1, progress=False)
    return out


def tiny_config(data_dir: Path | str = "/nonexistent", **overrides) -> Config:
    """configs/tiny.yaml pointed at ``data_dir``; ``overrides`` are ``section={key: value}``."""
    layers = [read_yaml(CONFIG_DIR / "tiny.yaml"),
              {"data": {"data_dir": str(data_dir), "json_list": "dataset.json"}}, overrides]
    return build_config(layers)


def tiny_net_config(name: str, data_dir: Path | str = "/nonexistent", **overrides) -> Config:
    """tiny_config with the tiny network ``name`` of :data:`TINY_NETS` (tiny.yaml's UNETR sizes dropped for another
    network, whose config refuses them); ``overrides`` are ``section={key: value}``, the model section's on top."""
    tiny = read_yaml(CONFIG_DIR / "tiny.yaml")
    model = {key: value for key, value in tiny["model"].items() if name == "unetr" or key.startswith("roi_")}
    layers = [{**tiny, "model": model}, {"data": {"data_dir": str(data_dir), "json_list": "dataset.json"}},
              {**overrides, "model": {**TINY_NETS[name], **overrides.get("model", {})}}]
    return build_config(layers)


@pytest.fixture(scope="session")
def trained_run(phantom_dir, tmp_path_factory) -> Path:
    """A finished 2-epoch tiny training run in float32 (``model.pt`` the best validation, ``model_final.pt`` the
    last epoch with the optimiser, scheduler and counters), trained once per test process: for every test that
    needs a checkpoint as training writes it. Read it, never change it: copy what a test alters."""
    from btcv_unetr import cli
    logdir = tmp_path_factory.mktemp("trained") / "run"
    argv = ["train", "--config", "tiny.yaml", "--data_dir", str(phantom_dir), "--json_list", "dataset.json",
            "--logdir", str(logdir), "--precision", "fp32", "--max_epochs", "2", "--val_every", "1"]
    assert cli.main(argv) == 0
    return logdir


@pytest.fixture
def tiny(phantom_dir) -> Config:
    return tiny_config(phantom_dir)


@pytest.fixture(scope="module")
def picture_server(tmp_path_factory) -> str:
    """A real ``btcv-unetr serve`` with a tiny 2D RGB model of 3 classes (random weights), no token: for the browser's
    2D test (tests/test_web.py); the routes use ``picture_service``."""
    from serving import PICTURE_MODEL, running_server, tiny_checkpoint
    folder = tmp_path_factory.mktemp("served2d")
    with running_server(tiny_checkpoint(folder / "run", model=PICTURE_MODEL), folder / "jobs") as url:
        yield url


@pytest.fixture(scope="module")
def picture_service(tmp_path_factory):
    """The same 2D service in the test's process (btcv_unetr.testing.app): for its routes, where no browser is
    involved."""
    from serving import PICTURE_MODEL, tiny_checkpoint

    from btcv_unetr.testing.app import in_process_service
    folder = tmp_path_factory.mktemp("served2d")
    with in_process_service(tiny_checkpoint(folder / "run", model=PICTURE_MODEL), folder / "jobs") as client:
        yield client


REAL_SERVER_TOKEN = "web-test-token"


@dataclasses.dataclass(frozen=True)
class RealServer:
    """The session's real server: its base URL, its token, and the file that holds its worker while it exists."""

    url: str
    token: str
    hold: Path


@pytest.fixture(scope="session")
def real_server(tmp_path_factory) -> RealServer:
    """One real ``btcv-unetr serve`` on loopback (tiny 3D model, random weights) for the tests where the real server
    is the point: the browser tests (tests/test_web.py) and the gate that answers before the body is read
    (tests/test_serve.py). A token, a queue of one waiting job, and a worker that holds each job in "running" while
    ``hold`` exists. Its tests are in the xdist group "real_server", so one process starts it."""
    from serving import held_server, tiny_checkpoint
    folder = tmp_path_factory.mktemp("real_server")
    hold = folder / "hold"
    with held_server(tiny_checkpoint(folder / "run"), folder / "jobs", hold, "--token", REAL_SERVER_TOKEN,
                     "--workers_queue", "1") as url:
        yield RealServer(url, REAL_SERVER_TOKEN, hold)


@pytest.fixture
def serve_sandbox(tmp_path, monkeypatch):
    """For a test that runs ``serve`` through ``cli.main`` in this process: the default jobs folder under
    ``tmp_path``, never the user's own (``serve`` itself restores the umask and temporary folder it sets)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
