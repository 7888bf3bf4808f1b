"""Datalists (Decathlon format) and datasets (plain, RAM-cached or disk-cached).

A datalist is a JSON file with ``training`` and ``validation`` lists of ``{"image", "label"}``
entries and an optional ``test`` list whose entries may be plain image paths. Relative paths
resolve against ``data_dir`` when that folder exists, else against the JSON file's folder.

Cross-validation (``--fold K``): in a datalist whose ``training`` entries each carry an integer
``"fold"`` (the shipped ``btcv_folds_5fold.json``), fold K's entries validate and the others train;
its own ``validation`` list is then not used.

A datalist whose classes come in left/right pairs (faces: "left eye" is on the viewer's left) lists them as
``"mirror_pairs": [[2, 3], [4, 5]]``: a left-right flip in 2D training then swaps each pair's labels.

An entry whose label annotates only some organs lists them: ``"classes": [1, 6]`` (class numbers;
background always counts as annotated; without the key, every class is). Its other classes are
unknown, not background: training merges them into background (``loss.MarginalLoss``) and
validation does not score them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from torch.utils.data import Subset

from ..config.schema import DataConfig
from ..errors import UserError
from ..labels import BTCV_LABELS

BUILTIN_DATALISTS = Path(str(resources.files("btcv_unetr") / "dataset_json"))  # shipped in the package
LABELLED_SPLITS = ("training", "validation")


def case_name(path: str | Path) -> str:
    """``/data/imagesTr/img0035.nii.gz`` -> ``img0035`` (also strips ``.nii``, ``.mha``, ``.nrrd`` ...)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def resolve_datalist(data_dir: str, json_list: str) -> Path:
    """Find the datalist: ``json_list`` as a path, else in ``data_dir``, else among the shipped ones."""
    candidates = [Path(json_list), Path(data_dir) / json_list, BUILTIN_DATALISTS / json_list]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"datalist '{json_list}' not found in {data_dir}, the current folder or "
                    f"{BUILTIN_DATALISTS}: pass --json_list PATH or --data_dir DIR")


def base_dir_for(data_dir: str, datalist: Path) -> Path:
    """Folder that relative datalist paths resolve against: data_dir, else the datalist's own folder.

    A shipped datalist names files relative to a data folder the user has: without it, say so.
    """
    if Path(data_dir).is_dir():
        return Path(data_dir)
    if datalist.parent == BUILTIN_DATALISTS.resolve():
        raise UserError(f"data folder {data_dir} does not exist (the shipped datalist {datalist.name} names files "
                        "inside it): pass --data_dir DIR")
    return datalist.parent


def read_datalist(path: Path) -> dict[str, Any]:
    """Read and check a datalist's structure; raises :class:`UserError` naming the file and entry."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read datalist ({exc.__class__.__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: datalist is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: datalist must be a JSON object with 'training'/'validation' lists")
    pairs = content.get("mirror_pairs", [])
    if not isinstance(pairs, list) or any(not isinstance(pair, list) or len(pair) != 2 or
                                          any(type(c) is not int or c < 1 for c in pair) or pair[0] == pair[1]
                                          for pair in pairs):
        raise UserError(f"{path}: 'mirror_pairs' must be a list of [left, right] pairs of two different class "
                        f"numbers >= 1 (the classes a left-right flip swaps), got {pairs!r}")
    for split, entries in content.items():
        if split not in (*LABELLED_SPLITS, "test"):
            continue
        if not isinstance(entries, list):
            raise UserError(f"{path}: '{split}' must be a list")
        for index, entry in enumerate(entries):
            if split == "test" and isinstance(entry, str):
                continue
            required = ("image", "label") if split in LABELLED_SPLITS else ("image",)
            if not isinstance(entry, dict) or any(not isinstance(entry.get(key), str) for key in required):
                raise UserError(f"{path}: {split}[{index}] must be an object with string "
                                f"{' and '.join(repr(k) for k in required)} paths, got {entry!r}")
            classes = entry.get("classes", [])
            if not isinstance(classes, list) or any(type(c) is not int for c in classes):
                raise UserError(f"{path}: {split}[{index}] 'classes' must be a list of class numbers (the organs "
                                f"its label annotates), got {classes!r}")
    return content


def annotated_classes(entry: dict[str, Any], num_classes: int) -> np.ndarray:
    """``(num_classes,)`` booleans: the classes the entry's label annotates (its ``classes``, background
    always; all without the key). A number outside ``0..num_classes-1`` is a :class:`UserError`."""
    if "classes" not in entry:
        return np.ones(num_classes, bool)
    outside = [c for c in entry["classes"] if not 0 <= c < num_classes]
    if outside:
        raise UserError(f"{entry.get('label', entry['image'])}: its datalist entry's 'classes' "
                        f"{', '.join(map(str, outside))} are not classes 1..{num_classes - 1} of this model: "
                        "fix the datalist or --out_channels")
    known = np.zeros(num_classes, bool)
    known[[0, *entry["classes"]]] = True
    return known


def with_annotated_classes(entries: Sequence[dict], num_classes: int) -> list[dict]:
    """The entries, each with its ``annotated`` booleans ``(num_classes,)`` (batched to ``(B, C)``) when any
    entry names its ``classes`` (partly annotated data); unchanged otherwise."""
    if not any("classes" in entry for entry in entries):
        return list(entries)
    return [{**entry, "annotated": annotated_classes(entry, num_classes)} for entry in entries]


def split_entries(content: dict[str, Any], split: str, base_dir: Path) -> list[dict[str, str]]:
    """Entries of ``split`` in a checked datalist, with ``image``/``label`` paths joined to ``base_dir``.

    Plain-string entries (allowed in ``test``) become ``{"image": path}``; other keys (``fold``) are kept.
    """
    entries = [{"image": entry} if isinstance(entry, str) else dict(entry) for entry in content.get(split, [])]
    for entry in entries:
        for key in ("image", "label"):
            if key in entry:
                entry[key] = os.path.normpath(Path(base_dir) / entry[key])
    return entries


def datalist_folds(content: dict[str, Any], datalist: Path) -> list[int]:
    """The fold numbers of a checked datalist's ``training`` entries, sorted; every entry must carry an
    integer ``"fold"``, else one line naming the file and entry."""
    entries = content.get("training") or []
    if not any("fold" in entry for entry in entries):
        raise UserError(f"{datalist}: no 'training' entry carries a \"fold\": cross-validation (--fold, crossval) "
                        "needs a datalist whose entries do, such as btcv_folds_5fold.json")
    for index, entry in enumerate(entries):
        fold = entry.get("fold")
        if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
            raise UserError(f"{datalist}: training[{index}] needs a \"fold\" number >= 0 like the other entries, "
                            f"got {fold!r}")
    return sorted({entry["fold"] for entry in entries})


def with_fold(content: dict[str, Any], datalist: Path, fold: int | None) -> dict[str, Any]:
    """``content`` with fold ``fold``'s training entries as ``validation`` and the others as ``training``;
    unchanged for ``None`` or -1 (the datalist's own split). A fold the datalist lacks is one line."""
    if fold is None or fold == -1:
        return content
    folds = datalist_folds(content, datalist)
    if fold not in folds:
        raise UserError(f"--fold {fold}: {datalist} has folds {', '.join(map(str, folds))}: choose one of them")
    entries = content["training"]
    return {**content, "training": [entry for entry in entries if entry["fold"] != fold],
            "validation": [entry for entry in entries if entry["fold"] == fold]}


def load_split(datalist: Path, split: str, base_dir: Path, fold: int | None = None) -> list[dict[str, str]]:
    """The entries of one split with absolute paths (of cross-validation fold ``fold``, see
    :func:`with_fold`); an absent or empty split is an error."""
    content = with_fold(read_datalist(datalist), datalist, fold)
    if not content.get(split):
        present = [key for key in (*LABELLED_SPLITS, "test") if content.get(key)]
        raise UserError(f"{datalist}: no '{split}' entries (it has: {', '.join(present) or 'none'})")
    return split_entries(content, split, base_dir)


def class_names(data: DataConfig, num_classes: int) -> list[str]:
    """Names of classes 1..N-1 for reports: those of the datalist the config names (:func:`label_names`)."""
    try:
        labels = read_datalist(resolve_datalist(data.data_dir, data.json_list)).get("labels")
    except UserError:
        labels = None
    return label_names(labels, num_classes)


def mirror_pairs(data: DataConfig) -> tuple[tuple[int, int], ...]:
    """The ``mirror_pairs`` of the datalist the config names (classes a left-right flip swaps); none when it
    lists none or cannot be read (training reads it again and says why)."""
    try:
        pairs = read_datalist(resolve_datalist(data.data_dir, data.json_list)).get("mirror_pairs", [])
    except UserError:
        pairs = []
    return tuple((left, right) for left, right in pairs)


def label_names(labels: Any, num_classes: int) -> list[str]:
    """Names of classes 1..N-1: what a datalist's ``labels`` map (``{"1": "spleen", ...}``) says of each, else
    BTCV's organ for 14 classes, else ``class i``. The one fallback of every report, legend and bundle."""
    labels = labels if isinstance(labels, dict) else {}
    fallback = BTCV_LABELS if num_classes == len(BTCV_LABELS) else ()
    names = []
    for index in range(1, num_classes):
        name = labels.get(str(index))
        names.append(str(name) if name else fallback[index] if fallback else f"class {index}")
    return names


def load_config_split(data: DataConfig, split: str) -> list[dict[str, str]]:
    """Entries of ``split`` of the datalist named by the config (of its ``--fold``, if any)."""
    datalist = resolve_datalist(data.data_dir, data.json_list)
    return load_split(datalist, split, base_dir_for(data.data_dir, datalist), data.fold)


def make_dataset(items: Sequence[dict], transform: Callable, data: DataConfig) -> Dataset | Subset:
    """The dataset type chosen by the config.

    ``use_normal_dataset``: no caching; ``cache_dir``: deterministic transforms cached on disk
    (for datasets larger than RAM); otherwise a ``cache_rate`` fraction cached in RAM, each distinct item
    once (:func:`unique_items`). MONAI caches each item up to the first random transform, so augmentation
    stays random.
    """
    if data.use_normal_dataset:
        return Dataset(data=list(items), transform=transform)
    if data.cache_dir:
        Path(data.cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data=list(items), transform=transform, cache_dir=data.cache_dir)
    unique, order = unique_items(items)
    cached = CacheDataset(data=unique, transform=transform, cache_rate=data.cache_rate,
                          num_workers=data.workers or None)
    # A file listed twice (check-data refuses it for training) is cached once and drawn as often as it is listed.
    return cached if len(unique) == len(items) else Subset(cached, order)


def _item_key(item: dict) -> str:
    return repr(sorted((key, os.path.realpath(value) if key in ("image", "label") and isinstance(value, str)
                        else repr(value)) for key, value in item.items()))


def unique_items(items: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """``(unique, order)``: each distinct item once (the same files and keys, however the paths are spelled), in
    first-seen order, and for every item of ``items`` the index of its copy in ``unique``."""
    index: dict[str, int] = {}
    unique, order = [], []
    for item in items:
        key = _item_key(item)
        if key not in index:
            index[key] = len(unique)
            unique.append(item)
        order.append(index[key])
    return unique, order
