"""``btcv-unetr export``: a trained model as TorchScript (for ``--saved_checkpoint torchscript``), ONNX, or a
MONAI bundle that runs with MONAI alone (``bundle.write_bundle``).

    btcv-unetr export --checkpoint runs/demo/model.pt --format torchscript --out unetr.pt
    btcv-unetr export --checkpoint runs/demo/model.pt --bundle unetr_bundle
    btcv-unetr export --pretrained unetr_btcv --bundle unetr_btcv_bundle

Every network of the registry (``--model_name``) exports to each format (docs/export.md): TorchScript by tracing
(:data:`TORCHSCRIPT_BY`), ONNX where :data:`ONNX_PROBLEMS` says it works, a bundle as MONAI's own class.

``--checkpoint`` may also be a TorchScript file (a released ``.pt``): its weights go into the network it records
(our export), else into the UNETR built from the flags, as for ``test.py --saved_checkpoint torchscript``, which
turns it into ONNX.

The model takes ``(B, in_channels, roi_x, roi_y, roi_z)`` windows, as sliding-window inference feeds it.
Exported models are float32: a trace taken under bfloat16 autocast would keep its casts, and run
10-300x slower on the CPUs that have no bfloat16 instructions. The runtime that loads the file
chooses its own precision (``test.py --saved_checkpoint torchscript`` runs it as saved, in float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import Config, ModelConfig
from ..errors import UserError
from ..files import atomic_write
from ..io.bundle import check_bundle_target, write_bundle
from ..io.torchscript import ARCHITECTURE_FILE, RECORDED_SPACING
from ..model.architectures import ARCHITECTURES
from ..model.pretrained import resolve_pretrained
from .loader import load_model, with_weights_file

# The config flags of ``export``: the model, the weights to export, and the window settings a bundle records.
EXPORT_FLAGS: CommandFlags = {"model": None, "train": ("checkpoint", "pretrained"), "infer": ("infer_overlap", "mode"),
                              "general": None}


# How each network becomes TorchScript: all are traced (the ops of one eval forward on an ROI-sized window, the batch
# axis left free), as sliding-window inference only ever feeds ROI-sized windows. torch.jit.script would keep the
# Python's branches, but fails on MONAI 1.6's Swin UNETR (keyword-only arguments in its blocks) and MedNeXt; UNETR,
# SegResNet and DynUNet script too. torch.jit.trace's check_trace is off: it traces a second time on the same
# window (4x the time: 80 s for a tiny Swin UNETR on 2 cores) to catch nondeterminism an eval forward does not have.
TORCHSCRIPT_BY: dict[str, str] = {name: "trace" for name in ARCHITECTURES}

# ONNX (torch.onnx's TorchScript-based exporter, dynamo=False): None where the network exports and onnxruntime's
# logits match PyTorch's within 1e-4 (tests/test_export*.py; Swin UNETR measured by hand with torch 2.13, MONAI
# 1.6.1: max difference 1.3e-5), else why it does not. A network listed None whose export still fails (another
# torch) is refused in one line naming the formats that work.
ONNX_PROBLEMS: dict[str, str | None] = {"unetr": None, "swin_unetr": None, "segresnet": None, "dynunet": None,
                                        "mednext": None}
WORKING_FORMATS = "use --format torchscript or --bundle"


def export(model: torch.nn.Module, example: torch.Tensor, fmt: str, out: Path,
           architecture: ModelConfig | None = None, spacing: tuple[float, ...] | None = None) -> None:
    """``model`` (any network of the registry) traced on ``example`` (TorchScript) or as ONNX into ``out``;
    TorchScript files also record ``architecture`` and the grid ``spacing`` (mm per voxel; DynUNet is planned
    from it) as data, so that loading them builds the network a trace does not name, and checks a UNETR's heads
    and ROI."""
    model = model.eval()
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        record = {**dataclasses.asdict(architecture), RECORDED_SPACING: list(spacing) if spacing else None} \
            if architecture else None
        extra = {ARCHITECTURE_FILE: json.dumps(record)} if record else {}
        atomic_write(out, lambda tmp: traced.save(str(tmp), _extra_files=extra))
        return
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx extra: pip install 'btcv-unetr[onnx]'") from None
    name = architecture.model_name if architecture else "unetr"
    title = ARCHITECTURES[name].title
    if ONNX_PROBLEMS[name]:
        raise UserError(f"export: ONNX export of {title} fails ({ONNX_PROBLEMS[name]}): {WORKING_FORMATS}")

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except (torch.onnx.errors.OnnxExporterError, torch.jit.Error) as exc:  # the exporter's own failures only
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
            raise UserError(f"export: ONNX export of {title} fails in torch {torch.__version__}'s exporter "
                            f"({first}): {WORKING_FORMATS}") from None

    atomic_write(out, write)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="the format of --out")
    parser.add_argument("--out", default=None, help="output file (TorchScript or ONNX)")
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="write a MONAI bundle folder instead (configs/, models/model.pt, docs/), which "
                             "python -m monai.bundle run runs with MONAI alone")
    add_config_arguments(parser, EXPORT_FLAGS)


def weights_path(config: Config) -> Path:
    """The file to export: ``--checkpoint``, or the one ``--pretrained`` was resolved to."""
    if config.train.checkpoint and config.train.pretrained:
        raise UserError("export: --checkpoint and --pretrained exclude each other: give one model to export")
    if config.train.pretrained:
        return Path(config.train.pretrained_dir) / config.train.pretrained_model_name
    if not config.train.checkpoint:
        raise UserError("export: --checkpoint FILE is required (a training checkpoint, a state dict or a TorchScript "
                        "file), or --pretrained NAME")
    return Path(config.train.checkpoint)


def export_bundle(config: Config, path: Path, folder: Path) -> None:
    """The model of ``path`` as a MONAI bundle in ``folder`` (its stored architecture and preprocessing)."""
    check_bundle_target(folder, config.general.overwrite)
    loaded = load_model(with_weights_file(config, path), torch.device("cpu"))
    write_bundle(folder, loaded.config, loaded.model.state_dict(), loaded.card, config.general.overwrite)
    print(f"wrote a MONAI bundle to {folder}; run it with: python -m monai.bundle run --config_file "
          f"{folder / 'configs' / 'inference.json'} --bundle_root {folder} --dataset_dir SCANS --output_dir MASKS")


def run(args: argparse.Namespace) -> int:
    if (args.out is None) == (args.bundle is None):
        raise UserError("export: give --out FILE (with --format) or --bundle DIR, one of them")
    config = config_from_args(args)
    if config.train.checkpoint and config.train.pretrained:
        weights_path(config)  # refuses the pair before anything is downloaded
    config = resolve_pretrained(config, "export")
    path = weights_path(config)
    if args.bundle is not None:
        export_bundle(config, path, Path(args.bundle))
        return 0
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise UserError(f"export: --out {out} is the checkpoint being exported: choose another file name")
    if out.is_dir():  # even with --overwrite: a folder is never replaced by one file
        raise UserError(f"export: --out {out} is a folder, and --format {args.format} writes one file: give a file "
                        f"name (such as {out / ('unetr.onnx' if args.format == 'onnx' else 'unetr.pt')}), or use "
                        "--bundle DIR for a bundle folder")
    if out.exists() and not config.general.overwrite:
        raise UserError(f"export: {out} exists: pass --overwrite to replace it, or choose another --out")
    # A TorchScript file gives its weights to the network it records, else (the released .pt) to the UNETR built
    # from the flags: that is how it becomes an ONNX model.
    loaded = load_model(with_weights_file(config, path), torch.device("cpu"))
    model, config = loaded.model, loaded.config
    example = torch.zeros(1, config.model.in_channels, *config.model.roi_size)
    export(model, example, args.format, out, config.model, config.data.pixdim)
    print(f"wrote {args.format} model to {args.out} (precision fp32: exported models are float32 on every machine)")
    return 0
