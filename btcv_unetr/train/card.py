"""The model card every training checkpoint carries: what the weights were trained on, and how well they validated.

    data_facts      what the datalist of a training run says about its data (read once per run), and its net
    model_card      the card of a checkpoint written by training: net, data, spacing, classes, validation Dice ...
    untrained_card  the card of a checkpoint with random weights (tests, benchmarks, trying the service)

A model trained on the built-in phantoms segments real CT badly; nothing in a mask shows that. The
card makes the training data part of the checkpoint, so every place that shows a mask can say it
(``btcv_unetr.io.card`` presents it). A card is plain JSON-able values only: checkpoints keep loading
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..config.schema import Config
from ..data.datalist import class_names, read_datalist, resolve_datalist, with_fold
from ..errors import UserError
from ..model.architectures import network_facts

# The datalist keys the built-in generators write (phantoms.py, shapes2d.py); the card reads them, never guesses.
SYNTHETIC_KEY = "synthetic"
GENERATOR_KEY = "generator"


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def data_facts(config: Config) -> dict[str, Any]:
    """What the datalist of ``config`` says about the training data: its file and ``name``, the number of
    training and validation cases, whether a built-in generator made it, the spacing and the classes; and the net
    trained on it (:func:`~btcv_unetr.model.architectures.network_facts`: ``model_name``, ``network``, its own
    ``network_settings``, ``roi_size``)."""
    classes = config.model.out_channels
    facts: dict[str, Any] = {**network_facts(config.model), "datalist": Path(config.data.json_list).name,
                             "data_name": None,
                             "cases": {"training": 0, "validation": 0}, "synthetic": False, "generator": None}
    try:
        datalist = resolve_datalist(config.data.data_dir, config.data.json_list)
        content = with_fold(read_datalist(datalist), datalist, config.data.fold)  # --fold K: its split
    except UserError:
        content = {}
    if isinstance(content.get("name"), str):
        facts["data_name"] = content["name"]
    facts["cases"] = {split: len(content.get(split) or []) for split in ("training", "validation")}
    facts["fold"] = config.data.fold if config.data.fold != -1 else None  # cross-validation fold, if any
    facts["synthetic"] = content.get(SYNTHETIC_KEY) is True
    if facts["synthetic"] and isinstance(content.get(GENERATOR_KEY), str):
        facts["generator"] = content[GENERATOR_KEY]
    labels = content.get("labels") if isinstance(content.get("labels"), dict) else {}
    facts["classes"] = [str(labels.get("0") or "background"), *class_names(config.data, classes)]
    facts["spatial_dims"] = config.model.spatial_dims
    data = config.data
    facts["spacing"] = [data.space_x, data.space_y, data.space_z] if config.model.spatial_dims == 3 else None
    return facts


def _plain_number(value: float) -> float | None:
    """A Dice value for JSON: 4 decimals, None where it is undefined (an organ absent from every case)."""
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def model_card(facts: Mapping[str, Any], precision: str, validation_dice: Mapping[str, float] | None,
               validation: str | None, validation_epoch: int | None, epochs: int, steps: int) -> dict[str, Any]:
    """The card of a checkpoint written by training.

    ``facts`` from :func:`data_facts`; ``validation_dice`` the per-class Dice of the validation the
    card reports, ``validation`` which one it is ("best": model.pt, "last": model_final.pt, "top-k":
    a ``--keep_best`` file) and ``validation_epoch`` its epoch (all None before any validation);
    ``epochs`` and ``steps`` the training the weights have had.
    """
    dice = {name: _plain_number(value) for name, value in (validation_dice or {}).items()}
    defined = [value for value in dice.values() if value is not None]
    return {**facts, "validation": validation if validation_dice is not None else None,
            "validation_epoch": validation_epoch if validation_dice is not None else None,
            "validation_dice": dice,
            "validation_mean_dice": round(sum(defined) / len(defined), 4) if defined else None,
            "epochs": int(epochs), "steps": int(steps), "date": utc_now(), "precision": precision,
            "package_version": __version__}


def untrained_card(config: Config) -> dict[str, Any]:
    """The card of random weights: the config's classes and spacing, no data, no training."""
    facts = {**data_facts(config), "datalist": None, "data_name": None, "cases": {"training": 0, "validation": 0},
             "synthetic": False, "generator": None}
    return model_card(facts, "fp32", None, None, None, 0, 0)
