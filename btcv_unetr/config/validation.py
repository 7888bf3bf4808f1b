"""Checks of a configuration: each value against its field's type and choices, then ranges across fields; every
refusal is one line naming the key."""

from __future__ import annotations

import math
import typing
from typing import Any

from ..errors import UserError
from .networks import network_definition
from .schema import DICOM_OUTPUT_FORMATS, MODEL_SETTINGS, Config, ModelConfig, output_formats


class ConfigError(UserError):
    """A configuration value or key is wrong; the message names the key."""


def coerce(key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
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
    # A file or flag that sets another network's setting to a value of its own (the recipe file holds every key at
    # its default; a checkpoint's config holds them all) is refused: the network would silently ignore it.
    defaults = ModelConfig()
    foreign = sorted(key for key, owners in MODEL_SETTINGS.items() if key in config.explicit
                     and m.model_name not in owners and getattr(m, key) != getattr(defaults, key))
    if foreign:
        raise ConfigError(f"config key '{foreign[0]}': a setting of {', '.join(MODEL_SETTINGS[foreign[0]])}, not of "
                          f"--model_name {m.model_name}: drop it")
    if t.use_ssl_pretrained and m.model_name not in ("unetr", "swin_unetr"):
        raise ConfigError(f"config key 'use_ssl_pretrained': self-supervised encoder weights exist for unetr and "
                          f"swin_unetr, not --model_name {m.model_name}: drop it")
    if t.use_ssl_pretrained and (t.pretrained or t.checkpoint or t.resume_jit or t.resume_ckpt):
        raise ConfigError("config key 'use_ssl_pretrained': excludes pretrained, checkpoint, resume_jit and "
                          "resume_ckpt (each sets the encoder's starting weights): give one")
    if not 0 <= m.deep_supervision <= 5:
        raise ConfigError(f"config key 'deep_supervision': {m.deep_supervision} must be 0 (off) to 5 heads")
    try:  # a setting the network cannot take (deep heads it lacks, group norm filters), before any folder is made
        network_definition(m, d.pixdim)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    if m.model_name == "unetr":
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
    unknown = [name for name in output_formats(i) if name not in ("nifti", *DICOM_OUTPUT_FORMATS)]
    if unknown or not output_formats(i):
        raise ConfigError(f"config key 'output_format': {i.output_format!r}: give nifti or any of "
                          f"{', '.join(DICOM_OUTPUT_FORMATS)} separated by commas")
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


