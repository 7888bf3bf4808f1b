"""The configuration's schema: one dataclass per section, each field with its default, help text and flags.

Every field's command-line flag has the reference UNETR/BTCV recipe's name (MONAI research-contributions:
``--feature_size``, ``--RandFlipd_prob``, ``--dist-url`` ...), so reference commands keep working. Most defaults
are the reference's; those that differ (precision, crop_before_resampling, mode, the fast-path switches, ...) are
listed in the README ("Which defaults differ from the reference recipe"). Weights that store no preprocessing get
the reference's (inference/loader.py).
The YAML file groups the same names into sections::

    model: {feature_size: 16, roi_x: 96}
    data:  {space_z: 2.0}

Flow: YAML file -> command-line flags -> one :class:`Config` (``flags.config_from_args``), passed down to every
stage. Nothing re-reads flags or files later. Reading files: ``load``; older keys: ``migration``; checks:
``validation``; flags: ``flags``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write_text

# How the network's arithmetic is done (runtime/precision.py decides "auto" per machine).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The largest picture read (8000 x 8000 pixels), by the command line (--max_pixels) and the service (its own
# --max_pixels): its size is checked from the file's header before a decoder allocates it.
MAX_PIXELS = 64_000_000


def _opt(default: Any, help: str, *, choices: tuple | None = None, flags: tuple[str, ...] = (),
         aliases: tuple[tuple[str, Any], ...] = ()) -> Any:
    """A config field with its help text; ``flags`` replace the default ``--<name>`` flag, and each
    ``(flag, value)`` of ``aliases`` is a flag without argument that sets the field to ``value``."""
    return field(default=default, metadata={"help": help, "choices": choices, "flags": flags, "aliases": aliases})


ARCHITECTURE_NAMES = ("unetr", "swin_unetr", "segresnet", "dynunet", "mednext")
# The settings of ModelConfig that only some networks use; a foreign one given by the user is refused (validate).
MODEL_SETTINGS = {
    "hidden_size": ("unetr",), "mlp_dim": ("unetr",), "num_heads": ("unetr",), "num_layers": ("unetr",),
    "pos_embed": ("unetr",), "conv_block": ("unetr",), "res_block": ("unetr",), "dropout_rate": ("unetr",),
    "feature_size": ("unetr", "swin_unetr"), "norm_name": ("unetr", "swin_unetr", "dynunet"),
    "dropout_path_rate": ("swin_unetr",), "use_checkpoint": ("swin_unetr",), "use_v2": ("swin_unetr",),
    "init_filters": ("segresnet", "dynunet", "mednext"), "blocks_down": ("segresnet",), "blocks_up": ("segresnet",),
    "mednext_size": ("mednext",), "kernel_size": ("mednext",),
    "deep_supervision": ("segresnet", "dynunet", "mednext"),
}


@dataclass
class ModelConfig:
    """The network (``model_name``: MONAI's UNETR by default) and its settings; :data:`MODEL_SETTINGS` says which
    settings belong to which network."""

    model_name: str = _opt("unetr", "network: unetr (the reference), swin_unetr, segresnet, dynunet (planned as "
                                    "nnU-Net plans it), mednext", choices=ARCHITECTURE_NAMES)

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
    dropout_path_rate: float = _opt(0.0, "Swin UNETR: stochastic depth rate")
    use_checkpoint: bool = _opt(False, "Swin UNETR: gradient checkpointing (less memory, slower steps)")
    use_v2: bool = _opt(False, "Swin UNETR: the v2 blocks (a residual convolution per stage)")
    init_filters: int | None = _opt(None, "SegResNet, DynUNet, MedNeXt: filters of the first level (unset: 16 for "
                                          "SegResNet, 32 for DynUNet as nnU-Net and for MedNeXt as its paper)")
    blocks_down: str = _opt("1,2,2,4", "SegResNet: residual blocks per encoder level, comma-separated")
    blocks_up: str = _opt("1,1,1", "SegResNet: blocks per decoder level, comma-separated")
    mednext_size: str = _opt("S", "MedNeXt: the paper's size S, B, M or L", choices=("S", "B", "M", "L"))
    kernel_size: int = _opt(3, "MedNeXt: convolution kernel size (3 or 5 in the paper)")
    deep_supervision: int = _opt(0, "SegResNet (as SegResNetDS), DynUNet, MedNeXt: output heads below full "
                                    "resolution trained with the loss, weighted as nnU-Net (halving per level); "
                                    "inference uses the full-resolution head only; 0 = off")

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
    pretrained: str | None = _opt(None, "start from released weights: a name (unetr_btcv: the UNETR/BTCV weights; "
                                        "swin_unetr_btcv, _small, _tiny: the Swin UNETR/BTCV weights; "
                                        "downloaded once into the user's cache), a URL#sha256=HEX, a weights file or "
                                        "a MONAI bundle folder; their architecture and preprocessing are used; "
                                        "training finetunes from them as --resume_ckpt does")
    use_ssl_pretrained: bool = _opt(False, "start the encoder from its self-supervised weights: Swin UNETR "
                                           "from model_swinvit.pt (5,050 CTs; taken from pretrained_dir, else "
                                           "downloaded once), UNETR from best_model.pt of MONAI's self-supervised "
                                           "tutorial (put in pretrained_dir); every encoder tensor must match")
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
    series_uid: str | None = _opt(None, "the DICOM series to segment when the --input folder holds several (default: "
                                        "the CT series with the most slices; every series found is listed)")
    any_modality: bool = _opt(False, "segment a DICOM series of another modality than the model's (CT): its "
                                     "intensities mean something else, so expect poor masks")
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
                                       ".nrrd, .mha, .png for pictures), always written; for a DICOM series input "
                                       "also, comma-separated: dicom_seg (CASE_seg.dcm, a DICOM Segmentation), "
                                       "dicom_rtstruct (CASE_rtstruct.dcm, contours for radiotherapy systems), "
                                       "dicom_overlay (CASE_overlay_dcm/, the slices with the organs in colour as a "
                                       "new series); needs the dicom extra")


DICOM_OUTPUT_FORMATS = ("dicom_seg", "dicom_rtstruct", "dicom_overlay")


def output_formats(infer: InferConfig) -> tuple[str, ...]:
    """The formats ``--output_format`` names (``nifti``, ``dicom_seg,dicom_rtstruct`` ...), stripped of spaces."""
    return tuple(name.strip() for name in infer.output_format.split(",") if name.strip())


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
        """Plain nested dict (YAML- and ``torch.load(weights_only=True)``-safe)."""
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

# The data keys that decide what the network sees: stored with a checkpoint, taken from it by inference
# (inference/loader.py), the same in every member of an ensemble (inference/ensemble.py).
PREPROCESSING = ("a_min", "a_max", "b_min", "b_max", "space_x", "space_y", "space_z", "axcodes",
                 "crop_before_resampling")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag_type(hint: Any) -> type:
    """The type a flag parses: ``bool`` for ``bool | None``, ``int`` for ``int``."""
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


