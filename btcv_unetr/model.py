"""UNETR: construction, the layout and attention switches of the fast path, and weight loading
(our checkpoints, bare state dicts, old MONAI layouts, TorchScript).

    build_model          MONAI's UNETR from the config
    prepare_model        the model in the memory format and attention kernel chosen for this device and precision
    memory_format_for    channels-last or not, per CPU class, precision and stage
    sdpa_for             fused attention or MONAI's own, per CPU class and precision

Checkpoints and state dicts are read as data only (``checkpoint.load_file``). TorchScript files are
programs: ``torch.jit.load`` runs code from the file, so they are loaded only where asked for
(``--resume_jit``, ``--saved_checkpoint torchscript``), with a warning, and only their weights are
used, in this project's own UNETR.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import UNETR, ViT
from torch import nn

from .checkpoint import load_checkpoint
from .config import FastConfig, ModelConfig
from .errors import UserError

# Keys of UNETR state dicts written by MONAI 0.6-0.8 (the released BTCV weights) that the current
# UNETR no longer has. None of them ever affected the output: the class token was unused without
# classification, and conv3 was a residual projection that those blocks never applied.
LEGACY_KEYS = re.compile(r"^(vit\.patch_embedding\.cls_token|encoder\d\.blocks\.\d+\.1\.conv3\.conv\.weight)$")
# Built by MONAI's TransformerBlock but only used with cross-attention, which UNETR never enables.
UNUSED_PARAMETERS = re.compile(r"\.norm_cross_attn\.")
WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")


class DeeperUNETR(UNETR):
    """MONAI's UNETR with a ViT of ``num_layers`` blocks (MONAI fixes 12, ViT-L has 24).

    The decoder's skip connections come from the blocks a quarter, half and three quarters of the way
    down, as blocks 3, 6 and 9 of 12 do in MONAI's UNETR; the state-dict keys are MONAI's.
    """

    def __init__(self, num_layers: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        old = self.vit
        self.vit = ViT(in_channels=kwargs["in_channels"], img_size=kwargs["img_size"], patch_size=self.patch_size,
                       hidden_size=kwargs["hidden_size"], mlp_dim=kwargs["mlp_dim"], num_layers=num_layers,
                       num_heads=kwargs["num_heads"], proj_type=kwargs["proj_type"], classification=False,
                       dropout_rate=kwargs["dropout_rate"], spatial_dims=kwargs["spatial_dims"])
        del old

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.vit(x_in)
        quarter = self.num_layers // 4
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(self.proj_feat(hidden[quarter]))
        enc3 = self.encoder3(self.proj_feat(hidden[2 * quarter]))
        enc4 = self.encoder4(self.proj_feat(hidden[3 * quarter]))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


def build_model(config: ModelConfig) -> UNETR:
    """MONAI UNETR from the config; parameters that never receive a gradient are frozen.

    Input ``(B, in_channels, roi_x, roi_y, roi_z)``; output logits ``(B, out_channels, roi_x, roi_y, roi_z)``
    (in 2D without ``roi_z``).
    Freezing the unused LayerNorms lets DDP run without ``find_unused_parameters``.
    """
    arguments = dict(spatial_dims=config.spatial_dims, in_channels=config.in_channels,
                     out_channels=config.out_channels, img_size=config.roi_size, feature_size=config.feature_size,
                     hidden_size=config.hidden_size, mlp_dim=config.mlp_dim, num_heads=config.num_heads,
                     proj_type=config.pos_embed, norm_name=config.norm_name, conv_block=config.conv_block,
                     res_block=config.res_block, dropout_rate=config.dropout_rate)
    model = UNETR(**arguments) if config.num_layers == 12 else DeeperUNETR(config.num_layers, **arguments)
    for name, parameter in model.named_parameters():
        if UNUSED_PARAMETERS.search(name):
            parameter.requires_grad_(False)
    return model


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
                      spatial_dims: int = 3) -> torch.memory_format:
    """The memory format a model runs in: ``fast.channels_last`` when set, else chosen per CPU class.

    Automatic: channels-last 3D on the CPU for inference (oneDNN keeps channels-last outputs as they
    are instead of reordering each one), and for training only in float32: there the 1x1x1 and
    decoder convolutions' backward passes are faster channels-last, while under bfloat16 autocast
    the channels-last step was 1.5-1.7x slower on a Zen 4 (README, fast-path switches per CPU class).
    Never on GPUs and for 2D models (not measured there).
    """
    if device.type != "cpu" or spatial_dims != 3:
        return torch.contiguous_format
    wanted = fast.channels_last if fast.channels_last is not None else (not training or precision == "fp32")
    return torch.channels_last_3d if wanted else torch.contiguous_format


def to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` (changed in place) in ``memory_format``, with :class:`ChannelsLastInstanceNorm3d` when channels-last."""
    if memory_format != torch.channels_last_3d:
        return model
    channels_last_norms(model)
    return model.to(memory_format=memory_format)


def prepare_model(model: nn.Module, fast: FastConfig, device: torch.device, precision: str,
                  training: bool) -> tuple[nn.Module, torch.memory_format]:
    """``model`` (changed in place) in its memory format with its attention kernel, and that format.

    Inputs must be given in the returned format. ``torch.compile`` is left to :func:`compile_if_asked`,
    which training applies after the DDP wrapper.
    """
    spatial_dims = 3 if any(isinstance(m, nn.Conv3d) for m in model.modules()) else 2
    memory_format = memory_format_for(fast, device, precision, training, spatial_dims)
    model = to_memory_format(model, memory_format)
    use_sdpa(model, sdpa_for(fast, device, precision))
    return model, memory_format


def compile_if_asked(model: nn.Module, fast: FastConfig) -> nn.Module:
    """``torch.compile(model)`` with ``--compile`` (off by default: on the 2-core CPU slower than eager
    with the channels-last norms, after 28 s of compiling), else ``model``."""
    return torch.compile(model) if fast.compile else model


def model_size(config: ModelConfig) -> tuple[int, int]:
    """Parameters and FLOPs of one forward pass of a batch of one ROI-sized input (a multiply-add is 2).

    Counted on PyTorch's meta device: no memory, no arithmetic, a fraction of a second even for ViT-L.
    """
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(1, config.in_channels, *config.roi_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def describe_model_size(config: ModelConfig) -> str:
    """``model: 92,802,478 parameters, 146.4 GFLOPs per 96x96x96 window`` (one forward pass, batch 1)."""
    parameters, flops = model_size(config)
    window = "x".join(str(n) for n in config.roi_size)
    return f"model: {parameters:,} parameters, {flops / 1e9:.1f} GFLOPs per {window} window"


def extract_state_dict(content: Any, source: str) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint dict or a bare state dict, wrapper prefixes removed."""
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise UserError(f"{source}: neither a state dict nor a checkpoint with a 'state_dict' entry")
    state = {}
    for key, value in content.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def adapt_legacy_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an old-MONAI UNETR state dict onto the current layout.

    Drops the legacy keys the model lacks and keeps the model's own values for its unused
    parameters when the file lacks them. Any other difference is left for the strict load to report.
    """
    own = model.state_dict()
    adapted = {k: v for k, v in state.items() if k in own or not LEGACY_KEYS.match(k)}
    for key, value in own.items():
        if key not in adapted and UNUSED_PARAMETERS.search(key):
            adapted[key] = value
    return adapted


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load; a mismatch names the missing, unexpected and mis-shaped keys (never a silent partial load)."""
    state = adapt_legacy_keys(dict(state), model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {title}: {shown}")
        raise UserError(f"{source}: weights do not match the model built from the flags "
                        f"(check --feature_size/--hidden_size/--num_heads/--roi_*/--out_channels); {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load weights from our checkpoint, a bare state dict (any MONAI version) into ``model``."""
    load_weights(model, extract_state_dict(load_checkpoint(path), str(path)), str(path))


def load_torchscript(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript file (e.g. the released ``UNETR_model_best_acc.pt``), with one-line errors.

    Loading TorchScript runs code stored in the file: a warning says so once per load.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript file not found: {path}")
    print(f"warning: {path} is TorchScript, which is a program: loading it runs code from the file; "
          "load only files you trust", file=sys.stderr)
    try:
        return torch.jit.load(str(path), map_location=device)
    except RuntimeError as exc:
        raise UserError(f"{path}: not a TorchScript file ({str(exc).strip().splitlines()[0]})") from None


def load_torchscript_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of a TorchScript UNETR into ``model`` (which keeps AMP, DDP and eager debugging).

    The scripted module itself never runs: a file that is not a UNETR of ``model``'s configuration
    fails here with the names of the mismatching weights.
    """
    load_weights(model, extract_state_dict(load_torchscript(path).state_dict(), str(path)), str(path))
