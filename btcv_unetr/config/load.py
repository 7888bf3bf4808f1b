"""Configurations from YAML files, checkpoints and nested dicts: layered over the defaults, migrated, checked."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .migration import migrate
from .schema import FIELD_SECTION, SECTIONS, Config, field_types
from .validation import ConfigError, coerce, validate

# Shipped inside the package (so a wheel or a Docker image has them); the checkout's top-level
# configs/ and dataset_json/ are links to these folders.
CONFIG_DIR = Path(str(resources.files("btcv_unetr") / "configs"))

# Model sizes shipped as configs/preset_NAME.yaml (``--preset NAME``).
PRESETS = ("lite", "base", "large")


def read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A YAML config file (a path, or a file name in :data:`CONFIG_DIR`) as its migrated sections; unknown sections
    and keys are refused in one line naming the file."""
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
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            value = f.default
            for layer in layers:
                if f.name in layer.get(section, {}):
                    value = layer[section][f.name]
            values[f.name] = coerce(f.name, value, hints[f.name], f.metadata["choices"])
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

