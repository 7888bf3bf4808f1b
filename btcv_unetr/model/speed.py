"""The speed switches of a built model: PyTorch's fused attention (SDPA), channels-last layout and norms, torch.compile.

None of them changes what the network computes beyond floating-point rounding; each is chosen per device and
precision (``fast:`` in the config)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from ..config.schema import FastConfig, ModelConfig
from .architectures import ARCHITECTURES, architecture_of_module, build_network, roi_problem


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch MONAI's attention blocks to ``F.scaled_dot_product_attention``; returns the block count.

    UNETR's ViT (``SABlock``) and Swin UNETR's windowed attention (``WindowAttention``, which MONAI runs fused only
    without autograd: inference) have the switch, ``use_flash_attention``, but neither network passes it on. The
    output is the same attention (tested); on GPUs it runs the flash/memory-efficient kernels and never stores the
    token x token matrix.
    """
    blocks = [m for m in model.modules() if isinstance(m, (SABlock, WindowAttention))]
    for block in blocks:
        if enabled and getattr(block, "save_attn", False):
            continue  # MONAI forbids storing attention maps with the fused kernel
        block.use_flash_attention = enabled
    return len(blocks)


def sdpa_for(fast: FastConfig, device: torch.device, precision: str) -> bool:
    """Whether the ViT blocks use ``F.scaled_dot_product_attention``: ``fast.sdpa`` when set, else per class.

    Automatic: on, except under bfloat16 on the CPU, where MONAI's own attention was 8-9% faster
    per UNETR-B forward and training step on a Zen 4 (no difference on a Xeon with AMX). On the
    AVX2 class in float32 the fused kernel was 5-11% faster; on GPUs it brings the flash kernels.
    """
    if fast.sdpa is not None:
        return fast.sdpa
    return not (device.type == "cpu" and precision != "fp32")


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm computed as a group norm with one channel per group: the same statistics.

    PyTorch's ``instance_norm`` makes a contiguous copy of a channels-last input and returns a
    contiguous output, which the next convolution reorders back: two full copies per norm, half of a
    channels-last CPU forward. The CPU group-norm kernel reads and writes channels-last directly.
    Parameters and state-dict keys are those of ``nn.InstanceNorm3d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or x.dim() != 5:
            return super().forward(x)
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


def channels_last_norms(model: nn.Module, enabled: bool = True) -> int:
    """Swap the class of ``model``'s ``InstanceNorm3d`` layers (in place) to or from
    :class:`ChannelsLastInstanceNorm3d`; returns how many were swapped.
    """
    old, new = (nn.InstanceNorm3d, ChannelsLastInstanceNorm3d) if enabled else (ChannelsLastInstanceNorm3d,
                                                                                  nn.InstanceNorm3d)
    norms = [m for m in model.modules() if type(m) is old]
    for norm in norms:
        norm.__class__ = new
    return len(norms)


def memory_format_for(fast: FastConfig, device: torch.device, precision: str, training: bool,
                      spatial_dims: int = 3, network_default: bool = True) -> torch.memory_format:
    """The memory format a model runs in: ``fast.channels_last`` when set, else chosen per CPU class and network.

    Automatic: channels-last 3D on the CPU for inference (oneDNN keeps channels-last outputs as they
    are instead of reordering each one), and for training only in float32: there the 1x1x1 and
    decoder convolutions' backward passes are faster channels-last, while under bfloat16 autocast
    the channels-last step was 1.5-1.7x slower on a Zen 4 (docs/measurements.md, switches vs alternatives).
    ``network_default``: the network's own measured choice (the registry's ``cpu_channels_last``); False keeps
    it contiguous. Never on GPUs and for 2D models (not measured there).
    """
    if device.type != "cpu" or spatial_dims != 3:
        return torch.contiguous_format
    automatic = network_default and (not training or precision == "fp32")
    wanted = fast.channels_last if fast.channels_last is not None else automatic
    return torch.channels_last_3d if wanted else torch.contiguous_format


def to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` (changed in place) in ``memory_format``, with :class:`ChannelsLastInstanceNorm3d` when
    channels-last."""
    if memory_format != torch.channels_last_3d:
        return model
    channels_last_norms(model)
    return model.to(memory_format=memory_format)


def prepare_model(model: nn.Module, fast: FastConfig, device: torch.device, precision: str,
                  training: bool, model_name: str | None = None) -> tuple[nn.Module, torch.memory_format]:
    """``model`` (changed in place) in its memory format with its attention kernel, and that format.

    ``model_name``: the registry's name of the network (None: told by its class). Inputs must be given in the
    returned format. ``torch.compile`` is left to :func:`compile_if_asked`, which training applies after the DDP
    wrapper.
    """
    architecture = ARCHITECTURES[model_name] if model_name else architecture_of_module(model)
    spatial_dims = 3 if any(isinstance(m, nn.Conv3d) for m in model.modules()) else 2
    memory_format = memory_format_for(fast, device, precision, training, spatial_dims,
                                      architecture.cpu_channels_last)
    model = to_memory_format(model, memory_format)
    use_sdpa(model, sdpa_for(fast, device, precision))
    return model, memory_format


def compile_if_asked(model: nn.Module, fast: FastConfig) -> nn.Module:
    """``torch.compile(model)`` with ``--compile`` (off by default: on the 2-core CPU slower than eager
    with the channels-last norms, after 28 s of compiling), else ``model``."""
    return torch.compile(model) if fast.compile else model


# The probe window of a network other than UNETR: its ROI, each side capped here (a whole forward per try).
PROBE_NETWORK_SIDE = 64


@functools.cache
def network_bf16_speedup(name: str, settings: str) -> float:
    """float32 time / bfloat16 autocast time of one forward of the network ``name`` itself (``settings``: the JSON
    of its ModelConfig), on one window of its ROI with each side capped at :data:`PROBE_NETWORK_SIDE` where the
    network accepts that: its own layers at their own channel counts (a CNN's convolutions or Swin UNETR's window
    attention gain differently from UNETR's ViT). The precision decision's probe for networks other than UNETR
    (``runtime.precision.resolve_precision(network_probe=...)``); a second or two per try on a 2-core CPU, only
    where bfloat16 is native, once per machine and network shape."""
    config = ModelConfig(**json.loads(settings))
    capped = dataclasses.replace(config, **{key: min(getattr(config, key), PROBE_NETWORK_SIDE)
                                            for key in ("roi_x", "roi_y", "roi_z")})
    config = capped if roi_problem(capped) is None else config
    with torch.random.fork_rng(devices=[]):  # a seeded run's weights must not depend on whether the probe ran
        torch.manual_seed(0)
        network = build_network(config).eval()
        window = torch.randn(1, config.in_channels, *config.roi_size)

    def seconds(bf16: bool) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            network(window)  # warm-up: oneDNN builds its kernels on the first call
            started = time.perf_counter()
            network(window)
            return time.perf_counter() - started

    return seconds(False) / seconds(True)
