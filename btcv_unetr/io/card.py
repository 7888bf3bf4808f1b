"""The model card a checkpoint carries (written by ``btcv_unetr.train.card``), presented to whoever uses its masks.

    model_card_lines  the lines ``test.py``, the service and a bundle's README show first
    card_warning      the plain warning among them: random weights, or trained on synthetic data
    ensemble_lines    per member of an ensemble: its file, net, weights checksum and validation
    network_text      a card's net in words: its title, the settings it changed from the defaults, its window

Here, below inference, serving and the bundle writer, because all three show a card; only training writes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config.schema import ModelConfig


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
    lines = [data] + ([f"  network: {network_text(card)}"] if card.get("network") else [])
    lines.append(f"  {grid}; {len(classes)} classes: {', '.join(classes)}")
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
    """The lines of an ensemble card's ``ensemble``: per member its file, net (where the card names it), weights
    checksum and validation."""
    lines = [f"  ensemble of {len(members)} models, softmax probabilities averaged:"]
    for member in members:
        mean = member.get("validation_mean_dice")
        validation = (f"validation ({member['validation']}, epoch {member.get('validation_epoch')}): mean Dice "
                      f"{mean:.4f}" if member.get("validation") and mean is not None else "validation: none")
        net = f"{network_text(member)}, " if member.get("network") else ""
        lines.append(f"    {member.get('file')}: {net}weights {str(member.get('weights_sha256'))[:12]}, {validation}")
    return lines


def network_text(facts: Mapping[str, Any]) -> str:
    """``SegResNet (init_filters 8, blocks_down 1,1,1), ROI 32x32x32``: the ``network`` of a card (or of an ensemble
    card's member), the ``network_settings`` that differ from the config's defaults (all of them are in the card),
    and the ``roi_size`` its sliding window runs with."""
    defaults = ModelConfig()
    changed = [f"{key} {value}" for key, value in (facts.get("network_settings") or {}).items()
               if getattr(defaults, key, None) != value]
    roi = facts.get("roi_size")
    return (str(facts.get("network")) + (f" ({', '.join(changed)})" if changed else "")
            + (f", ROI {'x'.join(str(n) for n in roi)}" if roi else ""))
