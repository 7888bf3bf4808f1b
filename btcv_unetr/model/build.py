"""The network of a config and its size (parameters, FLOPs): the networks themselves are ``architectures.py``'s
table (UNETR in ``unetr.py``), the speed switches applied to a built model ``speed.py``, weights from files
``weights.py``.
"""

from __future__ import annotations

import torch

from ..config.schema import ModelConfig
from .architectures import build_network


def build_model(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> torch.nn.Module:
    """The network ``config.model_name`` names (``architectures.py``); ``spacing``, the preprocessed grid's mm per
    voxel, plans DynUNet's kernels and strides (isotropic when None).

    Input ``(B, in_channels, *roi)``; output logits ``(B, out_channels, *roi)``."""
    return build_network(config, spacing)


def model_size(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> tuple[int, int]:
    """Parameters and FLOPs of one forward pass of a batch of one ROI-sized input (a multiply-add is 2).

    Counted on PyTorch's meta device: no memory, no arithmetic. Still most of a second of Python dispatch even
    for the tiny test model, paid at every training start and model load: counted once per architecture and
    process.
    """
    key = repr((config, spacing))  # every field: anything that changes the network changes the count
    if key not in _MODEL_SIZES:
        _MODEL_SIZES[key] = _count_model_size(config, spacing)
    return _MODEL_SIZES[key]


_MODEL_SIZES: dict[str, tuple[int, int]] = {}


def _count_model_size(config: ModelConfig, spacing: tuple[float, ...] | None) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.device("meta"):
            model = build_model(config, spacing)
            x = torch.empty(1, config.in_channels, *config.roi_size)
    except RuntimeError:  # Swin UNETR's constructor reads a tensor's value (.item()), which meta tensors lack
        model, x = build_model(config, spacing), torch.zeros(1, config.in_channels, *config.roi_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def describe_model_size(config: ModelConfig, spacing: tuple[float, ...] | None = None) -> str:
    """``model: 92,802,478 parameters, 146.4 GFLOPs per 96x96x96 window`` (one forward pass, batch 1)."""
    parameters, flops = model_size(config, spacing)
    window = "x".join(str(n) for n in config.roi_size)
    return f"model: {parameters:,} parameters, {flops / 1e9:.1f} GFLOPs per {window} window"


