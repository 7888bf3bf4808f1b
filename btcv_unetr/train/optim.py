"""Optimisers and learning-rate schedules (stepped once per epoch, a function of the epoch alone)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config.schema import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of ``config.optim_name`` over the trainable parameters.

    ``fused`` selects PyTorch's single-kernel implementation (CPU and CUDA): the same update,
    about 3x faster than the default multi-tensor one for the 93 M parameters of UNETR-B on the CPU.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    implementation = {"fused": True} if fused else {}
    if config.optim_name == "adam":
        return torch.optim.Adam(parameters, lr=config.optim_lr, weight_decay=config.reg_weight, **implementation)
    if config.optim_name == "adamw":
        return torch.optim.AdamW(parameters, lr=config.optim_lr, weight_decay=config.reg_weight, **implementation)
    return torch.optim.SGD(parameters, lr=config.optim_lr, momentum=config.momentum, nesterov=True,
                           weight_decay=config.reg_weight, **implementation)


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base learning rate during epoch ``e`` (0-based).

    ``warmup_cosine``: linear warm-up to the base rate over ``warmup_epochs`` (epoch 0 already trains at
    base/warmup_epochs, unlike the reference which spends it at 0), then cosine decay to 0 at ``max_epochs``.
    ``linear``: the same warm-up, then linear decay to 0 at ``max_epochs`` (the rate after the last epoch's
    step; the last epoch trains at base/(max_epochs - warmup_epochs)).
    ``cosine_anneal``: cosine decay from the first epoch. ``none``: constant.
    """
    warmup, total = config.warmup_epochs, config.max_epochs

    def warmup_cosine(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        if total <= warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (total - warmup)))

    def warmup_linear(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        if total <= warmup:
            return 1.0
        return max(0.0, (total - epoch) / (total - warmup))

    def cosine(epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))

    return {"warmup_cosine": warmup_cosine, "linear": warmup_linear, "cosine_anneal": cosine,
            "none": lambda epoch: 1.0}[config.lrschedule]


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    epochs_done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``config``, positioned after ``epochs_done`` epochs (for a schedule re-planned mid-run)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config), last_epoch=epochs_done - 1)
