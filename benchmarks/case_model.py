"""UNETR passes on one crop: forward (inference mode, as the Predictor runs it) and forward+backward, and
where the forward's time goes block by block."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from machine import median_seconds, run_precision
from torch.utils.flop_counter import FlopCounterMode

from btcv_unetr.config.schema import Config
from btcv_unetr.model.build import build_model
from btcv_unetr.model.speed import prepare_model


def model_passes(config: Config, device: torch.device, repeats: int) -> dict:
    """UNETR forward (inference mode, as the Predictor runs it) and forward+backward times for one crop."""
    torch.manual_seed(0)
    precision = run_precision(config, device)
    model = build_model(config.model).to(device)
    x = torch.randn(1, config.model.in_channels, *config.model.roi_size, device=device)
    inference_model, inference_layout = prepare_model(copy.deepcopy(model), config.fast, device, precision.name,
                                                      training=False)
    x_inference = x.contiguous(memory_format=inference_layout)
    model, training_layout = prepare_model(model, config.fast, device, precision.name, training=True)
    x = x.contiguous(memory_format=training_layout)

    def forward():
        with torch.inference_mode(), precision.autocast(device):
            return inference_model(x_inference)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with precision.autocast(device):
            out = model(x)
        out.float().square().mean().backward()

    return {"forward_s": median_seconds(forward, repeats),
            "forward_backward_s": median_seconds(forward_backward, repeats)}


def module_profile(config: Config, device: torch.device, repeats: int) -> list[dict]:
    """Seconds and FLOPs of each top-level block of one forward pass (where the time goes)."""
    torch.manual_seed(0)
    precision = run_precision(config, device)
    model, layout = prepare_model(build_model(config.model).to(device).eval(), config.fast, device, precision.name,
                                  training=False)
    x = torch.randn(1, config.model.in_channels, *config.model.roi_size, device=device).contiguous(memory_format=layout)
    with FlopCounterMode(display=False) as counter:
        model(x)
    flops = {name.removeprefix(f"{type(model).__name__}."): sum(counts.values())
             for name, counts in counter.get_flop_counts().items()}
    seconds: dict[str, list[float]] = {name: [] for name, _ in model.named_children()}
    started: dict[str, float] = {}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for name, child in model.named_children():
        child.register_forward_pre_hook(lambda *_, name=name: started.__setitem__(name, clock()))
        child.register_forward_hook(lambda *_, name=name: seconds[name].append(clock() - started[name]))
    for _ in range(repeats + 1):
        with torch.inference_mode(), precision.autocast(device):
            model(x)
    return [{"block": name, "seconds": statistics.median(times[1:]), "flops": flops.get(name, 0)}
            for name, times in seconds.items() if times]
