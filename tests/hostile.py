"""Hostile files the fault tests share: a TorchScript module that runs code of its own when torch loads it."""

from __future__ import annotations

import torch
from torch import nn


class WritesOnLoad(nn.Module):
    """Passes its input through; restoring it (``__setstate__``, run by ``torch.jit.load``) writes ``marker``."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        torch.save(self.weight, self.marker)
