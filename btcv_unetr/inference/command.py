"""``python test.py`` / ``btcv-unetr infer``: the command line of batch inference, one process or torchrun's ranks."""

from __future__ import annotations

import argparse
import sys

from ..config import Config, add_config_arguments, config_from_args
from ..distributed import Context, launch, local_world_size, pick_device, share_cpu_threads, under_torchrun
from ..model.pretrained import resolve_pretrained
from ..runtime.allocator import keep_freed_memory
from .batch import run_inference


def infer_worker(context: Context, config: Config) -> None:
    """One torchrun rank: its share of the cases (and on the CPU of the machine's cores), into the output
    folder all ranks share."""
    if context.device.type == "cpu":
        share_cpu_threads(local_world_size(context))
    run_inference(config, context=context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "infer")


def run(args: argparse.Namespace) -> int:
    config = resolve_pretrained(config_from_args(args), "infer")
    if config.fast.malloc_tuning and pick_device(config.infer.device).type == "cpu":
        keep_freed_memory()
    try:
        if under_torchrun():  # torchrun --nproc_per_node N test.py ...: each rank segments its share
            launch(infer_worker, config)
        else:
            run_inference(config)
    except KeyboardInterrupt:
        print("interrupted: the masks written so far are complete; run the same command again to segment the rest",
              file=sys.stderr)
        return 130
    return 0
