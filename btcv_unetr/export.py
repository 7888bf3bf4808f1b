"""``btcv-unetr export``: a trained model as TorchScript (for ``--saved_checkpoint torchscript``) or ONNX.

    btcv-unetr export --checkpoint runs/demo/model.pt --format torchscript --out unetr.pt

``--checkpoint`` may also be a TorchScript file (a released ``.pt``): its weights go into the UNETR
built from the flags, as for ``test.py --saved_checkpoint torchscript``, which turns it into ONNX.

The model takes ``(B, in_channels, roi_x, roi_y, roi_z)`` windows, as sliding-window inference feeds it.
Exported models are float32: a trace taken under bfloat16 autocast would keep its casts, and run
10-300x slower on the CPUs that have no bfloat16 instructions. The runtime that loads the file
chooses its own precision (``test.py --saved_checkpoint torchscript`` runs it as saved, in float32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .config import add_config_arguments, config_from_args
from .errors import UserError
from .files import atomic_write
from .infer import load_inference_model, with_weights_file


def export(model: torch.nn.Module, example: torch.Tensor, fmt: str, out: Path) -> None:
    model = model.eval()
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        atomic_write(out, lambda tmp: traced.save(str(tmp)))
        return
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx extra: pip install 'btcv-unetr[onnx]'") from None
    atomic_write(out, lambda tmp: torch.onnx.export(model, (example,), str(tmp), input_names=["image"],
                                                    output_names=["logits"], dynamic_axes={"image": {0: "batch"},
                                                                                           "logits": {0: "batch"}},
                                                    dynamo=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    parser.add_argument("--out", required=True, help="output file")
    add_config_arguments(parser, "export")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not config.train.checkpoint:
        raise UserError("export: --checkpoint FILE is required (a training checkpoint, a state dict or a TorchScript file)")
    path, out = Path(config.train.checkpoint), Path(args.out)
    if out.resolve() == path.resolve():
        raise UserError(f"export: --out {out} is the checkpoint being exported: choose another file name")
    if out.exists() and not config.infer.overwrite:
        raise UserError(f"export: {out} exists: pass --overwrite to replace it, or choose another --out")
    # A TorchScript file (the released .pt) gives its weights to the UNETR built from the flags: that is
    # how it becomes an ONNX model.
    model, config = load_inference_model(with_weights_file(config, path), torch.device("cpu"))
    example = torch.zeros(1, config.model.in_channels, *config.model.roi_size)
    export(model, example, args.format, out)
    print(f"wrote {args.format} model to {args.out} (precision fp32: exported models are float32 on every machine)")
    return 0
