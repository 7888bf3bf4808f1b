"""3D inference: a scan segmented end to end and its windows alone, and the mean organ Dice of a folder."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from machine import PeakMemory, median_seconds

from btcv_unetr.config.schema import Config
from btcv_unetr.inference.batch import run_inference, segment_case
from btcv_unetr.inference.cases import Case
from btcv_unetr.inference.predictor import Predictor


def inference(predictor_class: type[Predictor], config: Config, scan: Path, out_dir: Path, repeats: int,
              device: torch.device) -> dict:
    """Seconds per scan end to end (read, preprocess, windows, invert, write) and for the windows alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = predictor_class(config)
        case = Case(scan.name.split(".")[0], scan)
        with PeakMemory(device) as memory:
            end_to_end = median_seconds(lambda: segment_case(predictor, case, out_dir, config), repeats)
        image = predictor.transform({"image": str(scan)})["image"]
        windows = median_seconds(lambda: predictor.probabilities(image), repeats)
    return {"end_to_end_s": end_to_end, "windows_s": windows, "peak_memory_gb": memory.peak_bytes / 1e9,
            "sw_batch_size": predictor.sw_batch_size, "preprocessed_shape": list(image.shape[1:])}


def segment_folder(predictor_class: type[Predictor], config: Config) -> float:
    """Mean organ Dice over the datalist's validation cases, segmented by ``predictor_class``."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = run_inference(config, predictor_class(config))
    return float(summary["mean_organ_dice"])
