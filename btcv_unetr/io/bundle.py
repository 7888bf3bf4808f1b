"""MONAI bundles: a model of any network written as one (``btcv-unetr export --bundle DIR``), and a bundle read back.

    write_bundle       configs/metadata.json, configs/inference.json, models/model.pt, docs/README.md, atomically
    inference_config   the inference.json: MONAI's own transforms, sliding window, Invertd and SaveImaged
    bundle_metadata    the metadata.json: the keys the MONAI bundle specification calls mandatory, and more
    is_bundle          a folder in the model zoo's layout (configs/ and models/model.pt)
    network_def        the network_def of each network: MONAI's class and its arguments (DynUNet's plan written out)
    read_bundle        a bundle's network (model_name and settings), preprocessing and weights file, read as data

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

import dataclasses
import enum
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
from ..config.networks import (
    MEDNEXT_COMMON,
    MEDNEXT_HEADS,
    MEDNEXT_SIZES,
    SEGRESNET_DS_NORM,
    TITLES,
    network_definition,
)
from ..config.schema import Config, ModelConfig
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
# Each network's paper, for the bundle's metadata and README.
PAPERS = {"unetr": UNETR_PAPER,
          "swin_unetr": "Hatamizadeh, A., et al. 'Swin UNETR: Swin Transformers for Semantic Segmentation of Brain "
                        "Tumors in MRI Images.' BrainLes 2021. https://arxiv.org/abs/2201.01266",
          "segresnet": "Myronenko, A. '3D MRI brain tumor segmentation using autoencoder regularization.' BrainLes "
                       "2018. https://arxiv.org/abs/1810.11654",
          "dynunet": "Isensee, F., et al. 'nnU-Net: a self-configuring method for deep learning-based biomedical image "
                     "segmentation.' Nature Methods 18, 2021. https://doi.org/10.1038/s41592-020-01008-z",
          "mednext": "Roy, S., et al. 'MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image "
                     "Segmentation.' MICCAI 2023. https://arxiv.org/abs/2303.09975"}


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
    """The ``network_def`` of the MONAI class that ``model.build_model`` builds from ``config.model``: its name
    (``_target_``) and every argument the build gives it, from ``config/networks.py``;
    :func:`check_network_def` proves it builds the same weights."""
    model = config.model
    if model.spatial_dims != 3:
        raise UserError("--bundle: 2D models are not written as bundles yet (their pictures are resized, not "
                        "resampled); export them with --format torchscript or onnx")
    if model.model_name == "unetr" and model.num_layers != 12:
        raise UserError(f"--bundle: a ViT of {model.num_layers} blocks is not MONAI's UNETR (it has 12): such a "
                        "model cannot run from a bundle with MONAI alone; export it with --format torchscript")
    class_name, arguments = network_definition(model, config.data.pixdim)
    return {"_target_": class_name, **arguments}


def _plain_list(values: Any) -> Any:
    """Tuples (and tensors' shapes) as lists, recursively: JSON's form of a network argument."""
    return [_plain_list(v) for v in values] if isinstance(values, (list, tuple)) else values


def check_network_def(definition: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """MONAI's class built from ``definition`` takes ``state_dict`` strictly, or one line: the bundle would not run
    with MONAI alone."""
    from monai.networks import nets
    arguments = {key: value for key, value in definition.items() if key != "_target_"}
    own = getattr(nets, definition["_target_"])(**arguments).state_dict()
    differ = sorted(set(own) ^ set(state_dict)) + sorted(k for k in own if k in state_dict
                                                         and tuple(own[k].shape) != tuple(state_dict[k].shape))
    if differ:
        raise UserError(f"--bundle: MONAI's {definition['_target_']} built from the bundle's network_def does not "
                        f"take this model's weights ({len(differ)} keys differ, e.g. {differ[0]}): export it with "
                        "--format torchscript")


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


def _title(config: Config) -> str:
    return TITLES[config.model.model_name]


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
        "name": f"{_title(config)} {len(names) - 1}-class CT segmentation",
        "task": "Multi-organ segmentation of abdominal CT",
        "description": (f"{_title(config)} (MONAI) segmenting {', '.join(names[1:])} in CT scans resampled to "
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
        "references": [PAPERS[config.model.model_name]],
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
        "## Reference", "", PAPERS[config.model.model_name], ""])


def write_bundle(folder: Path, config: Config, state_dict: Mapping[str, torch.Tensor],
                 card: Mapping[str, Any] | None, overwrite: bool) -> None:
    """The bundle in ``folder``, written in a temporary folder beside it and renamed: a failed export leaves
    no half bundle. ``models/model.pt`` is the bare state dict of MONAI's network (the zoo's layout).

    ``overwrite`` replaces only a folder that is a bundle (it has configs/metadata.json), never another one.
    """
    folder = Path(folder)
    check_bundle_target(folder, overwrite)
    inference = inference_config(config)  # refuses what a bundle cannot hold before anything is written
    check_network_def(inference["network_def"], state_dict)
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


# ---- reading a bundle (the model zoo's layout) ------------------------------------------------------

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
# The MONAI classes a network_def may name (bare, or under monai.networks.nets), and the network each is.
NETWORK_CLASSES = {"UNETR": "unetr", "SwinUNETR": "swin_unetr", "SegResNet": "segresnet", "SegResNetDS": "segresnet",
                   "DynUNet": "dynunet", "MedNeXt": "mednext"}
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
    """What a bundle says: its weights file, and config values (``section -> {key: value}``) for the
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


def _class_of(target: Any, where: str) -> str:
    """The MONAI class a network_def's ``_target_`` names, or one line: a network btcv-unetr does not build."""
    name = target.rsplit(".", 1)[-1] if isinstance(target, str) else None
    if name not in NETWORK_CLASSES or not (target == name or target.startswith("monai.networks.nets.")):
        known = ", ".join(NETWORK_CLASSES)
        raise UserError(f"{where} is {target!r}, a network btcv-unetr does not build: it loads bundles of MONAI's "
                        f"{known}")
    return name


def _defaults(class_name: str) -> dict[str, Any]:
    """MONAI's own defaults for the arguments a network_def leaves out (the installed MONAI runs the bundle)."""
    import inspect

    from monai.networks import nets
    parameters = inspect.signature(getattr(nets, class_name).__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _same(a: Any, b: Any) -> bool:
    """Argument values compared as JSON holds them: tuples as lists, enums as their values, names in any case."""
    def norm(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        return value.lower() if isinstance(value, str) else value
    return norm(a) == norm(b)


def _unetr_values(arguments: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig values from the arguments of MONAI's UNETR (its defaults filled in)."""
    values: dict[str, Any] = {"model_name": "unetr", "num_layers": 12}
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
    return values


def _as_setting(key: str, value: Any) -> Any:
    return ",".join(str(v) for v in value) if key in ("blocks_down", "blocks_up") else value


# Per MONAI class (not UNETR): network_def argument -> ModelConfig field; "" for arguments read below (kept out of
# the check that every other argument is MONAI's default, as this project builds the net).
SETTINGS: dict[str, dict[str, str]] = {
    "SwinUNETR": {"feature_size": "feature_size", "norm_name": "norm_name", "dropout_path_rate": "dropout_path_rate",
                  "use_checkpoint": "use_checkpoint", "use_v2": "use_v2", "use_flash_attention": ""},
    "SegResNet": {"init_filters": "init_filters", "blocks_down": "blocks_down", "blocks_up": "blocks_up"},
    "SegResNetDS": {"init_filters": "init_filters", "blocks_down": "blocks_down", "blocks_up": "blocks_up",
                    "dsdepth": "", "norm": ""},
    "DynUNet": {"norm_name": "norm_name", "kernel_size": "", "strides": "", "upsample_kernel_size": "", "filters": "",
                "deep_supervision": "", "deep_supr_num": "", "res_block": ""},
    "MedNeXt": {"kernel_size": "kernel_size", "init_filters": "init_filters", "deep_supervision": "",
                **{key: "" for key in [*MEDNEXT_COMMON, *MEDNEXT_SIZES["S"]]}},
}
# Arguments this project always gives a class (where they are not MONAI's defaults).
FIXED = {"SegResNetDS": {"norm": SEGRESNET_DS_NORM}, "DynUNet": {"res_block": True}, "MedNeXt": MEDNEXT_COMMON}


def _network_values(class_name: str, given: Mapping[str, Any], arguments: Mapping[str, Any], where: str
                    ) -> dict[str, Any]:
    """ModelConfig values (but the ROI) of a network_def of ``class_name`` other than UNETR: its settings; every
    argument this project's build does not set must be MONAI's default (else one line)."""
    name = NETWORK_CLASSES[class_name]
    settings, defaults = SETTINGS[class_name], _defaults(class_name)
    title = _network_title(name)
    for key, value in given.items():
        if key in settings or key in ("spatial_dims", "in_channels", "out_channels", "img_size"):
            continue
        if key not in defaults:
            raise UserError(f"{where}::{key}: an argument MONAI's {class_name} does not take")
        if not _same(value, defaults[key]):
            raise UserError(f"{where}::{key} is {value!r}: btcv-unetr's {title} has MONAI's default "
                            f"{_plain_list(defaults[key])!r} only")
    for key, value in FIXED.get(class_name, {}).items():
        if not _same(arguments.get(key), value):
            raise UserError(f"{where}::{key} is {arguments.get(key)!r}: btcv-unetr's {title} has {value!r} only")
    values: dict[str, Any] = {"model_name": name, **{field: _as_setting(field, arguments[key])
                                                     for key, field in settings.items() if field}}
    if class_name == "SegResNetDS":
        values["deep_supervision"] = int(arguments["dsdepth"]) - 1
    elif class_name == "DynUNet":
        values["init_filters"] = list(arguments.get("filters") or [32])[0]
        values["deep_supervision"] = int(arguments["deep_supr_num"]) if arguments["deep_supervision"] else 0
    elif class_name == "MedNeXt":
        values["mednext_size"] = _mednext_size(arguments, where)
        values["deep_supervision"] = MEDNEXT_HEADS if arguments["deep_supervision"] else 0
    return values


def _mednext_size(arguments: Mapping[str, Any], where: str) -> str:
    """The paper's size (S, B, M, L) whose arguments a MedNeXt network_def gives, or one line."""
    def per_level(key: str, value: Any) -> Any:  # MedNeXt takes one ratio for all 4 levels as an int
        return [value] * 4 if key.endswith("coder_expansion_ratio") and isinstance(value, int) else value
    for size, table in MEDNEXT_SIZES.items():
        if all(_same(per_level(key, arguments.get(key)), value) for key, value in table.items()):
            return size
    raise UserError(f"{where}: a MedNeXt of none of the paper's sizes S, B, M, L (as MONAI's create_mednext builds "
                    "them): btcv-unetr builds those only")


def _network_title(name: str) -> str:
    return TITLES[name]


def _window(class_name: str, given: Mapping[str, Any], content: Mapping[str, Any], where: str) -> list[int]:
    """The window (ROI) of a 3D network_def: UNETR's (and older Swin UNETR's) img_size, else the sliding-window
    inferer's roi_size; one line where neither states three sizes."""
    size = given.get("img_size")
    source = f"{where}::img_size"
    if size is None and class_name != "UNETR":
        inferer = content.get("inferer")
        size = _plain(inferer.get("roi_size"), content, "inferer::roi_size") if isinstance(inferer, Mapping) else None
        source = "its inferer::roi_size"
    sizes = [size] * 3 if isinstance(size, int) else list(size or [])
    if len(sizes) != 3 or not all(isinstance(n, int) and n > 0 for n in sizes):
        raise UserError(f"{where}: btcv-unetr loads 3D bundles whose window is three sizes; {source} is {size!r}")
    return sizes


def _model_values(network: Mapping[str, Any], content: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig values from a ``network_def`` (MONAI's defaults for what it leaves out): every model setting,
    at its default where the network has no such setting, so that the bundle alone states the architecture."""
    class_name = _class_of(_plain(network.get("_target_"), content, f"{where}::_target_"), where)
    given = {key: _plain(value, content, f"{where}::{key}") for key, value in network.items() if key != "_target_"}
    arguments = {**_defaults(class_name), **given}
    if int(arguments.get("spatial_dims", 3)) != 3:
        raise UserError(f"{where}::spatial_dims {arguments['spatial_dims']!r}: btcv-unetr loads 3D bundles only")
    if class_name == "UNETR":
        values = _unetr_values(arguments, where)
    else:
        values = {"spatial_dims": 3, "in_channels": arguments["in_channels"],
                  "out_channels": arguments["out_channels"], **_network_values(class_name, given, arguments, where)}
    values.update(zip(("roi_x", "roi_y", "roi_z"), _window(class_name, given, content, where)))
    return {**dataclasses.asdict(ModelConfig()), **values}


def _check_dynunet_plan(network: Mapping[str, Any], content: Mapping[str, Any], values: dict[str, dict[str, Any]],
                        where: str) -> None:
    """A DynUNet bundle's kernels, strides and filters must be the ones this project plans for its window and
    spacing (nnU-Net's rule, ``config.networks.plan_dynunet``): else the network it builds is another one."""
    model = ModelConfig(**values["model"])
    spacing = tuple(values["data"].get(key, 1.0) for key in ("space_x", "space_y", "space_z"))
    _, plan = network_definition(model, spacing)
    planned = {key: plan[key] for key in ("kernel_size", "strides", "filters")}
    differ = [key for key, value in planned.items() if not _same(_plain(network.get(key), content, where), value)]
    if differ:
        raise UserError(f"{where}::{differ[0]} is not what btcv-unetr plans for a {model.roi_size} window at "
                        f"{spacing} mm ({_plain_list(planned[differ[0]])}): it loads DynUNets it plans only")


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
    """A bundle's weights file and the network (``model_name`` and settings), preprocessing and blending its
    config states, or one line saying why not (not a bundle, a network class btcv-unetr does not build, arguments
    it does not build it with, a value that is code)."""
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
    if values["model"]["model_name"] == "dynunet":
        _check_dynunet_plan(network, content, values, f"{folder.name}/{where}")
    return BundleModel(folder, folder / "models" / "model.pt", path, values)
