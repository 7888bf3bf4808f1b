"""The package installed from a wheel, outside the checkout, finds its shipped configs and datalists."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging  # make test-packaging (and CI); not make test

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import btcv_unetr
from btcv_unetr.config.flags import parse_config
from btcv_unetr.data.datalist import resolve_datalist
print(btcv_unetr.__file__)
print(parse_config(["--config", "phantom_demo.yaml"]).model.feature_size)
print(resolve_datalist("/nonexistent", "dataset_0.json"))
"""


def test_wheel_in_a_fresh_venv_finds_configs_and_datalists(tmp_path):
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: an in-tree build would leave build/ in the checkout.
    source = shutil.copytree(ROOT, tmp_path / "source", symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "runs", "demo", "outputs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels)], check=True, cwd=elsewhere)
    wheel = next(wheels.glob("btcv_unetr-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True)
    # The dependencies (torch, MONAI ...) come from this environment; .pth files there are not
    # processed, so this checkout's editable install stays invisible.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    help_text = subprocess.run([str(venv / "bin" / "btcv-unetr"), "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, check=True).stdout
    assert "check-data" in help_text and "export" in help_text
    lines = subprocess.run([str(python), "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    installed = Path(lines[0]).parent
    assert installed.is_relative_to(venv) and not installed.is_relative_to(ROOT)
    assert lines[1] == "16"  # phantom_demo.yaml's feature_size, not the default
    assert Path(lines[2]) == installed / "dataset_json" / "dataset_0.json"
