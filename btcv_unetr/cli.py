"""``btcv-unetr`` command: one sub-command per job.

    btcv-unetr phantoms --out DIR --cases N --seed S [--size 512]
    btcv-unetr shapes2d --out DIR --cases N --seed S [--size 256] [--kind pet|face]
    btcv-unetr import totalsegmentator|amos|msd|nnunet SRC --out DIR [--download] [--val_fraction 0.2]
    btcv-unetr check-data --data_dir DIR [--json_list dataset.json]
    btcv-unetr train [--config FILE.yaml] [reference flags]      (also: python main.py ...)
    btcv-unetr crossval --json_list btcv_folds_5fold.json --logdir NAME [--folds K,...] [--report_only] [train flags]
    btcv-unetr infer [--input PATH] [reference flags]            (also: python test.py ...)
    btcv-unetr evaluate --pred DIR --label DIR
    btcv-unetr export --checkpoint FILE --format torchscript|onnx --out FILE
    btcv-unetr serve --checkpoint FILE [--host 127.0.0.1] [--port 8000] [--token T]

A mistake by the user (:class:`UserError`) is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import __version__, serve
from .config.flags import CommandFlags, FlagParser, unrecognized_flags_message
from .data import checks, importers
from .errors import UserError, one_line
from .inference import command as infer
from .inference import evaluate, export
from .serve.command import SERVE_FLAGS
from .synthetic import phantoms, shapes2d
from .train import command as train
from .train import crossval

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "phantoms": ("write a synthetic BTCV-like CT dataset", phantoms.add_arguments, phantoms.run),
    "shapes2d": ("write synthetic 2D RGB scenes: pet trimaps or face parts", shapes2d.add_arguments,
                 shapes2d.run),
    "import": ("a public CT dataset (TotalSegmentator, AMOS, Decathlon, nnU-Net raw) as a datalist with labels in "
               "BTCV's numbering", importers.add_arguments, importers.run),
    "check-data": ("check a datalist and every file it names", checks.add_arguments, checks.run),
    "train": ("train UNETR (reference flags; --config FILE.yaml)", train.add_arguments, train.run),
    "crossval": ("cross-validation: train every fold of a datalist with \"fold\" keys into runs/NAME/fold_K, score "
                 "each, report per organ", crossval.add_arguments, crossval.run),
    "infer": ("segment scans: masks in each scan's format and geometry (reference flags)", infer.add_arguments,
              infer.run),
    "evaluate": ("score predicted masks against labels (Dice, HD95, surface Dice)", evaluate.add_arguments,
                 evaluate.run),
    "export": ("write a trained model as TorchScript or ONNX", export.add_arguments, export.run),
    "serve": ("a REST service with a job queue and a web page (pip install 'btcv-unetr[serve]')",
              serve.add_arguments, serve.run),
}


# The config flags of each command that takes any, in the order a refused flag's line names the commands taking it.
CONFIG_FLAGS: dict[str, CommandFlags] = {
    "train": train.TRAIN_FLAGS, "infer": infer.INFER_FLAGS, "export": export.EXPORT_FLAGS, "serve": SERVE_FLAGS,
    "check-data": checks.CHECK_DATA_FLAGS, "evaluate": evaluate.EVALUATE_FLAGS, "crossval": crossval.CROSSVAL_FLAGS}


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        return command(args)
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    # Sub-command parsers take the class of this one: every flag mistake is one line.
    parser = FlagParser(prog="btcv-unetr", description="UNETR for BTCV abdominal CT segmentation")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        # ``infer --warmup_epochs 3`` would be ignored: refused, naming the commands that take the flag.
        parser.error(unrecognized_flags_message(args.command, unrecognized, CONFIG_FLAGS))
    return run_command(args.run, args)


if __name__ == "__main__":
    raise SystemExit(main())
