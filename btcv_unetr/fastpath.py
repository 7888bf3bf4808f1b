"""The fast path: speed switches for training and inference, each on by default and each switchable off.

    keep_freed_memory   glibc keeps freed blocks in the process (no page faults on every big activation)
    use_sdpa            fused scaled-dot-product attention in the ViT blocks
    channels_last_norms instance norms that keep the channels-last layout (CPU inference)
    to_inference_layout the model in the layout windows run in, with those norms
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


def to_inference_layout(model: nn.Module, fast: FastConfig, device: torch.device) -> tuple[nn.Module, torch.memory_format]:
    """``model`` (changed in place) in the memory format windows run in, and that format.

    Channels-last 3D with :class:`ChannelsLastInstanceNorm3d` on the CPU when ``fast.channels_last``,
    else the default layout. Inference only: on this CPU a channels-last backward pass was 1.7x slower.
    """
    if not (fast.channels_last and device.type == "cpu"):
        return model, torch.contiguous_format
    channels_last_norms(model)
    return model.to(memory_format=torch.channels_last_3d), torch.channels_last_3d


def apply_model_switches(model: nn.Module, fast: FastConfig) -> nn.Module:
    """The model-level switches of ``fast``: the attention kernel (in place), then ``torch.compile`` if asked."""
    use_sdpa(model, fast.sdpa)
    return torch.compile(model) if fast.compile else model


def micro_batch_size(fast: FastConfig, device: torch.device, crops: int) -> int:
    """Crops per forward/backward pass for a batch of ``crops`` crops.

    ``fast.micro_batch`` 0 means automatic: one crop at a time on the CPU (measured faster per crop
    than a batch of 4 with oneDNN), the whole batch on a GPU.
    """
    if fast.micro_batch > 0:
        return min(fast.micro_batch, crops)
    return 1 if device.type == "cpu" else crops


# A rough upper bound of the GPU memory one window needs at inference: the decoder keeps a few
# full-resolution maps of feature_size channels alive at once; 64 bytes per voxel and feature is
# 16 such maps in float32 (0.9 GB for a 96^3 window at feature 16). Only half the free memory is used.
_BYTES_PER_WINDOW_VOXEL_FEATURE = 64


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tile units for bfloat16 (Intel Xeon since Sapphire Rapids); Linux only."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:
        return False


def auto_sw_batch_size(requested: int, device: torch.device, roi: tuple[int, int, int], feature_size: int,
                       limit: int = 8) -> int:
    """Windows per forward pass: ``requested`` if > 0, else chosen for the device.

    CPU: 4 with AMX (its matrix units are fed better by 4 windows: 6% less time per UNETR-B
    window under bf16 on a 2-core Xeon with the channels-last norms, 18% without), else 1 (on a
    2-core Zen 5, 4 windows were 15-40% slower per window). GPU: as many as fit in half the free
    memory, up to ``limit``.
    """
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 4 if cpu_has_amx() else 1
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
    return dataclasses.replace(config, fast=fast, train=dataclasses.replace(config.train, amp=False),
                               infer=dataclasses.replace(config.infer, sw_batch_size=1, fast_invert=False))
