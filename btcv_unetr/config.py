"""One resolved configuration object: defaults, then a YAML file, then command-line flags.

The defaults of every field are the values of the reference UNETR/BTCV recipe (MONAI
research-contributions), and every field's command-line flag has the reference name
(``--feature_size``, ``--RandFlipd_prob``, ``--dist-url`` ...), so reference commands keep working.
The YAML file groups the same names into sections::

    model: {feature_size: 16, roi_x: 96}
    data:  {space_z: 2.0}

Flow: ``parse_config(argv)`` -> :class:`Config` -> passed down to every stage. Nothing re-reads
flags or files later.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, one_line
from .files import atomic_write_text

# How the network's arithmetic is done (model/precision.py decides "auto" per machine).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The largest picture read (8000 x 8000 pixels), by the command line (--max_pixels) and the service (its own
# --max_pixels): its size is checked from the file's header before a decoder allocates it.
MAX_PIXELS = 64_000_000


class ConfigError(UserError):
    """A configuration value or key is wrong; the message names the key."""


def _opt(default: Any, help: str, *, choices: tuple | None = None, flags: tuple[str, ...] = (),
         aliases: tuple[tuple[str, Any], ...] = ()) -> Any:
    """A config field with its help text; ``flags`` replace the default ``--<name>`` flag, and each
    ``(flag, value)`` of ``aliases`` is a flag without argument that sets the field to ``value``."""
    return field(default=default, metadata={"help": help, "choices": choices, "flags": flags, "aliases": aliases})


@dataclass
class ModelConfig:
    """UNETR architecture (MONAI ``monai.networks.nets.UNETR``)."""

    spatial_dims: int = _opt(3, "3 for volumes (CT: NIfTI, NRRD, MHA, DICOM), 2 for pictures and slices (PNG, JPEG, "
                                "BMP): the model, transforms, inference and reports follow", choices=(2, 3))
    in_channels: int = _opt(1, "input image channels (2D: 3 for RGB, 1 for grayscale)")
    out_channels: int = _opt(14, "output classes including background (BTCV: 13 organs + 1)")
    roi_x: int = _opt(96, "ROI (crop and sliding window) size along x, voxels; a multiple of 16")
    roi_y: int = _opt(96, "ROI size along y, voxels; a multiple of 16")
    roi_z: int = _opt(96, "ROI size along z, voxels; a multiple of 16 (unused in 2D)")
    feature_size: int = _opt(16, "decoder feature size")
    hidden_size: int = _opt(768, "ViT hidden size")
    mlp_dim: int = _opt(3072, "ViT MLP size")
    num_heads: int = _opt(12, "ViT attention heads")
    num_layers: int = _opt(12, "ViT blocks, a multiple of 4 (the decoder taps a quarter, half and three quarters "
                               "of the depth): 12 in the paper (ViT-B), 24 for ViT-L")
    pos_embed: str = _opt("perceptron", "patch embedding (MONAI proj_type)", choices=("perceptron", "conv"))
    norm_name: str = _opt("instance", "decoder normalisation", choices=("instance", "batch"))
    conv_block: bool = _opt(True, "convolutional blocks in the decoder skip paths")
    res_block: bool = _opt(True, "residual blocks in the decoder")
    dropout_rate: float = _opt(0.0, "dropout rate in the ViT")

    @property
    def roi_size(self) -> tuple[int, ...]:
        """``(roi_x, roi_y, roi_z)``, or ``(roi_x, roi_y)`` in 2D (x: image columns, y: rows)."""
        return (self.roi_x, self.roi_y, self.roi_z)[:self.spatial_dims]


@dataclass
class DataConfig:
    """Datalist, preprocessing, augmentation and dataset caching."""

    data_dir: str = _opt("/dataset/dataset0/", "dataset folder; datalist paths resolve against it")
    json_list: str = _opt("dataset_0.json", "datalist file name in data_dir, or a path to one")
    fold: int | None = _opt(None, "cross-validation: fold K of a datalist whose training entries carry \"fold\" "
                                  "(btcv_folds_5fold.json) validates, the other folds train; unset or -1: the "
                                  "datalist's own training/validation split")
    a_min: float = _opt(-175.0, "intensity window lower bound, HU")
    a_max: float = _opt(250.0, "intensity window upper bound, HU")
    b_min: float = _opt(0.0, "scaled intensity at a_min")
    b_max: float = _opt(1.0, "scaled intensity at a_max")
    space_x: float = _opt(1.5, "target voxel spacing along x, mm")
    space_y: float = _opt(1.5, "target voxel spacing along y, mm")
    space_z: float = _opt(2.0, "target voxel spacing along z, mm")
    axcodes: str = _opt("RAS", "target orientation")
    crop_before_resampling: bool = _opt(True, "crop to the body at the scan's resolution, then resample only "
                                              "the box (the reference resamples the whole scan first); the voxel "
                                              "grid can differ by up to a voxel, so it is stored with a checkpoint "
                                              "and inference uses the checkpoint's")
    num_samples: int = _opt(4, "random crops per volume")
    crop_sampler: str = _opt("posneg", "crop centres: 'posneg' (reference: foreground vs background, pos:neg) or "
                             "'classes' (each class equally often, so small organs are seen)",
                             choices=("posneg", "classes"))
    pos: float = _opt(1.0, "weight of crops centred on foreground (posneg)")
    neg: float = _opt(1.0, "weight of crops centred on background (posneg)")
    RandFlipd_prob: float = _opt(0.2, "probability of a flip, per axis")
    RandRotate90d_prob: float = _opt(0.2, "probability of a 90-degree rotation")
    rotate90_max_k: int = _opt(3, "maximum number of 90-degree turns")
    RandScaleIntensityd_prob: float = _opt(0.1, "probability of intensity scaling")
    scale_intensity_factor: float = _opt(0.1, "intensity scaling factor range (+-)")
    RandShiftIntensityd_prob: float = _opt(0.1, "probability of intensity shift")
    shift_intensity_offset: float = _opt(0.1, "intensity shift range (+-)")
    use_normal_dataset: bool = _opt(False, "plain monai Dataset: no caching")
    cache_rate: float = _opt(1.0, "fraction of training cases held in RAM (CacheDataset)")
    cache_dir: str | None = _opt(None, "cache preprocessed cases on disk here (PersistentDataset)")
    workers: int = _opt(8, "data loading worker processes")
    # 2D pictures (spatial_dims 2); the CT keys above do not apply to them.
    hflip_prob: float = _opt(0.0, "2D: probability of a left-right flip; where left and right parts are different "
                                  "classes (faces), the datalist's mirror_pairs swap them (shapes2d writes them), "
                                  "else keep 0")
    rotate_degrees: float = _opt(10.0, "2D: random rotation range (+-), degrees")
    color_jitter: float = _opt(0.2, "2D: random brightness and contrast change (+- fraction)")
    hue_jitter: float = _opt(0.05, "2D RGB: random hue rotation, +- this fraction of a full turn (at most 0.5)")
    min_crop_scale: float = _opt(0.6, "2D: random resized crop, smallest crop side as a fraction of the image's")
    label_map: str | None = _opt(None, "2D masks: stored value to class, e.g. '1:1,2:0,3:2' for the Oxford pets "
                                       "trimap (1 pet, 2 background, 3 border); unlisted values are refused")
    max_pixels: int = _opt(MAX_PIXELS, "2D: refuse a picture (PNG, JPEG, BMP) whose header declares more pixels, "
                                       "before it is decoded (decoding allocates the declared size whole); the "
                                       "service's --max_pixels has the same default")

    @property
    def pixdim(self) -> tuple[float, float, float]:
        return (self.space_x, self.space_y, self.space_z)


@dataclass
class TrainConfig:
    """Optimisation, schedule, loss, logging and checkpoints."""

    logdir: str = _opt("test", "run folder; a bare name goes under ./runs/ as in the reference")
    checkpoint: str | None = _opt(None, "resume the whole training state from this checkpoint")
    save_checkpoint: bool = _opt(True, "write model.pt (best) and model_final.pt (last) to logdir")
    pretrained_dir: str = _opt("./pretrained_models/", "folder of pretrained weights")
    pretrained_model_name: str = _opt("UNETR_model_best_acc.pth", "pretrained weights file name")
    resume_ckpt: bool = _opt(False, "finetune from pretrained_dir/pretrained_model_name (state dict)")
    resume_jit: bool = _opt(False, "finetune from a TorchScript file (AMP off)")
    pretrained: str | None = _opt(None, "start from released weights: a name (unetr_btcv: the UNETR/BTCV weights, "
                                        "downloaded once into the user's cache), a URL#sha256=HEX, a weights file or "
                                        "a MONAI bundle folder; their architecture and preprocessing are used; "
                                        "training finetunes from them as --resume_ckpt does")
    optim_name: str = _opt("adamw", "optimiser", choices=("adam", "adamw", "sgd"))
    optim_lr: float = _opt(1e-4, "learning rate")
    reg_weight: float = _opt(1e-5, "weight decay")
    momentum: float = _opt(0.99, "SGD momentum")
    lrschedule: str = _opt("warmup_cosine", "learning-rate schedule, stepped per epoch: warmup_cosine (the "
                                            "reference), linear (the same warm-up, then linear decay to 0 at "
                                            "max_epochs), cosine_anneal, none",
                           choices=("warmup_cosine", "linear", "cosine_anneal", "none"))
    warmup_epochs: int = _opt(50, "linear warm-up epochs")
    max_epochs: int = _opt(5000, "training epochs")
    max_steps: int | None = _opt(None, "stop after this many optimiser steps (quick runs)")
    batch_size: int = _opt(1, "volumes per batch (each gives num_samples crops)")
    val_every: int = _opt(100, "validate every N epochs")
    save_every: int = _opt(1, "write the resumable state (model_final.pt) every N epochs, and after the last")
    keep_best: int = _opt(0, "also keep the K best checkpoints by validation mean Dice, "
                             "model_epochEEEE_diceD.DDDD.pt (ranked by that 4-decimal score, ties to the earlier "
                             "epoch; the files in logdir count on resume); 0 = off")
    loss: str = _opt("dice_ce", "training loss: dice_ce (the reference's DiceCE) or ce_jaccard (cross entropy + "
                                "soft Jaccard/IoU loss, probabilities not squared; smooth_nr/smooth_dr and "
                                "class_weights apply to its Jaccard term as to Dice's)",
                     choices=("dice_ce", "ce_jaccard"))
    smooth_nr: float = _opt(0.0, "Dice (or Jaccard) loss numerator smoothing")
    smooth_dr: float = _opt(1e-6, "Dice (or Jaccard) loss denominator smoothing")
    class_weights: str = _opt("none", "Dice class weights: none (the reference) or inverse_sqrt_volume "
                                      "(sqrt(median organ volume / organ volume) from the training labels, 1 to 5; "
                                      "the cross entropy stays unweighted)",
                              choices=("none", "inverse_sqrt_volume"))
    precision: str = _opt("auto", "autocast precision; auto: bf16 on CPUs that compute it natively (AVX512-BF16, "
                                  "AMX, ARM BF16) when a short probe finds it faster, else fp32; on GPUs bf16 from "
                                  "compute capability 8.0, else fp16 with a gradient scaler",
                          choices=PRECISIONS, aliases=(("--noamp", "fp32"),))
    time_budget_min: float | None = _opt(None, "wall-clock minutes for the epoch loop: the measured epoch times "
                                               "fix max_epochs (re-planned at validations) so the learning-rate "
                                               "schedule spans the budget (kept on resume)")
    seed: int | None = _opt(None, "random seed for reproducible runs")


@dataclass
class DistConfig:
    """torch.distributed settings (reference names)."""

    distributed: bool = _opt(False, "one process per visible GPU")
    nproc_per_node: int | None = _opt(None, "processes to spawn with --distributed (default: visible GPUs)")
    world_size: int = _opt(1, "number of nodes")
    rank: int = _opt(0, "node rank")
    dist_url: str = _opt("tcp://127.0.0.1:23456", "rendezvous URL", flags=("--dist-url", "--dist_url"))
    dist_backend: str = _opt("nccl", "backend (gloo is used on CPU)", flags=("--dist-backend", "--dist_backend"),
                             choices=("nccl", "gloo"))


@dataclass
class InferConfig:
    """Sliding-window inference."""

    infer_overlap: float = _opt(0.5, "sliding-window overlap, 0 <= overlap < 1")
    max_windows_factor: float = _opt(8.0, "refuse a scan whose sliding window at --infer_overlap takes more than "
                                          "this many times the windows it takes at overlap 0.5 (0.99 is a 1-voxel "
                                          "stride: hours per scan); the refusal names the largest overlap that "
                                          "fits; 0 = no bound")
    sw_batch_size: int = _opt(0, "windows per forward pass; 0 = auto: on CPU 4 with AMX in bf16, else 2 "
                                 "(fastest there); on GPU what fits in free memory (up to 8)")
    saved_checkpoint: str = _opt("ckpt", "pretrained file type: checkpoint/state dict, or TorchScript",
                                 choices=("ckpt", "torchscript"))
    checkpoints: list[str] | None = _opt(None, "an ensemble: checkpoint files, or cross-validation run folders (their "
                                               "fold_K/model.pt), whose softmax probabilities are averaged before "
                                               "the argmax; replaces pretrained_dir/pretrained_model_name")
    input: str | None = _opt(None, "an image file (NIfTI, NRRD, MHA/MHD; PNG, JPEG, BMP for 2D models), a folder "
                                   "of them, or a DICOM series folder (default: the datalist's --split)")
    split: str = _opt("validation", "datalist split to segment without --input",
                      choices=("training", "validation", "test"))
    output_dir: str = _opt("./outputs", "folder for masks, reports and pictures")
    mode: str = _opt("gaussian", "blending of overlapping windows", choices=("gaussian", "constant"))
    tta: bool = _opt(False, "flip test-time augmentation (averages probabilities of 4 passes)")
    save_probabilities: bool = _opt(False, "also write CASE_probabilities.npz (float16, native geometry)")
    device: str = _opt("auto", "where the network runs, training and inference (auto: a GPU when one is visible)",
                       choices=("auto", "cpu", "cuda"))
    continue_prediction: bool = _opt(False, "keep the cases whose outputs are complete (the mask read whole, on the "
                                             "scan's grid; the SEG too with dicom_seg), segment the others, and "
                                             "report over all: the kept masks are scored from their files",
                                     flags=("--continue",))
    num_parts: int = _opt(1, "split the cases into K parts, one per process without torch.distributed (a cluster "
                             "job array): case i (a folder's files sorted by name, a datalist's in its order) "
                             "goes to part i mod K")
    part_id: int = _opt(0, "the part this process segments, 0 .. num_parts-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    largest_component: bool = _opt(False, "keep the largest connected component per organ")
    hd95: bool = _opt(True, "compute HD95 and surface Dice (slow on big scans)", aliases=(("--no_hd95", False),))
    overlay: bool = _opt(True, "write CASE_overlay.png (needs matplotlib: pip install 'btcv-unetr[plot]')")
    sw_progress: bool = _opt(False, "progress bar over the windows of every scan (on by itself for large scans)")
    output_format: str = _opt("nifti", "nifti: CASE_seg in the input's own format (.nii.gz for NIfTI and DICOM, "
                                       ".nrrd, .mha, .png for pictures); dicom_seg: also "
                                       "CASE_seg.dcm, a DICOM Segmentation referencing the input series (DICOM "
                                       "inputs only; needs the dicom extra)", choices=("nifti", "dicom_seg"))


@dataclass
class GeneralConfig:
    """Options every command shares."""

    overwrite: bool = _opt(False, "replace existing outputs: masks (otherwise skipped), an export's --out, a "
                                  "training run folder that holds an earlier run (otherwise refused)")


@dataclass
class FastConfig:
    """Fast path (benchmarks/bench.py); each switch is on, or chosen per machine, and can be turned off. None
    changes the recipe (the data, the model, the voxel grid): only speed and rounding."""

    malloc_tuning: bool = _opt(True, "CPU: keep freed memory in the process (glibc) so big activations are not "
                                     "page-faulted in again at every layer (about 30% faster CPU passes)")
    sdpa: bool | None = _opt(None, "fused scaled-dot-product attention in the ViT blocks (same result); unset = "
                                   "on, except in bf16 on the CPU (MONAI's own attention was faster there)")
    micro_batch: int = _opt(0, "crops per forward/backward; gradients are accumulated so the optimiser still "
                               "steps once per batch. 0 = auto: 1 on CPU (faster per crop), whole batch on GPU")
    fused_optimizer: bool = _opt(True, "fused Adam/AdamW step (one kernel over all parameters)")
    compile: bool = _opt(False, "torch.compile the model (compiling takes tens of seconds per process)")
    channels_last: bool | None = _opt(None, "CPU: channels-last 3D memory format, instance norms by the group-norm "
                                            "kernel; unset = per CPU class: inference always, training only in "
                                            "fp32 (slower under bf16)")


@dataclass
class Config:
    """The resolved configuration passed to every stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    # The keys a layer set (a YAML file, a flag, a --pretrained source), not left at their defaults: what a
    # default chosen later for a model (inference/loader.py, weights without preprocessing) must not replace.
    # Not a section: never saved, and configs compare equal whatever it holds.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of the sections (YAML- and ``torch.load(weights_only=True)``-safe)."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path, comment: str = "") -> None:
        """Write the YAML (loadable with ``--config``), ``comment`` first as ``#`` lines."""
        header = "".join(f"# {line}\n" for line in comment.splitlines())
        atomic_write_text(path, header + self.to_yaml())


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
                             if f.name != "explicit"}
# field name -> section; names are unique across sections so that flags can stay flat.
FIELD_SECTION: dict[str, str] = {}
for _section, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELD_SECTION, f"config field {_f.name} defined twice"
        FIELD_SECTION[_f.name] = _section

# Shipped inside the package (so a wheel or a Docker image has them); the checkout's top-level
# configs/ and dataset_json/ are links to these folders.
CONFIG_DIR = Path(str(resources.files(__package__) / "configs"))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flag_type(hint: Any) -> type:
    """The type a flag parses: ``bool`` for ``bool | None``, ``int`` for ``int``."""
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _coerce(key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    """Check ``value`` against the field's type; returns it (ints widened to float)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': {value} is not a finite number")
    elif typing.get_origin(hint) is list:  # a list of strings (file names): YAML gives a list, flags nargs="+"
        ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"config key '{key}': expected {name}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
    return value


# Keys renamed since they were first written to config files and checkpoints: (section, old key) ->
# (new key, old value -> new value). Files that use the old key keep loading.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("train", "amp"): ("precision", lambda amp: "auto" if amp else "fp32"),
}


# Keys removed since: dropped silently from files and checkpoints that still carry them.
REMOVED_KEYS: set[tuple[str, str]] = {
    ("infer", "fast_invert"),  # the one-pass inversion became the only inversion path
    ("model", "model_name"),  # always "unetr"; --model_name stays a reference flag (add_config_arguments)
}

# Keys moved to another section since: (old section, key) -> new section (a value given there too wins).
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("fast", "crop_before_resampling"): "data",  # it changes the voxel grid: preprocessing, not a speed switch
    ("infer", "overwrite"): "general",  # it also governs training run folders and export
}


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (nested sections) with renamed keys under their new names, moved keys in their new sections (a
    new key given too wins) and removed keys dropped."""
    migrated: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if isinstance(values, dict):
            values = {key: value for key, value in values.items() if (section, key) not in REMOVED_KEYS}
            for (renamed_section, old), (new, convert) in RENAMED_KEYS.items():
                if renamed_section == section and old in values:
                    value = values.pop(old)
                    values.setdefault(new, convert(value))
            for (old_section, key), new_section in MOVED_KEYS.items():
                if old_section == section and key in values:
                    moved.setdefault(new_section, {})[key] = values.pop(key)
        migrated[section] = values
    for section, values in moved.items():
        target = migrated.setdefault(section, {})
        if isinstance(target, dict):
            for key, value in values.items():
                target.setdefault(key, value)
    return migrated


def _read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        builtin = CONFIG_DIR / path
        if not path.is_absolute() and builtin.is_file():
            path = builtin
        else:
            raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}): fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    raw = migrate(raw)
    for section, values in raw.items():
        if section not in SECTIONS:
            hint = f" (did you mean {FIELD_SECTION[section]}.{section}?)" if section in FIELD_SECTION else ""
            raise ConfigError(f"{path}: unknown config section '{section}'{hint}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        for key in values:
            if FIELD_SECTION.get(key) != section:
                where = f" (it belongs in '{FIELD_SECTION[key]}')" if key in FIELD_SECTION else ""
                raise ConfigError(f"{path}: unknown config key '{section}.{key}'{where}")
    return raw


def build_config(layers: list[dict[str, dict[str, Any]]]) -> Config:
    """Apply nested ``{section: {key: value}}`` layers over the defaults (each migrated: older key names and
    sections still count), check types and ranges. The keys the layers set are the config's ``explicit``."""
    layers = [migrate(layer) for layer in layers]
    explicit = frozenset(key for layer in layers for section, values in layer.items() if isinstance(values, dict)
                         for key in values if FIELD_SECTION.get(key) == section)
    sections = {}
    for section, cls in SECTIONS.items():
        values = {}
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            value = f.default
            for layer in layers:
                if f.name in layer.get(section, {}):
                    value = layer[section][f.name]
            values[f.name] = _coerce(f.name, value, hints[f.name], f.metadata["choices"])
        sections[section] = cls(**values)
    config = Config(**sections, explicit=explicit)
    validate(config)
    return config


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint); unknown keys are errors."""
    data = migrate(data)
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section '{section}'")
        for key in values:
            if FIELD_SECTION.get(key) != section:
                raise ConfigError(f"unknown config key '{section}.{key}'")
    return build_config([data])


def split_unknown_keys(data: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``data`` without the sections and keys this version does not define, and the dropped ``section.key`` names."""
    known, dropped = {}, []
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            dropped.append(section)
            continue
        known[section] = {key: value for key, value in values.items() if FIELD_SECTION.get(key) == section}
        dropped += [f"{section}.{key}" for key in values if FIELD_SECTION.get(key) != section]
    return known, dropped


def parse_label_map(text: str) -> dict[int, int]:
    """``'1:1,2:0,3:2'`` -> ``{1: 1, 2: 0, 3: 2}`` (stored mask value -> class), or a one-line ConfigError."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        mapping = {int(stored): int(target) for stored, target in pairs}
    except ValueError:
        raise ConfigError(f"config key 'label_map': {text!r} is not a list of stored:class pairs such as "
                          "'1:1,2:0,3:2'") from None
    if not mapping or min(mapping.values()) < 0:
        raise ConfigError(f"config key 'label_map': {text!r} needs stored:class pairs with classes >= 0")
    return mapping


def validate(config: Config) -> None:
    """Cross-field and range checks; raises :class:`ConfigError` naming the key."""
    m, d, t, i = config.model, config.data, config.train, config.infer
    sizes = {"feature_size": m.feature_size, "hidden_size": m.hidden_size, "mlp_dim": m.mlp_dim,
             "num_heads": m.num_heads}
    for key, value in sizes.items():
        if value < 1:
            raise ConfigError(f"config key '{key}': {value} must be >= 1")
    for key in ("roi_x", "roi_y", "roi_z")[:m.spatial_dims]:
        size = getattr(m, key)
        if size < 16 or size % 16:
            raise ConfigError(f"config key '{key}': {size} must be a positive multiple of 16 (UNETR's patch size)")
    if m.num_layers < 4 or m.num_layers % 4:
        raise ConfigError(f"config key 'num_layers': {m.num_layers} must be a positive multiple of 4")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"config key 'hidden_size': {m.hidden_size} is not divisible by num_heads={m.num_heads}")
    if d.a_max <= d.a_min:
        raise ConfigError(f"config key 'a_max': {d.a_max} must be greater than a_min={d.a_min}")
    for key in ("space_x", "space_y", "space_z"):
        if not getattr(d, key) > 0:
            raise ConfigError(f"config key '{key}': spacing must be > 0 mm")
    if d.label_map is not None:
        parse_label_map(d.label_map)
    if not 0.0 <= d.hue_jitter <= 0.5:
        raise ConfigError(f"config key 'hue_jitter': {d.hue_jitter} must be between 0 and 0.5 (half a turn)")
    if not 0.0 < d.min_crop_scale <= 1.0:
        raise ConfigError(f"config key 'min_crop_scale': {d.min_crop_scale} must be in (0, 1]")
    probabilities = {"dropout_rate": m.dropout_rate, "cache_rate": d.cache_rate, "hflip_prob": d.hflip_prob,
                     "color_jitter": d.color_jitter,
                     "RandFlipd_prob": d.RandFlipd_prob, "RandRotate90d_prob": d.RandRotate90d_prob,
                     "RandScaleIntensityd_prob": d.RandScaleIntensityd_prob,
                     "RandShiftIntensityd_prob": d.RandShiftIntensityd_prob}
    for key, value in probabilities.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}': {value} must be between 0 and 1")
    if not 0.0 <= i.infer_overlap < 1.0:
        raise ConfigError(f"config key 'infer_overlap': {i.infer_overlap} must be in [0, 1)")
    if i.max_windows_factor != 0 and i.max_windows_factor < 1:
        raise ConfigError(f"config key 'max_windows_factor': {i.max_windows_factor} must be >= 1 (times the windows "
                          "of overlap 0.5), or 0 for no bound")
    if d.max_pixels < 1:
        raise ConfigError(f"config key 'max_pixels': {d.max_pixels} must be >= 1")
    positive = {"in_channels": m.in_channels, "out_channels": m.out_channels, "num_samples": d.num_samples,
                "batch_size": t.batch_size, "val_every": t.val_every, "save_every": t.save_every,
                "max_epochs": t.max_epochs,
                "world_size": config.dist.world_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}': {value} must be >= 1")
    for key, value in {"sw_batch_size": i.sw_batch_size, "micro_batch": config.fast.micro_batch}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}': {value} must be >= 0 (0 = automatic)")
    if t.keep_best < 0:
        raise ConfigError(f"config key 'keep_best': {t.keep_best} must be >= 0 (0 = off)")
    if t.keep_best and not t.save_checkpoint:
        raise ConfigError("config key 'keep_best' needs checkpoints: drop --no-save_checkpoint or set keep_best 0")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"config key 'max_steps': {t.max_steps} must be >= 1")
    if d.workers < 0 or t.warmup_epochs < 0:
        raise ConfigError("config keys 'workers' and 'warmup_epochs' must be >= 0")
    if not (math.isfinite(t.optim_lr) and t.optim_lr > 0):
        raise ConfigError(f"config key 'optim_lr': {t.optim_lr} must be a positive number")
    if t.time_budget_min is not None and not (math.isfinite(t.time_budget_min) and t.time_budget_min > 0):
        raise ConfigError(f"config key 'time_budget_min': {t.time_budget_min} must be a positive number of minutes")
    if d.fold is not None and d.fold < -1:
        raise ConfigError(f"config key 'fold': {d.fold} must be a fold number >= 0, or -1 (no fold)")
    if i.num_parts < 1 or not 0 <= i.part_id < i.num_parts:
        raise ConfigError(f"config keys 'part_id' and 'num_parts': part {i.part_id} of {i.num_parts} does not "
                          "exist; give --num_parts K >= 1 and --part_id 0 .. K-1")
    if i.continue_prediction and config.general.overwrite:
        raise ConfigError("config keys 'continue_prediction' (--continue) and 'overwrite' exclude each other: "
                          "--continue keeps the complete masks, --overwrite makes every one again")
    if d.use_normal_dataset and d.cache_dir:
        raise ConfigError("config keys 'use_normal_dataset' and 'cache_dir' exclude each other: choose one")


PRESETS = ("lite", "base", "large")
# The data keys that decide what the network sees: stored with a checkpoint, taken from it by inference
# (inference/loader.py), the same in every member of an ensemble (inference/ensemble.py).
PREPROCESSING = ("a_min", "a_max", "b_min", "b_max", "space_x", "space_y", "space_z", "axcodes",
                 "crop_before_resampling")
# Flags the reference's test.py took without using them at inference (its loader shared the
# training arguments), per section: test.py still accepts them, so that reference commands keep working.
REFERENCE_TEST_EXTRAS: dict[str, tuple[str, ...]] = {
    "data": ("RandFlipd_prob", "RandRotate90d_prob", "RandScaleIntensityd_prob", "RandShiftIntensityd_prob",
             "workers"),
    "dist": ("distributed",),
}
# The config flags each command takes: section -> its fields, or None for the whole section. A
# YAML file may set any key; a flag a command would ignore is refused.
COMMAND_FLAGS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "train": {"model": None, "data": None, "train": None, "dist": None, "fast": None,
              "infer": ("infer_overlap", "sw_batch_size", "mode", "device"), "general": None},
    "infer": {"model": None, "infer": None,
              "data": ("data_dir", "json_list", "fold", "label_map", "max_pixels", *PREPROCESSING,
                       *REFERENCE_TEST_EXTRAS["data"]),
              "train": ("pretrained_dir", "pretrained_model_name", "pretrained", "precision"),
              "dist": REFERENCE_TEST_EXTRAS["dist"],
              "fast": ("malloc_tuning", "sdpa", "compile", "channels_last"), "general": None},
    "export": {"model": None, "train": ("checkpoint", "pretrained"), "infer": ("infer_overlap", "mode"),
               "general": None},
    "serve": {"model": None, "train": ("checkpoint", "precision"),
              "infer": ("infer_overlap", "sw_batch_size", "mode", "tta", "device", "checkpoints"),
              "data": ("crop_before_resampling",), "fast": ("malloc_tuning", "sdpa", "compile", "channels_last")},
    # check-data: the datalist and what the model takes; evaluate: classes, label map and distances.
    "check-data": {"model": ("spatial_dims", "in_channels", "out_channels"),
                   "data": ("data_dir", "json_list", "label_map", "max_pixels")},
    "evaluate": {"model": ("out_channels",), "data": ("label_map",), "infer": ("hd95",)},
}
# crossval: training's flags for every fold, and inference's for scoring each fold's validation cases.
COMMAND_FLAGS["crossval"] = {**COMMAND_FLAGS["train"], "infer": tuple(dict.fromkeys(
    (*(COMMAND_FLAGS["train"]["infer"] or ()), "tta", "hd95", "overlay", "largest_component")))}


def command_fields(command: str | None) -> dict[str, list[dataclasses.Field]]:
    """The config fields ``command`` takes flags for, per section (``None``: every field)."""
    wanted = COMMAND_FLAGS[command] if command is not None else {section: None for section in SECTIONS}
    return {section: [f for f in dataclasses.fields(SECTIONS[section]) if names is None or f.name in names]
            for section, names in wanted.items()}


def add_config_arguments(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Add ``--config`` and one flag per config field ``command`` uses (reference names; defaults in help).

    Flags default to ``argparse.SUPPRESS`` so that only flags the user typed override the YAML file.
    """
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of config sections; flags given on the command line override it")
    parser.add_argument("--preset", default=None, choices=PRESETS,
                        help="model size (configs/preset_NAME.yaml): lite (CPUs), base (the paper's ViT-B), large "
                             "(ViT-L); applied after --config, before the other flags")
    for section, fields in command_fields(command).items():
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
        hints = _field_types(cls)
        for f in fields:
            flags = f.metadata["flags"] or (f"--{f.name}",)
            unused = command == "infer" and f.name in REFERENCE_TEST_EXTRAS.get(section, ())
            # argparse formats help with %: a literal % in a text ("30% faster") must be doubled.
            help_text = ("accepted as the reference's test.py does; not used by inference" if unused else
                         f"{f.metadata['help']} (default: {f.default})").replace("%", "%%")
            base = _flag_type(hints[f.name])
            if base is bool:
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            elif typing.get_origin(base) is list:
                group.add_argument(*flags, dest=f.name, nargs="+", type=typing.get_args(base)[0], metavar="PATH",
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*flags, dest=f.name, type=base, choices=f.metadata["choices"],
                                   default=argparse.SUPPRESS, help=help_text)
            for alias, value in f.metadata["aliases"]:
                group.add_argument(alias, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS,
                                   help=f"sets {f.name} to {value} (reference flag)")
        if section == "model" and len(fields) == len(dataclasses.fields(cls)):
            # The reference's --model_name chose the network; UNETR is the only one here, so the value is
            # checked and not stored (a file's model.model_name is dropped by migrate).
            group.add_argument("--model_name", choices=("unetr",), default=argparse.SUPPRESS,
                               help="the reference's network choice, accepted so that its commands keep working: "
                                    "UNETR is the only network")


def _flags_of(f: dataclasses.Field, hint: Any) -> list[str]:
    """Every flag that sets field ``f``: its names, its aliases and the ``--no-`` form of a switch."""
    names = list(f.metadata["flags"] or (f"--{f.name}",)) + [alias for alias, _ in f.metadata["aliases"]]
    return names + ([f"--no-{f.name}"] if _flag_type(hint) is bool else [])


def unrecognized_flags_message(command: str, words: list[str]) -> str:
    """The error line for flags ``command`` does not take: config flags of other commands are named as such."""
    owners: dict[str, list[str]] = {}
    for other in COMMAND_FLAGS:
        for section, fields in command_fields(other).items():
            hints = _field_types(SECTIONS[section])
            for f in fields:
                for flag in _flags_of(f, hints[f.name]):
                    owners.setdefault(flag, []).append(other)
    flags = [word.split("=")[0] for word in words if word.startswith("-")]
    known = [flag for flag in flags if flag in owners]
    if known:
        return "; ".join(f"{flag} is not a flag of '{command}' (it is one of: {', '.join(owners[flag])})"
                         for flag in known)
    return f"unrecognized arguments: {' '.join(words)}"


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``args.config`` (if any), then the ``--preset`` file, then the flags present in ``args``."""
    layers = [_read_yaml(args.config)] if getattr(args, "config", None) else []
    if getattr(args, "preset", None):
        layers.append(_read_yaml(CONFIG_DIR / f"preset_{args.preset}.yaml"))
    flags: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in vars(args).items():
        if name in FIELD_SECTION:
            flags[FIELD_SECTION[name]][name] = value
    return build_config(layers + [flags])


class FlagParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints its whole usage, 60+ lines here, first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists the flags)\n")


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Parse a full command line into a :class:`Config` (used by tests and simple entry points)."""
    parser = FlagParser(description=description)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
