"""``python main.py`` / ``btcv-unetr train``: the command line of training, one process, --distributed or torchrun."""

from __future__ import annotations

import argparse

from monai.utils import set_determinism

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import Config
from ..distributed import Context, launch
from ..model.pretrained import resolve_pretrained
from ..runtime.allocator import keep_freed_memory
from .loop import check_training_data, run_training
from .run_folder import resolve_logdir, run_folder

# The config flags of ``train``: every section, and of inference's the settings validation uses.
TRAIN_FLAGS: CommandFlags = {"model": None, "data": None, "train": None, "dist": None, "fast": None,
                             "infer": ("infer_overlap", "sw_batch_size", "mode", "device"), "general": None}


def train_worker(context: Context, config: Config) -> None:
    logdir = resolve_logdir(config.train.logdir)
    if config.train.seed is not None:
        set_determinism(config.train.seed)
    if context.device.type == "cpu" and config.fast.malloc_tuning:
        keep_freed_memory()
    check_training_data(config, context)
    with run_folder(logdir, config, context):
        run_training(context, config, logdir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TRAIN_FLAGS)


def run(args: argparse.Namespace) -> int:
    launch(train_worker, resolve_pretrained(config_from_args(args), "train"))
    return 0
