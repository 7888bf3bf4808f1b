"""``python test.py`` / ``btcv-unetr infer``: the command line of batch inference, one process or torchrun's ranks."""

from __future__ import annotations

import argparse
import sys

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import PREPROCESSING, Config
from ..distributed import Context, launch, local_world_size, pick_device, share_cpu_threads, under_torchrun
from ..model.pretrained import resolve_pretrained
from ..runtime.allocator import keep_freed_memory
from .batch import run_inference

# Flags the reference's test.py took without using them at inference (its loader shared the
# training arguments), per section: test.py still accepts them, so that reference commands keep working.
REFERENCE_TEST_EXTRAS: dict[str, tuple[str, ...]] = {
    "data": ("RandFlipd_prob", "RandRotate90d_prob", "RandScaleIntensityd_prob", "RandShiftIntensityd_prob",
             "workers"),
    "dist": ("distributed",),
}
# The config flags of ``infer`` (test.py): the model, inference, the datalist and preprocessing, the weights.
INFER_FLAGS: CommandFlags = {
    "model": None, "infer": None,
    "data": ("data_dir", "json_list", "fold", "label_map", "max_pixels", *PREPROCESSING,
             *REFERENCE_TEST_EXTRAS["data"]),
    "train": ("pretrained_dir", "pretrained_model_name", "pretrained", "precision"),
    "dist": REFERENCE_TEST_EXTRAS["dist"],
    "fast": ("malloc_tuning", "sdpa", "compile", "channels_last"), "general": None}


def infer_worker(context: Context, config: Config) -> None:
    """One torchrun rank: its share of the cases (and on the CPU of the machine's cores), into the output
    folder all ranks share."""
    if context.device.type == "cpu":
        share_cpu_threads(local_world_size(context))
    run_inference(config, context=context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, INFER_FLAGS, unused=REFERENCE_TEST_EXTRAS,
                         unused_help="accepted as the reference's test.py does; not used by inference")


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
