"""What a model and a mask say about themselves: the model card, a mask's provenance, plausible organ volumes.

    data_facts            what the datalist of a training run says about its data (read once per run)
    model_card            the card every training checkpoint carries: data, spacing, classes, validation Dice ...
    untrained_card        the card of a checkpoint with random weights (tests, benchmarks, trying the service)
    model_card_lines      the lines ``test.py`` prints first; ``card_warning`` the plain warning among them
    provenance            package version, weights checksum, precision, device, overlap, TTA of a mask
    PLAUSIBLE_VOLUMES_ML  deliberately wide adult organ volumes (sources in the README); ``volume_flag``

A model trained on the built-in phantoms segments real CT badly; nothing in a mask shows that. The
card makes the training data part of the checkpoint, so every place that shows a mask can say it.
A card is plain JSON-able values only: checkpoints keep loading with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..data.datalist import class_names, read_datalist, resolve_datalist, with_fold
from ..errors import UserError

# The datalist keys the built-in generators write (phantoms.py, shapes2d.py); the card reads them, never guesses.
SYNTHETIC_KEY = "synthetic"
GENERATOR_KEY = "generator"


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def data_facts(config: Config) -> dict[str, Any]:
    """What the datalist of ``config`` says about the training data: its file and ``name``, the number of
    training and validation cases, whether a built-in generator made it, the spacing and the classes."""
    classes = config.model.out_channels
    facts: dict[str, Any] = {"datalist": Path(config.data.json_list).name, "data_name": None,
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


def card_warning(card: Mapping[str, Any] | None) -> str | None:
    """The plain warning a card calls for: weights never trained, or trained on synthetic data; else None."""
    if not card:
        return None
    if card.get("steps") == 0:
        return "WARNING: this model's weights are random (it was never trained): its masks mean nothing"
    if card.get("synthetic"):
        generator = card.get("generator") or "a built-in generator"
        if card.get("spatial_dims") == 2:
            return (f"WARNING: this model was trained on synthetic pictures ({generator}): it is not for real "
                    "pictures; its masks of real pictures are mostly wrong")
        return (f"WARNING: this model was trained on synthetic phantoms ({generator}): it is not for real scans; "
                "its masks of real CT are mostly wrong")
    return None


NO_CARD = "model card: none (this checkpoint was written without one; what it was trained on is unknown)"


def model_card_lines(card: Mapping[str, Any] | None) -> list[str]:
    """The lines that present a model before its masks: data, spacing and classes, validation, date and
    precision, then the warning of :func:`card_warning` where there is one."""
    if not card:
        return [NO_CARD]
    members = card.get("ensemble") or []
    if set(card) == {"ensemble"}:  # an ensemble of files written without cards
        return [NO_CARD, *ensemble_lines(members)]
    cases = card.get("cases") or {}
    if card.get("datalist"):
        kind = f"synthetic, made by {card.get('generator') or 'a built-in generator'}" if card.get("synthetic") \
            else "not marked synthetic"
        name = f" \"{card['data_name']}\"" if card.get("data_name") else ""
        data = (f"model card: trained on {card['datalist']}{name}, {cases.get('training', 0)} training and "
                f"{cases.get('validation', 0)} validation cases ({kind})")
    else:
        data = "model card: not trained on any data (random weights)"
    spacing = card.get("spacing")
    grid = f"spacing {' x '.join(f'{s:g}' for s in spacing)} mm" if spacing else "2D pictures"
    classes = card.get("classes") or []
    lines = [data, f"  {grid}; {len(classes)} classes: {', '.join(classes)}"]
    dice = card.get("validation_dice") or {}
    if members:  # an ensemble's card: the validation of each member
        lines += ensemble_lines(members)
    elif card.get("validation") and dice:
        per_class = ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in dice.items())
        mean = card.get("validation_mean_dice")
        lines.append(f"  validation ({card['validation']}, epoch {card.get('validation_epoch')}): mean Dice "
                     f"{'n/a' if mean is None else f'{mean:.4f}'}; {per_class}")
    else:
        lines.append("  validation: none")
    lines.append(f"  written {card.get('date')} after {card.get('epochs')} epochs ({card.get('steps')} steps), "
                 f"precision {card.get('precision')}, btcv-unetr {card.get('package_version')}")
    warning = card_warning(card)
    return lines + ([warning] if warning else [])


def ensemble_lines(members: list[Mapping[str, Any]]) -> list[str]:
    """The lines of an ensemble card's ``ensemble``: per member its file, weights checksum and validation."""
    lines = [f"  ensemble of {len(members)} models, softmax probabilities averaged:"]
    for member in members:
        mean = member.get("validation_mean_dice")
        validation = (f"validation ({member['validation']}, epoch {member.get('validation_epoch')}): mean Dice "
                      f"{mean:.4f}" if member.get("validation") and mean is not None else "validation: none")
        lines.append(f"    {member.get('file')}: weights {str(member.get('weights_sha256'))[:12]}, {validation}")
    return lines


def provenance(weights_sha256: str, precision: str, device: str, overlap: float, tta: bool, mode: str,
               card: Mapping[str, Any] | None, device_name: str = "") -> dict[str, Any]:
    """What a mask was made with, as plain values: enough to make the same mask bytes again."""
    return {"package_version": __version__, "weights_sha256": weights_sha256, "precision": precision,
            "device": device, "device_name": device_name, "overlap": float(overlap), "tta": bool(tta), "mode": mode,
            "synthetic_training_data": bool(card.get("synthetic")) if card else None}


# Plausible adult volumes in mL, far wider than normal ranges: a flag means "far outside", i.e. a wrong
# mask, an organ cut by the scan's field of view, or disease worth a look. Where a published reference
# interval exists the range is half its lower and twice its upper limit. Sources and the reasoning per
# organ: README, *Organ volumes and their plausible range*. 0 as the lower end: no lower flag.
PLAUSIBLE_VOLUMES_ML: dict[str, tuple[float, float]] = {
    "liver": (410.0, 3400.0),
    "spleen": (40.0, 640.0),
    "pancreas": (10.0, 250.0),
    "right kidney": (50.0, 500.0),
    "left kidney": (50.0, 500.0),
    "right adrenal gland": (1.3, 13.0),
    "left adrenal gland": (1.4, 12.0),
    "gallbladder": (0.0, 150.0),
    "stomach": (0.0, 4000.0),
    # No range: how much of the esophagus, aorta, inferior vena cava and portal/splenic veins an
    # abdominal scan holds depends on where it starts and ends, not on the patient.
}


def volume_flag(name: str, ml: float) -> str | None:
    """"low" or "high" where ``ml`` is outside organ ``name``'s plausible range, else None (also for an organ
    without a range, and for no voxels at all: the scan may not reach the organ, or it was removed)."""
    bounds = PLAUSIBLE_VOLUMES_ML.get(name)
    if bounds is None or not ml > 0:
        return None
    low, high = bounds
    if ml < low:
        return "low"
    return "high" if ml > high else None
