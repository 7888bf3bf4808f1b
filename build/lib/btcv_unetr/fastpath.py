"""The fast path: speed switches for training and inference, each on by default and each switchable off.

    keep_freed_memory   glibc keeps freed blocks in the process (no page faults on every big activation)
    use_sdpa            fused scaled-dot-product attention in the ViT blocks
    sdpa_for            whether to use it, per CPU class and precision
    channels_last_norms instance norms that keep the channels-last layout
    memory_format_for   channels-last or not, per CPU class, precision and stage
    to_memory_format    the model in that layout, with those norms
    apply_model_switches  the attention kernel and the optional ``torch.compile`` (off by default: on
                        the 2-core CPU slower than eager with the channels-last norms, after 28 s of compiling)
    micro_batch_size    crops per forward/backward; the optimiser still steps once per batch
    auto_sw_batch_size  windows per forward pass from the device and its free memory

Why these and not others: ``benchmarks/bench.py`` and the README's benchmark section.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from .config import Config, FastConfig
from .precision import cpu_features

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries: nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed heap memory in the process (``True``) or restore glibc's defaults (``False``).

    By default glibc serves every block above 128 KiB-32 MiB with a fresh ``mmap`` and unmaps it on
    free, so each 28-56 MB activation of a 96^3 UNETR window is page-faulted in again at every layer:
    a third of a CPU forward pass. Serving all blocks from the heap and never trimming it removes
    that; the process keeps its peak memory instead of returning it. Returns whether it applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enabled:
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    restored = bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    libc.malloc_trim(0)
    return restored


def use_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch MONAI's ViT attention blocks to ``F.scaled_dot_product_attention``; returns the block count.

    MONAI's UNETR does not expose the switch its ``SABlock`` has. The output is the same attention
    (tested); on GPUs it runs the flash/memory-efficient kernels and never stores the token x token matrix.
    """
    blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    for block in blocks:
        if enabled and getattr(block, "save_attn", False):
            continue  # MONAI forbids storing attention maps with the fused kernel
        block.use_flash_attention = enabled
    return len(blocks)


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


def memory_format_for(fast: FastConfig, device: torch.device, precision: str, training: bool) -> torch.memory_format:
    """The memory format a model runs in: ``fast.channels_last`` when set, else chosen per CPU class.

    Automatic: channels-last 3D on the CPU for inference (oneDNN keeps channels-last outputs as they
    are instead of reordering each one), and for training only in float32: there the 1x1x1 and
    decoder convolutions' backward passes are faster channels-last, while under bfloat16 autocast
    the channels-last step was 1.5-1.7x slower on a Zen 4 (README, fast-path switches per CPU class).
    Never on GPUs (not measured there).
    """
    if device.type != "cpu":
        return torch.contiguous_format
    wanted = fast.channels_last if fast.channels_last is not None else (not training or precision == "fp32")
    return torch.channels_last_3d if wanted else torch.contiguous_format


def to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` (changed in place) in ``memory_format``, with :class:`ChannelsLastInstanceNorm3d` when channels-last."""
    if memory_format != torch.channels_last_3d:
        return model
    channels_last_norms(model)
    return model.to(memory_format=memory_format)


def sdpa_for(fast: FastConfig, device: torch.device, precision: str) -> bool:
    """Whether the ViT blocks use ``F.scaled_dot_product_attention``: ``fast.sdpa`` when set, else per class.

    Automatic: on, except under bfloat16 on the CPU, where MONAI's own attention was 8-9% faster
    per UNETR-B forward and training step on a Zen 4 (no difference on a Xeon with AMX). On the
    AVX2 class in float32 the fused kernel was 5-11% faster; on GPUs it brings the flash kernels.
    """
    if fast.sdpa is not None:
        return fast.sdpa
    return not (device.type == "cpu" and precision != "fp32")


def apply_model_switches(model: nn.Module, fast: FastConfig, device: torch.device, precision: str) -> nn.Module:
    """The model-level switches of ``fast``: the attention kernel (in place), then ``torch.compile`` if asked."""
    use_sdpa(model, sdpa_for(fast, device, precision))
    return torch.compile(model) if fast.compile else model


def micro_batch_size(fast: FastConfig, device: torch.device, crops: int, precision: str) -> int:
    """Crops per forward/backward pass for a batch of ``crops`` crops.

    ``fast.micro_batch`` 0 means automatic. On the CPU, per precision: bfloat16 one crop at a time
    (faster per crop than a batch of 4 on a Zen 5), float32 two (7% faster per step than one for
    UNETR-B in the channels-last layout where bfloat16 is not native; four were no faster and
    need twice the memory). On a GPU the whole batch.
    """
    if fast.micro_batch > 0:
        return min(fast.micro_batch, crops)
    if device.type != "cpu":
        return crops
    return min(2 if precision == "fp32" else 1, crops)


# A rough upper bound of the GPU memory one window needs at inference: the decoder keeps a few
# full-resolution maps of feature_size channels alive at once; 64 bytes per voxel and feature is
# 16 such maps in float32 (0.9 GB for a 96^3 window at feature 16). Only half the free memory is used.
_BYTES_PER_WINDOW_VOXEL_FEATURE = 64


def auto_sw_batch_size(requested: int, device: torch.device, roi: tuple[int, int, int], feature_size: int,
                       precision: str, limit: int = 8) -> int:
    """Windows per forward pass: ``requested`` if > 0, else chosen for the device.

    CPU: 4 with AMX (its matrix units are fed better by 4 windows: 6% less time per UNETR-B
    window under bf16 on a 2-core Xeon), else 2 (per UNETR-B window, 15% less time than 1 under
    bf16 on a Zen 4, and 4 no better; 40% less under fp32 on the AVX2 class for the demo's model,
    4 no better). AMX counts only in bfloat16: its tiles compute no float32. GPU: as many as fit in half the free memory, up to ``limit``.
    """
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 4 if cpu_features().amx_bf16 and precision == "bf16" else 2
    free, _ = torch.cuda.mem_get_info(device)
    per_window = roi[0] * roi[1] * roi[2] * feature_size * _BYTES_PER_WINDOW_VOXEL_FEATURE
    return max(1, min(limit, int(0.5 * free // per_window)))


def reference_style(config: Config) -> Config:
    """``config`` with every speed switch off: the path the reference recipe takes.

    float32 (no autocast), MONAI's default attention, glibc's default allocator, the crops of a batch in
    one forward pass, one window per pass, the whole scan resampled before the body crop, and masks
    from every class probability inverted one by one.
    """
    fast = FastConfig(malloc_tuning=False, sdpa=False, micro_batch=config.data.num_samples * config.train.batch_size,
                      fused_optimizer=False, compile=False, channels_last=False, crop_before_resampling=False)
    return dataclasses.replace(config, fast=fast, train=dataclasses.replace(config.train, precision="fp32"),
                               infer=dataclasses.replace(config.infer, sw_batch_size=1, fast_invert=False))
