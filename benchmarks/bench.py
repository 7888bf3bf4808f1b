#!/usr/bin/env python
"""Speed of the reference-style path and of the fast path, measured in one process and one run.

    python benchmarks/bench.py [--device cpu|cuda] [--quick] [--out FILE.json]
    python benchmarks/bench.py --serve [--clients 4] [--serve_seconds 60] [--serve_checkpoint FILE]
    python benchmarks/bench.py --networks [unetr,swin_unetr,...] [--quick]

Each time is the median of several timed repetitions after a warm-up run. All reference-style
figures are taken first, while glibc still has its default allocator, then the fast-path ones
(the allocator switch is process-wide). Figures: the matmul peak, UNETR forward and
forward+backward (FLOP/s and fraction of the peak), one training step as ``main.py`` takes it,
data-loading throughput, sliding-window inference of a BTCV-sized phantom end to end and for the
windows alone, the Dice of both inference paths on one trained tiny model, and the loss curves of
both training paths. ``--quick`` uses smaller shapes (demo-sized model, 128^2 phantoms).

``--serve`` runs a load check of ``btcv-unetr serve`` instead: N clients submit phantoms to a real
server process for a bounded time; figures are jobs per minute and submit-to-mask latency.
"""

# This file is the driver: the command line, which run to make, the JSON record and the table. Each run
# lives in a module of its own beside it:
#   case_paths.py     the default run, reference-style vs fast path, built from
#                     case_model.py (forward, forward+backward, profile), case_train3d.py (training step, loss
#                     curves, input pipeline, the Dice check's tiny model), case_infer3d.py (a scan end to end,
#                     a folder's Dice) and case_2d.py (RGB pictures)
#   case_switches.py  --switches: each fast-path switch against its alternative
#   case_serve.py     --serve: the service under load
#   case_networks.py  --networks: each network of the registry, MONAI's plain fp32 module against the fast path
#   machine.py        the machine record and timing tools they share; settings.py the model sizes per mode

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's btcv_unetr, installed or not

from case_networks import network_table, run_networks  # noqa: E402  (benchmarks/ is on the path)
from case_paths import run, table  # noqa: E402  (benchmarks/ is on the path: this script's folder)
from case_serve import ServeCheckError, run_serve, serve_table  # noqa: E402
from case_switches import run_switches, switch_table  # noqa: E402

from btcv_unetr.files import atomic_write_json  # noqa: E402
from btcv_unetr.testing.server import ServerStartError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes: a smoke run of a few minutes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default runs/bench_<device>[_quick].json)")
    parser.add_argument("--silent", action="store_true", help="print only the table")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per figure after the warm-up (default 3, --quick 2)")
    parser.add_argument("--switches", action="store_true",
                        help="only measure each fast-path switch against its alternative on this machine")
    parser.add_argument("--dice_checkpoint", type=Path, default=None,
                        help="trained checkpoint for the Dice check (e.g. runs/demo/model.pt) instead of a tiny model "
                             "trained here; needs --dice_data")
    parser.add_argument("--dice_data", type=Path, default=None,
                        help="dataset folder with dataset.json whose validation cases the Dice check segments")
    parser.add_argument("--networks", nargs="?", const=True, default=None, metavar="NAME,...",
                        help="only each network's window passes, plain MONAI fp32 against the fast path (all, or the "
                             "networks named; --quick: the demo's sizes)")
    parser.add_argument("--serve", action="store_true",
                        help="only the load check of btcv-unetr serve: clients submitting phantoms for a bounded time")
    parser.add_argument("--clients", type=int, default=4, help="--serve: clients submitting jobs at once")
    parser.add_argument("--serve_seconds", type=float, default=60.0,
                        help="--serve: seconds the clients submit for (then their last jobs are awaited)")
    parser.add_argument("--serve_checkpoint", type=Path, default=None,
                        help="--serve: the model the server loads (default: a tiny model with random weights)")
    parser.add_argument("--serve_size", default="64",
                        help="--serve: phantom sizes in-plane, voxels, comma-separated and taken in turn (512: BTCV's "
                             "512 x 512 x ~100-200)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    if (args.dice_checkpoint is None) != (args.dice_data is None):
        print("error: --dice_checkpoint and --dice_data go together", file=sys.stderr)
        return 2
    if sum(map(bool, (args.serve, args.switches, args.networks))) > 1:
        print("error: --serve, --switches and --networks are separate runs: choose one", file=sys.stderr)
        return 2
    try:
        args.serve_sizes = tuple(int(size) for size in args.serve_size.split(","))
    except ValueError:
        args.serve_sizes = ()
    if args.clients < 1 or args.serve_seconds <= 0 or not args.serve_sizes or min(args.serve_sizes) < 16:
        print("error: --clients must be >= 1, --serve_seconds > 0, --serve_size sizes >= 16 (e.g. 64,512)",
              file=sys.stderr)
        return 2
    for path in (args.dice_checkpoint, args.dice_data and args.dice_data / "dataset.json", args.serve_checkpoint):
        if path is not None and not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    started = time.perf_counter()
    kind = "serve" if args.serve else "switches" if args.switches else "networks" if args.networks else "paths"
    try:
        results = {"serve": run_serve, "switches": run_switches, "networks": run_networks, "paths": run}[kind](args)
    except (ServeCheckError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results["duration_s"] = time.perf_counter() - started
    prefix = "" if kind == "paths" else f"{kind}_"
    suffix = "_quick" if args.quick and not args.serve else ""  # --quick does not change the serve check
    out = args.out or Path("runs") / f"bench_{prefix}{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print({"serve": serve_table, "switches": switch_table, "networks": network_table, "paths": table}[kind](results))
    print(f"{results['duration_s']:.0f} s in all; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
