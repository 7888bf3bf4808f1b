"""MONAI bundles: a model written as one (``btcv-unetr export --bundle DIR``), and a UNETR bundle read back.

    write_bundle       configs/metadata.json, configs/inference.json, models/model.pt, docs/README.md, atomically
    inference_config   the inference.json: MONAI's own transforms, sliding window, Invertd and SaveImaged
    bundle_metadata    the metadata.json: the keys the MONAI bundle specification calls mandatory, and more
    is_bundle          a folder in the model zoo's layout (configs/ and models/model.pt)
    read_bundle        a UNETR bundle's architecture, preprocessing and weights file, read as data

A written bundle runs with MONAI alone (``python -m monai.bundle run --config_file configs/inference.json``;
btcv_unetr is never imported): its masks are ``test.py``'s up to interpolation ties. The two invert the
preprocessing differently: MONAI's ``Invertd`` resamples the class probabilities back to the scan's grid
transform by transform, ``test.py`` in one pass of its own (``inference.inversion.probabilities_to_scan``); both
interpolate trilinearly and take the argmax on the scan's grid.

A bundle's configs are programs too (``$`` expressions are passed to ``eval``, ``_target_`` names any
callable): reading one here never runs them. Only plain values (and ``@`` references to plain values) are
taken from its ``network_def`` and preprocessing; anything else is refused in one line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import monai
import nibabel
import numpy as np
import torch

from .. import __version__
from ..config.schema import Config
from ..data.datalist import label_names
from ..errors import UserError
from .card import card_warning, model_card_lines

# The newest metadata schema model-zoo bundles name (vista3d among them), the one with MONAI 1.4+'s
# ``required_packages_version``; ``verify_metadata`` downloads it, or reads ``--filepath`` when that file exists.
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
# The keys the MONAI bundle specification calls mandatory in each tensor format.
MANDATORY_TENSOR_FORMAT = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                           "is_patch_data", "channel_def")
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md")
UNETR_PAPER = ("Hatamizadeh, A., et al. 'UNETR: Transformers for 3D Medical Image Segmentation.' WACV 2022. "
               "https://arxiv.org/abs/2103.10504")


def _preprocessing(config: Config) -> list[dict[str, Any]]:
    """MONAI transforms (by name) doing what ``transforms.preprocessing`` does for inference, in its order."""
    data = config.data
    above = f"(x > {data.a_min!r})"
    body = f"$lambda x: {above} if bool({above}.any()) else torch.ones_like(x, dtype=torch.bool)"
    load = [{"_target_": "LoadImaged", "keys": "@image_key", "ensure_channel_first": True, "image_only": True},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": data.axcodes,
             "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}]
    resample = {"_target_": "Spacingd", "keys": "@image_key", "pixdim": list(data.pixdim), "mode": "bilinear"}
    window = {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": data.a_min, "a_max": data.a_max,
              "b_min": data.b_min, "b_max": data.b_max, "clip": True}
    if config.data.crop_before_resampling:
        # The body (HU above a_min; the whole scan where nothing is) is cropped first and only it resampled.
        crop = {"_target_": "CropForegroundd", "keys": "@image_key", "source_key": "@image_key", "select_fn": body,
                "allow_smaller": True}
        return [*load, crop, resample, window]
    crop = {"_target_": "CropForegroundd", "keys": "@image_key", "source_key": "@image_key", "allow_smaller": True}
    return [*load, resample, window, crop]


def network_def(config: Config) -> dict[str, Any]:
    """The ``network_def`` of MONAI's UNETR that ``model.build_model`` builds from ``config.model``."""
    model = config.model
    if model.num_layers != 12:
        raise UserError(f"--bundle: a ViT of {model.num_layers} blocks is not MONAI's UNETR (it has 12): such a "
                        "model cannot run from a bundle with MONAI alone; export it with --format torchscript")
    if model.spatial_dims != 3:
        raise UserError("--bundle: 2D models are not written as bundles yet (their pictures are resized, not "
                        "resampled); export them with --format torchscript or onnx")
    return {"_target_": "UNETR", "spatial_dims": 3, "in_channels": model.in_channels,
            "out_channels": model.out_channels, "img_size": list(model.roi_size), "feature_size": model.feature_size,
            "hidden_size": model.hidden_size, "mlp_dim": model.mlp_dim, "num_heads": model.num_heads,
            "proj_type": model.pos_embed, "norm_name": model.norm_name, "conv_block": model.conv_block,
            "res_block": model.res_block, "dropout_rate": model.dropout_rate}


def inference_config(config: Config) -> dict[str, Any]:
    """configs/inference.json: segment every NIfTI file of ``dataset_dir`` into ``output_dir``/CASE_seg.nii.gz.

    The loop is plain expressions (``run``), so no training framework (ignite) is needed; windows are
    blended as ``test.py`` blends them (``infer_overlap``, ``mode``), in float32.
    """
    infer = config.infer
    # Default arguments carry the references into the lambda: MONAI evaluates "$" strings with eval().
    predict = ("$lambda item, network=@network, inferer=@inferer, device=@device: "
               "dict(item, pred=inferer(item[@image_key][None].to(device), network)[0].cpu())")
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "image_key": "image",
        "dataset_dir": "/workspace/data/btcv/imagesTs",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
                    "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(config),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(config)},
        "dataset": {"_target_": "Dataset", "data": "$[{@image_key: path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(config.model.roi_size),
                    "sw_batch_size": 2, "overlap": infer.infer_overlap, "mode": infer.mode},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "separate_folder": False,
             "resample": False, "print_log": True}]},
        "predict": predict,
        "initialize": ["$torch.set_grad_enabled(False)",
                       "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
                       "$@network.eval()"],
        "run": ["$[@postprocessing(@predict(item)) for item in @dataset]"],
    }


def _class_names(config: Config, card: Mapping[str, Any] | None) -> list[str]:
    classes = config.model.out_channels
    names = list((card or {}).get("classes") or [])
    if len(names) == classes:
        return [str(name) for name in names]
    return ["background", *label_names(None, classes)]


def _tensor_format(kind: str, fmt: str, channels: int, roi: list[int], value_range: list[float],
                   channel_def: dict[str, str]) -> dict[str, Any]:
    return {"type": "image", "format": fmt, "modality": "CT", "num_channels": channels, "spatial_shape": roi,
            "dtype": "float32", "value_range": value_range, "is_patch_data": True, "channel_def": channel_def,
            "description": kind}


def bundle_metadata(config: Config, card: Mapping[str, Any] | None) -> dict[str, Any]:
    """configs/metadata.json; ``card`` (the checkpoint's model card, if any) gives the data and validation Dice."""
    names = _class_names(config, card)
    roi, data = list(config.model.roi_size), config.data
    warning = card_warning(card)
    mean_dice = (card or {}).get("validation_mean_dice")
    trained_on = (card or {}).get("data_name") or (card or {}).get("datalist") or "unknown data"
    return {
        "schema": METADATA_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by btcv-unetr {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "einops": einops.__version__},
        "name": f"UNETR {len(names) - 1}-class CT segmentation",
        "task": "Multi-organ segmentation of abdominal CT",
        "description": (f"UNETR (MONAI) segmenting {', '.join(names[1:])} in CT scans resampled to "
                        f"{' x '.join(f'{s:g}' for s in data.pixdim)} mm; masks in each scan's own geometry."),
        "authors": f"exported by btcv-unetr {__version__}; the weights' authors are those of the training run",
        "copyright": "the owner of the weights' training run",
        "data_source": str(trained_on),
        "data_type": "nibabel",
        "image_classes": (f"single channel CT in HU, windowed [{data.a_min:g}, {data.a_max:g}] to "
                          f"[{data.b_min:g}, {data.b_max:g}]"),
        "label_classes": "single channel labels: " + ", ".join(f"{i} {name}" for i, name in enumerate(names)),
        "pred_classes": f"{len(names)} channels of class probabilities (softmax), argmax to labels",
        "eval_metrics": {"mean_dice": mean_dice} if mean_dice is not None else {},
        "intended_use": warning or "research; not for clinical use",
        "references": [UNETR_PAPER],
        "network_data_format": {
            "inputs": {"image": _tensor_format("windowed CT", "hounsfield", config.model.in_channels, roi,
                                               [data.b_min, data.b_max], {"0": "image"})},
            "outputs": {"pred": _tensor_format("class logits", "labels", len(names), roi, [],
                                               {str(i): name for i, name in enumerate(names)})},
        },
    }


def _readme(config: Config, card: Mapping[str, Any] | None) -> str:
    lines = model_card_lines(card)
    return "\n".join([
        f"# {bundle_metadata(config, card)['name']}", "",
        "A MONAI bundle written by `btcv-unetr export --bundle`. It runs with MONAI alone (and `fire`, which",
        "`python -m monai.bundle` needs):", "",
        "```bash",
        "cd THIS_FOLDER",
        "python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/scans "
        "--output_dir /data/masks",
        "```", "",
        "Every `*.nii.gz` / `*.nii` of `dataset_dir` becomes `CASE_seg.nii.gz` (uint8 labels) in `output_dir`,",
        "in the scan's own geometry. Windows are blended as `btcv-unetr infer` blends them; the masks agree",
        "with its masks up to interpolation ties.", "",
        "## Model card", "", "```", *lines, "```", "",
        "## Preprocessing", "",
        f"RAS orientation, the body (HU above {config.data.a_min:g}) cropped, resampling to "
        f"{' x '.join(f'{s:g}' for s in config.data.pixdim)} mm, intensities windowed "
        f"[{config.data.a_min:g}, {config.data.a_max:g}] HU to [{config.data.b_min:g}, {config.data.b_max:g}].",
        f"Sliding windows of {' x '.join(map(str, config.model.roi_size))} voxels, overlap "
        f"{config.infer.infer_overlap:g}, {config.infer.mode} blending.", "",
        "## Reference", "", UNETR_PAPER, ""])


def write_bundle(folder: Path, config: Config, state_dict: Mapping[str, torch.Tensor],
                 card: Mapping[str, Any] | None, overwrite: bool) -> None:
    """The bundle in ``folder``, written in a temporary folder beside it and renamed: a failed export leaves
    no half bundle. ``models/model.pt`` is the bare state dict of MONAI's UNETR (the zoo's layout).

    ``overwrite`` replaces only a folder that is a bundle (it has configs/metadata.json), never another one.
    """
    folder = Path(folder)
    check_bundle_target(folder, overwrite)
    inference = inference_config(config)  # refuses what a bundle cannot hold before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_folder_beside(folder, "tmpbundle")
    try:
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir()
        (staging / "configs" / "metadata.json").write_text(json.dumps(bundle_metadata(config, card), indent=4) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        torch.save({key: value.detach().cpu().contiguous() for key, value in state_dict.items()},
                   staging / "models" / "model.pt")
        (staging / "docs" / "README.md").write_text(_readme(config, card))
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_bundle_target(folder: Path, overwrite: bool) -> None:
    """``folder`` may be written: it does not exist, or ``overwrite`` and it is a bundle; else one line."""
    if not folder.exists():
        return
    if not overwrite:
        raise UserError(f"export: {folder} exists: pass --overwrite to replace it, or choose another --bundle")
    if not (folder / "configs" / "metadata.json").is_file():
        raise UserError(f"export: {folder} exists and is not a MONAI bundle (no configs/metadata.json): "
                        "it is never replaced; choose another --bundle")


def _new_folder_beside(folder: Path, kind: str) -> Path:
    """A new empty folder ``.NAME.XXXXXXXX.KIND`` beside ``folder``, with the umask's permissions (a bundle is
    shared as any folder is, unlike ``mkdtemp``'s 0700)."""
    while True:
        path = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.{kind}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename ``staging`` onto ``folder``; an existing ``folder`` is moved aside first and removed after."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = _new_folder_beside(folder, "tmpold")
    os.replace(folder, old / folder.name)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---- reading a UNETR bundle (the model zoo's layout) ------------------------------------------------

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
UNETR_TARGETS = ("UNETR", "monai.networks.nets.UNETR", "monai.networks.nets.unetr.UNETR")
# network_def argument -> ModelConfig field; ``pos_embed`` is the name MONAI before 1.3 gave ``proj_type``.
UNETR_ARGUMENTS = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "out_channels": "out_channels",
                   "feature_size": "feature_size", "hidden_size": "hidden_size", "mlp_dim": "mlp_dim",
                   "num_heads": "num_heads", "proj_type": "pos_embed", "pos_embed": "pos_embed",
                   "norm_name": "norm_name", "conv_block": "conv_block", "res_block": "res_block",
                   "dropout_rate": "dropout_rate"}
# Arguments that change nothing in the weights' meaning at their default (and save_attn never).
NEUTRAL_ARGUMENTS = {"qkv_bias": False, "save_attn": None}


@dataclass
class BundleModel:
    """What a UNETR bundle says: its weights file, and config values (``section -> {key: value}``) for the
    architecture (``model``), the preprocessing (``data``) and the blending of windows (``infer``) it found."""

    folder: Path
    weights: Path
    config_file: Path
    values: dict[str, dict[str, Any]]


def is_bundle(path: str | Path) -> bool:
    """A folder in the model zoo's layout: ``configs/`` and ``models/model.pt``."""
    path = Path(path)
    return path.is_dir() and (path / "configs").is_dir() and (path / "models" / "model.pt").is_file()


def _bundle_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The first of the bundle's inference/train configs, parsed as data (JSON or YAML; nothing evaluated)."""
    from monai.bundle import ConfigParser
    for name in CONFIG_NAMES:
        path = folder / "configs" / name
        if path.is_file():
            try:
                content = ConfigParser.load_config_file(path)
            except (ValueError, OSError) as exc:  # json and yaml errors are ValueErrors
                raise UserError(f"{path}: not a readable bundle config ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            if not isinstance(content, dict):
                raise UserError(f"{path}: a bundle config is a mapping of ids; this file is not")
            return path, content
    raise UserError(f"{folder}: a MONAI bundle needs configs/inference.json (or train.json) with its network_def; "
                    "none found")


def _plain(value: Any, content: Mapping[str, Any], where: str, depth: int = 0) -> Any:
    """``value`` with ``@id`` references replaced by the values they name; a ``$`` expression or a ``%`` macro
    is refused (reading a bundle never runs its code)."""
    if isinstance(value, str) and value.startswith("@") and depth < 8:
        target: Any = content
        for part in value[1:].replace("#", "::").split("::"):
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise UserError(f"{where}: the reference {value} names nothing in the bundle's config")
        return _plain(target, content, where, depth + 1)
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise UserError(f"{where} is the expression {value!r}: btcv-unetr reads bundles as data and runs none of "
                        "their code; replace it by its value")
    if isinstance(value, list):
        return [_plain(item, content, where, depth) for item in value]
    return value


def _unetr_defaults() -> dict[str, Any]:
    """MONAI's own defaults for the arguments a network_def leaves out (the installed MONAI runs the bundle)."""
    import inspect

    from monai.networks.nets import UNETR
    parameters = inspect.signature(UNETR.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _model_values(network: Mapping[str, Any], content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig values from a UNETR ``network_def``, MONAI's defaults for what it leaves out."""
    target = _plain(network.get("_target_"), content, f"{where}::_target_")
    if target not in UNETR_TARGETS:
        raise UserError(f"{where} is {target!r}, not MONAI's UNETR: btcv-unetr loads UNETR bundles only")
    arguments = {**_unetr_defaults(), **{key: _plain(value, content, f"{where}::{key}")
                                         for key, value in network.items() if key != "_target_"}}
    values: dict[str, Any] = {"num_layers": 12}
    for key, value in arguments.items():
        if key in UNETR_ARGUMENTS:
            values[UNETR_ARGUMENTS[key]] = value
        elif key == "img_size":
            continue
        elif key in NEUTRAL_ARGUMENTS:
            if NEUTRAL_ARGUMENTS[key] is not None and value != NEUTRAL_ARGUMENTS[key]:
                raise UserError(f"{where}::{key} is {value!r}: btcv-unetr's UNETR has {key} "
                                f"{NEUTRAL_ARGUMENTS[key]!r} only")
        else:
            raise UserError(f"{where}::{key}: an argument MONAI's UNETR does not take")
    size = arguments.get("img_size")
    dims = int(values.get("spatial_dims", 3))
    sizes = [size] * dims if isinstance(size, int) else list(size or [])
    if len(sizes) != dims or dims != 3:
        raise UserError(f"{where}::img_size {size!r}: btcv-unetr loads 3D UNETR bundles (three sizes)")
    values.update(roi_x=sizes[0], roi_y=sizes[1], roi_z=sizes[2])
    return values


def _preprocessing_values(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Orientation, spacing and intensity window from the bundle's ``preprocessing`` transforms, where they are
    plain values, and whether the body is cropped before resampling, where it names both steps; the rest of
    ``preprocessing`` is this project's own chain (``transforms.preprocessing``)."""
    transforms = (content.get("preprocessing") or {}).get("transforms") if isinstance(
        content.get("preprocessing"), Mapping) else None
    values: dict[str, Any] = {}
    order: list[str] = []
    for index, step in enumerate(transforms if isinstance(transforms, list) else []):
        if not isinstance(step, Mapping):
            continue
        name = str(step.get("_target_", "")).rsplit(".", 1)[-1]
        order.append(name)
        at = f"{where}::preprocessing::transforms::{index}"
        if name == "Spacingd" and "pixdim" in step:
            pixdim = _plain(step["pixdim"], content, f"{at}::pixdim")
            values.update(zip(("space_x", "space_y", "space_z"), pixdim if isinstance(pixdim, list) else [pixdim] * 3))
        elif name == "ScaleIntensityRanged":
            values.update({key: _plain(step[key], content, f"{at}::{key}")
                           for key in ("a_min", "a_max", "b_min", "b_max") if key in step})
        elif name == "Orientationd" and "axcodes" in step:
            values["axcodes"] = _plain(step["axcodes"], content, f"{at}::axcodes")
    if "Spacingd" in order and "CropForegroundd" in order:  # the order a bundle written by export states
        values["crop_before_resampling"] = order.index("CropForegroundd") < order.index("Spacingd")
    return values


def _blending_values(content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The blending of overlapping windows (``mode``) the bundle's sliding-window ``inferer`` states: MONAI's
    default, constant, where it names none; nothing for another inferer, or a value that is not plain."""
    inferer = content.get("inferer")
    if not isinstance(inferer, Mapping) or \
            str(inferer.get("_target_", "")).rsplit(".", 1)[-1] != "SlidingWindowInferer":
        return {}
    try:
        mode = _plain(inferer.get("mode", "constant"), content, f"{where}::inferer::mode")
    except UserError:  # an expression: the blending is only a default here, not worth refusing the bundle for
        return {}
    return {"mode": mode} if mode in ("gaussian", "constant") else {}


def read_bundle(folder: str | Path) -> BundleModel:
    """A UNETR bundle's weights file and the architecture and preprocessing its config states, or one line
    saying why not (not a bundle, not a UNETR, a value that is code)."""
    folder = Path(folder)
    if not is_bundle(folder):
        raise UserError(f"{folder}: not a MONAI bundle (it needs configs/ and models/model.pt)")
    path, content = _bundle_config(folder)
    where = f"{path.relative_to(folder)}::network_def"
    network = content.get("network_def")
    if not isinstance(network, Mapping):
        raise UserError(f"{path}: no network_def mapping: the model zoo's bundles define their network there")
    values = {"model": _model_values(network, content, f"{folder.name}/{where}"),
              "data": _preprocessing_values(content, f"{folder.name}/{path.relative_to(folder)}"),
              "infer": _blending_values(content, f"{folder.name}/{path.relative_to(folder)}")}
    return BundleModel(folder, folder / "models" / "model.pt", path, values)
