#!/usr/bin/env python
"""Inference throughput over a folder: one process against N torchrun processes, as a user runs them.

    python benchmarks/infer_throughput.py [--processes 2] [--cases 8] [--size 256] [--config phantom_demo.yaml]
        [--checkpoint FILE] [--device cpu|cuda] [--out FILE.json]

Writes ``--cases`` phantom scans (``--size`` in-plane voxels, 512 is BTCV's), then segments the folder with
``python test.py --input FOLDER`` and with ``torchrun --nproc_per_node N test.py --input FOLDER``, each into a
fresh folder, and times each command whole (start-up, model loading and writing included: what a user waits
for). Prints cases per minute for both, the speed-up, and whether the two folders hold the same mask bytes.
Without ``--checkpoint`` the model of ``--config`` gets random weights (speed does not depend on them). The
precision is resolved once first (``auto``: the per-machine decision), then given to both runs. On the CPU
each of the N processes uses cores / N threads (btcv_unetr.distributed.share_cpu_threads); with ``--device
cuda`` process r uses GPU r, so N must not exceed the visible GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from btcv_unetr.config.load import (  # noqa: E402
    CONFIG_DIR,
    build_config,
    read_yaml,  # noqa: E402
)
from btcv_unetr.io.checkpoint import load_checkpoint, stored_config  # noqa: E402
from btcv_unetr.runtime.precision import cpu_features, resolve_precision  # noqa: E402
from btcv_unetr.synthetic.phantoms import generate_case  # noqa: E402
from btcv_unetr.testing.checkpoints import seeded_checkpoint  # noqa: E402

SEED = 20


def write_scans(folder: Path, cases: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, cases + 1):
        nib.save(generate_case(SEED, index, size).image, folder / f"scan{index:03d}.nii.gz")


def resolved_precision(checkpoint: Path, device: str) -> str:
    """What ``auto`` resolves to here for the checkpoint's model (taken once, so that both runs use it)."""
    config = stored_config(load_checkpoint(checkpoint), str(checkpoint)) or build_config([])  # a bare state dict
    with contextlib.redirect_stderr(io.StringIO()):
        return resolve_precision("auto", torch.device(device), config.model).name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_run(launcher: list[str], scans: Path, checkpoint: Path, out: Path, device: str, precision: str) -> float:
    """Seconds the whole command takes; its output goes to ``out.log``."""
    command = [*launcher, str(ROOT / "test.py"), "--input", str(scans), "--output_dir", str(out),
               "--pretrained_dir", str(checkpoint.parent), "--pretrained_model_name", checkpoint.name,
               "--device", device, "--precision", precision, "--no-overlay"]
    # The environment's thread setting would override each process's share of the cores.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    started = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = "".join(Path(f"{out}.log").read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"{tail}{' '.join(command)} failed (exit {result.returncode})")
    return seconds


def same_masks(first: Path, second: Path) -> bool:
    masks = sorted(p.name for p in first.glob("*_seg.nii.gz"))
    return masks == sorted(p.name for p in second.glob("*_seg.nii.gz")) and \
        all((first / name).read_bytes() == (second / name).read_bytes() for name in masks)


def measure(args: argparse.Namespace, work: Path) -> dict:
    scans = work / "scans"
    write_scans(scans, args.cases, args.size)
    checkpoint = args.checkpoint or seeded_checkpoint(
        work / "model.pt", build_config([read_yaml(CONFIG_DIR / args.config)]))
    precision = resolved_precision(checkpoint, args.device)
    one = timed_run([sys.executable], scans, checkpoint, work / "one", args.device, precision)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    many = timed_run(torchrun, scans, checkpoint, work / "many", args.device, precision)
    return {"processor": cpu_features().model if args.device == "cpu" else torch.cuda.get_device_name(0),
            "cores": len(os.sched_getaffinity(0)), "device": args.device, "precision": precision,
            "cases": args.cases, "scan_shape": list(generate_case(SEED, 1, args.size).image.shape),
            "model": args.config if args.checkpoint is None else str(args.checkpoint), "processes": args.processes,
            "one_process_s": round(one, 1), "many_processes_s": round(many, 1),
            "one_process_cases_per_min": round(60 * args.cases / one, 2),
            "many_processes_cases_per_min": round(60 * args.cases / many, 2), "speedup": round(one / many, 2),
            "same_mask_bytes": same_masks(work / "one", work / "many")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--cases", type=int, default=8, help="phantom scans in the folder (default 8)")
    parser.add_argument("--size", type=int, default=256, help="their in-plane voxels (default 256; BTCV: 512)")
    parser.add_argument("--config", default="phantom_demo.yaml", help="model of the random-weights checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint instead")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.processes > torch.cuda.device_count():
        parser.error(f"--processes {args.processes}: only {torch.cuda.device_count()} GPU(s) visible")
    with tempfile.TemporaryDirectory(prefix="btcv_throughput_") as work:
        figures = measure(args, Path(work))
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
