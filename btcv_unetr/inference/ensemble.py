"""Ensembles at inference: which weights files are the members, whether they fit together, what they are called.

    member_files      ``--checkpoints`` (files, and cross-validation run folders' ``fold_K/model.pt``) as paths
    fold_models       the ``fold_K/model.pt`` of a run folder, in fold order
    check_compatible  one line naming both files where a member's preprocessing, dimensions or classes differ
    ensemble_checksum one SHA-256 for the members' weights checksums, in order
    ensemble_card     the model card of an ensemble: its first member's data; each member's file, net and validation

The members' softmax probabilities are averaged by :class:`btcv_unetr.inference.predictor.Predictor`; this module
only decides what goes in. Every member runs on the one preprocessed image, so they must share the preprocessing, the
input channels and the classes; their networks may differ (UNETR beside Swin UNETR and a SegResNet): each runs its own
sliding window with its own ROI over that image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config.schema import PREPROCESSING, Config, ModelConfig
from ..errors import UserError
from ..model.architectures import network_facts

FOLD_FOLDER = re.compile(r"fold_(\d+)")
FOLD_MODEL = "model.pt"  # each fold's best checkpoint by validation Dice, as training writes it
# The model keys every member must share: they shape the one preprocessed image the members all read (its dimensions
# and channels) and the probabilities averaged (one per class). The other model keys are each member's own network.
SHARED_MODEL_KEYS = ("spatial_dims", "in_channels", "out_channels")
# A 2D picture is resized to the model's window (data/transforms.py): there the window is preprocessing too.
PICTURE_MODEL_KEYS = ("roi_x", "roi_y")
# What a card says of one model only (its cross-validation fold, its validation): an ensemble's card moves it to
# each member (the per-class Dice dropped: the mean stands for it there).
MEMBER_KEYS = ("fold", "validation", "validation_epoch", "validation_mean_dice")
SINGLE_MODEL_KEYS = (*MEMBER_KEYS, "validation_dice")
# What a card says of its net (architectures.network_facts): an ensemble's card says it per member.
NETWORK_KEYS = ("model_name", "network", "network_settings", "roi_size")


def fold_models(run: Path) -> list[Path]:
    """``run/fold_K/model.pt`` of every ``fold_K`` folder of a cross-validation run, by K; a one-line error
    where there is no fold folder, or a fold without its model."""
    found = ((FOLD_FOLDER.fullmatch(p.name), p) for p in run.iterdir() if p.is_dir())
    folds = sorted((int(match.group(1)), path) for match, path in found if match)
    if not folds:
        raise UserError(f"{run}: no fold_K folders in it: give a cross-validation run folder or checkpoint files "
                        "to --checkpoints")
    for _, folder in folds:
        if not (folder / FOLD_MODEL).is_file():
            raise UserError(f"{folder}: no {FOLD_MODEL} (the fold has not finished training): finish it, or list "
                            f"the other folds' {FOLD_MODEL} files with --checkpoints")
    return [folder / FOLD_MODEL for _, folder in folds]


def member_files(given: Sequence[str]) -> list[Path]:
    """The weights files of ``--checkpoints``: each file as given, each folder as its folds' models; a file
    named twice is refused (it would count double in the average)."""
    members: list[Path] = []
    for path in map(Path, given):
        if not path.exists():
            raise UserError(f"checkpoint not found: {path} (--checkpoints takes checkpoint files and "
                            "cross-validation run folders)")
        members += fold_models(path) if path.is_dir() else [path]
    seen: dict[Path, Path] = {}
    for path in members:
        if path.resolve() in seen:
            raise UserError(f"{path} is in --checkpoints twice (as {seen[path.resolve()]}): name each member once")
        seen[path.resolve()] = path
    return members


def _difference(first: Config, other: Config) -> tuple[str, Any, Any] | None:
    """The first shared model key (:data:`SHARED_MODEL_KEYS`, and the window of a 2D model) or preprocessing key
    whose values differ, with both values, or None."""
    model_keys = SHARED_MODEL_KEYS + (PICTURE_MODEL_KEYS if first.model.spatial_dims == 2 else ())
    for section, keys in (("model", model_keys), ("data", PREPROCESSING)):
        for key in keys:
            mine, theirs = getattr(getattr(first, section), key), getattr(getattr(other, section), key)
            if mine != theirs:
                return key, mine, theirs
    return None


def check_compatible(first_file: Path, first: Config, member_file: Path, member: Config) -> None:
    """Refuse, in one line naming both files and the key, a member whose preprocessing, dimensions, input channels or
    classes differ from the first member's (each config as its checkpoint states it); its network may differ."""
    difference = _difference(first, member)
    if difference is not None:
        key, mine, theirs = difference
        raise UserError(f"{member_file} cannot join an ensemble with {first_file}: {key} is {theirs!r} there and "
                        f"{mine!r} here; ensemble only models of the same preprocessing and classes (their networks "
                        "may differ)")


def ensemble_checksum(checksums: Sequence[str]) -> str:
    """The weights checksum of an ensemble: that of its one member, else a SHA-256 of the members' checksums in
    order (the order of the sum, which a mask's last bits can depend on)."""
    if len(checksums) == 1:
        return checksums[0]
    return hashlib.sha256(b"ensemble:" + ",".join(checksums).encode()).hexdigest()


def with_network(card: Mapping[str, Any] | None, model: ModelConfig) -> dict[str, Any] | None:
    """``card`` with what it says of its net (:data:`NETWORK_KEYS`) taken from ``model`` (the config its checkpoint
    stores) where it says nothing: cards written before the network was a choice are UNETR's. None stays None."""
    if card is None:
        return None
    return {**network_facts(model), **card} if "model_name" not in card else dict(card)


def ensemble_card(files: Sequence[Path], cards: Sequence[Mapping[str, Any] | None], checksums: Sequence[str],
                  models: Sequence[ModelConfig] | None = None) -> dict[str, Any] | None:
    """The model card of an ensemble: the first member's card (its data, spacing, classes) without what it says of
    that model alone, and ``ensemble``: per member its file, weights checksum, net (``models``: each member's config,
    :func:`~btcv_unetr.model.architectures.network_facts`), fold and validation. One member: its card (with its net)."""
    if len(files) == 1:
        return with_network(cards[0], models[0]) if models else (dict(cards[0]) if cards[0] is not None else None)
    members = [{"file": str(path), "weights_sha256": checksum, **(network_facts(models[index]) if models else {}),
                **{key: (card or {}).get(key) for key in MEMBER_KEYS}}
               for index, (path, card, checksum) in enumerate(zip(files, cards, checksums))]
    first = {key: value for key, value in (cards[0] or {}).items() if key not in (*SINGLE_MODEL_KEYS, *NETWORK_KEYS)}
    return {**first, "ensemble": members}
