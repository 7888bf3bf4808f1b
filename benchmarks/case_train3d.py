"""3D training: one optimiser step as ``main.py`` takes it, loss curves over fixed batches, the input
pipeline's throughput, and the tiny model the Dice check trains."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import median_seconds, run_precision

from btcv_unetr.config.schema import Config
from btcv_unetr.data.datalist import load_config_split, make_dataset
from btcv_unetr.data.transforms import train_transforms
from btcv_unetr.distributed import Context, launch
from btcv_unetr.model.build import build_model
from btcv_unetr.model.speed import prepare_model
from btcv_unetr.train.command import train_worker
from btcv_unetr.train.loop import micro_batch_size, train_step
from btcv_unetr.train.loss import build_loss
from btcv_unetr.train.optim import build_optimizer


def step_function(config: Config, device: torch.device,
                  seed: int) -> Callable[[torch.Tensor, torch.Tensor], float | None]:
    """A fresh model and optimiser (seeded) and a function taking one training step as ``main.py`` does."""
    torch.manual_seed(seed)
    precision = run_precision(config, device)
    model, layout = prepare_model(build_model(config.model).to(device).train(), config.fast, device, precision.name,
                                  training=True)
    optimizer = build_optimizer(model, config.train, fused=config.fast.fused_optimizer)
    loss_fn, _ = build_loss(config.train, config.model.out_channels, [], device)  # the benchmark's configs: unweighted
    context = Context(0, 1, 0, device)

    def step(image: torch.Tensor, label: torch.Tensor) -> float | None:
        micro = micro_batch_size(config.fast, device, image.shape[0], precision.name)
        return train_step(model, image.contiguous(memory_format=layout), label, loss_fn, optimizer, precision,
                          context, micro)
    return step


def training_step(config: Config, device: torch.device, repeats: int) -> dict:
    """One optimiser step of the recipe's batch of crops (loss, backward, AdamW), as ``main.py`` runs it."""
    step = step_function(config, device, seed=0)
    crops = config.data.num_samples * config.train.batch_size
    image = torch.randn(crops, config.model.in_channels, *config.model.roi_size, device=device)
    label = torch.randint(0, config.model.out_channels, (crops, 1, *config.model.roi_size), device=device).float()
    seconds = median_seconds(lambda: step(image, label), repeats)
    micro = micro_batch_size(config.fast, device, crops, run_precision(config, device).name)
    return {"step_s": seconds, "crops": crops, "micro_batch": micro}


def loss_curve(config: Config, batches: list[dict], device: torch.device, seed: int) -> list[float]:
    """Training losses over ``batches`` (the same crops for every path) from a model seeded with ``seed``."""
    step = step_function(config, device, seed)
    return [step(batch["image"].as_tensor().to(device), batch["label"].as_tensor().to(device)) for batch in batches]


def tiny_batches(config: Config, steps: int) -> list[dict]:
    """``steps`` training batches of the tiny config, drawn once with a fixed seed."""
    dataset = make_dataset(load_config_split(config.data, "training"), train_transforms(config), config.data)
    dataset.transform.set_random_state(seed=0)
    batches = []
    while len(batches) < steps:
        for index in range(len(dataset)):
            crops = dataset[index]
            batches.append({key: torch.stack([crop[key] for crop in crops]) for key in ("image", "label")})
    return batches[:steps]


def train_tiny(config: Config) -> Path:
    """Train the tiny model of the Dice check; returns its checkpoint."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        launch(train_worker, config)
    return Path(config.train.logdir) / "model_final.pt"


def data_throughput(config: Config) -> dict:
    """Cases per second through the random transforms of cached cases (the per-step input work)."""
    items = load_config_split(config.data, "training")
    started = time.perf_counter()
    dataset = make_dataset(items, train_transforms(config), config.data)
    cache_s = (time.perf_counter() - started) / len(items)
    rounds = 3
    started = time.perf_counter()
    for _ in range(rounds):
        for index in range(len(dataset)):
            dataset[index]
    per_case = (time.perf_counter() - started) / (rounds * len(dataset))
    return {"cache_s_per_case": cache_s, "random_s_per_case": per_case, "cases_per_s": 1 / per_case}
