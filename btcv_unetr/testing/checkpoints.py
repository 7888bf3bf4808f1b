"""Checkpoints with seeded random weights, for tests, benchmarks and trying the service."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.schema import Config
from ..io.checkpoint import save_checkpoint
from ..model.build import build_model
from ..runtime.precision import Precision
from ..train.card import untrained_card


def seeded_checkpoint(path: Path, config: Config, seed: int = 0) -> Path:
    """A checkpoint of ``config``'s model with weights drawn from ``seed``, written as training writes one
    (config, optimiser, scheduler and an untrained model card included), where accuracy does not matter."""
    torch.manual_seed(seed)
    model = build_model(config.model, config.data.pixdim)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(Path(path), model, optimizer, scheduler, Precision("fp32", "random weights"), 1, 1, 0.0, config,
                    untrained_card(config))
    return Path(path)
