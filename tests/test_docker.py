from pathlib import Path

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
    users = [line for line in instructions if line.startswith("USER ")]
    assert users and users[-1] != "USER root"
