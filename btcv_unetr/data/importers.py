"""``btcv-unetr import FORMAT SRC --out DIR``: public CT datasets as datalists in BTCV's numbering.

    btcv-unetr import totalsegmentator /data/Totalsegmentator_dataset_v201 --out /data/totalseg_btcv
    btcv-unetr import amos /data/amos22 --out /data/amos_btcv
    btcv-unetr import msd /data/Task09_Spleen --download --out /data/spleen_btcv
    btcv-unetr import nnunet /data/nnUNet_raw/Dataset123_Abdomen --out /data/abdomen_btcv

Every source structure becomes a BTCV class by its *name*, in one table per format; a structure
BTCV does not segment (AMOS's duodenum, a TotalSegmentator rib) is background. The labels are
rewritten in BTCV numbering as ``DIR/labels/CASE.nii.gz`` (each written once, atomically, in its
image's geometry); the images stay where they are, named by absolute path. ``DIR/dataset.json``
lists them; an entry whose label annotates only some of the 13 organs names them in
``"classes"``: the others are unknown in that case, not background (``loss.MarginalLoss``).

Layouts:
  totalsegmentator  SUBJECT/ct.nii.gz and SUBJECT/segmentations/STRUCTURE.nii.gz (binary masks, v1 and v2
                    names), meta.csv's ``split`` column (train/val/test) when present
  amos              dataset.json (AMOS's 15 label names) with its training/validation/test lists; CT only
  msd               a Decathlon task folder: dataset.json with its training/test lists (Task03_Liver,
                    Task07_Pancreas, Task09_Spleen; the tumour label folded into the organ); ``--download``
                    fetches these through monai.apps, checked against MONAI's MD5
  nnunet            an nnU-Net raw dataset: imagesTr/CASE_0000.EXT, labelsTr/CASE.EXT, imagesTs, and a
                    dataset.json whose ``labels`` name each value (v2 name -> value, or v1 value -> name)
Sources without a labelled validation split (msd, nnunet, totalsegmentator without meta.csv) hold out
``--val_fraction`` of their training cases, evenly spread over the sorted case names.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import UserError
from ..files import atomic_save_nifti, atomic_write_json
from ..labels import BTCV_LABELS, ORGANS, label_map
from ..logs import with_progress
from .images import image_suffix, read_volume

FORMATS = ("totalsegmentator", "amos", "msd", "nnunet")
BTCV_CLASS = {name: index for index, name in enumerate(BTCV_LABELS)}
BACKGROUND = "background"
AFFINE_TOLERANCE_MM = 1e-3  # as check-data's

# TotalSegmentator's mask file names (v1 and v2 share them) -> BTCV organ.
TOTALSEGMENTATOR = {
    "spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney",
    "gallbladder": "gallbladder", "esophagus": "esophagus", "liver": "liver", "stomach": "stomach",
    "aorta": "aorta", "inferior_vena_cava": "inferior vena cava",
    "portal_vein_and_splenic_vein": "portal and splenic veins", "pancreas": "pancreas",
    "adrenal_gland_right": "right adrenal gland", "adrenal_gland_left": "left adrenal gland",
}
# AMOS's dataset.json label names, spelt as AMOS spells them -> BTCV organ (background: not one of BTCV's).
AMOS = {
    "background": BACKGROUND, "spleen": "spleen", "right kidney": "right kidney", "left kidney": "left kidney",
    "gall bladder": "gallbladder", "esophagus": "esophagus", "liver": "liver", "stomach": "stomach",
    "arota": "aorta", "postcava": "inferior vena cava", "pancreas": "pancreas",
    "right adrenal gland": "right adrenal gland", "left adrenal gland": "left adrenal gland",
    "duodenum": BACKGROUND, "bladder": BACKGROUND, "prostate/uterus": BACKGROUND,
}
# AMOS's readme: case numbers above 500 are MRI scans, the others CT; BTCV's model takes CT.
AMOS_LAST_CT_CASE = 500
# The Decathlon tasks with BTCV organs: their dataset.json label names -> BTCV organ. "cancer" (Task03,
# Task07) lies inside the task's organ and is folded into it.
DECATHLON = {
    "Task03_Liver": {"background": BACKGROUND, "liver": "liver", "cancer": "liver"},
    "Task07_Pancreas": {"background": BACKGROUND, "pancreas": "pancreas", "cancer": "pancreas"},
    "Task09_Spleen": {"background": BACKGROUND, "spleen": "spleen"},
}
# nnU-Net label names are the dataset author's: matched with word order, case and punctuation ignored
# (kidney_right = Right Kidney) against these spellings, BTCV's and the formats' above included.
NNUNET_SPELLINGS = {
    "spleen": ("spleen",),
    "right kidney": ("right kidney", "kidney r", "r kidney"),
    "left kidney": ("left kidney", "kidney l", "l kidney"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "esophagus": ("esophagus", "oesophagus"),
    "liver": ("liver",),
    "stomach": ("stomach",),
    "aorta": ("aorta", "arota"),
    "inferior vena cava": ("inferior vena cava", "ivc", "postcava"),
    "portal and splenic veins": ("portal and splenic veins", "portal and splenic vein",
                                 "portal vein and splenic vein", "portal splenic vein"),
    "pancreas": ("pancreas",),
    "right adrenal gland": ("right adrenal gland", "right adrenal", "adrenal gland r"),
    "left adrenal gland": ("left adrenal gland", "left adrenal", "adrenal gland l"),
}
TUMOUR_WORDS = {"cancer", "tumour", "tumor", "tumours", "tumors", "lesion", "lesions"}
SPLITS = {"train": "training", "val": "validation", "test": "test"}  # TotalSegmentator meta.csv -> datalist


def spelling_key(name: str) -> str:
    """``Kidney_Right`` and ``right kidney`` -> ``kidney right``: lower case, words sorted, punctuation dropped."""
    return " ".join(sorted(re.findall(r"[a-z0-9]+", name.lower())))


NNUNET = {spelling_key(spelling): organ for organ, spellings in NNUNET_SPELLINGS.items() for spelling in spellings}


@dataclass(frozen=True)
class Case:
    """One scan of the source: its label as a label map (``label``) or as binary masks (``masks``: file, BTCV
    class), or neither (an unlabelled test scan)."""

    name: str
    image: Path
    split: str
    label: Path | None = None
    masks: tuple[tuple[Path, int], ...] = ()


@dataclass
class Source:
    """A dataset read from its layout: the cases, the label-map value -> BTCV class table (label maps), the
    source name -> BTCV name mapping to report, and notes for the user."""

    cases: list[Case]
    values: dict[int, int]
    mapping: dict[str, str]
    notes: list[str]


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: not {what} (no {path.name}): pass the dataset's own folder")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict):
        raise UserError(f"{path}: no 'labels' object naming the label values: not {what}")
    return content


def label_names(content: dict, path: Path) -> dict[int, str]:
    """Label value -> name from a dataset.json ``labels``: Decathlon / nnU-Net v1 ``{"1": "liver"}`` or
    nnU-Net v2 ``{"liver": 1}``. nnU-Net's region labels (a list of values) are refused."""
    labels = content["labels"]
    if all(re.fullmatch(r"\d+", str(key)) for key in labels):
        return {int(key): str(name) for key, name in labels.items()}
    names = {}
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{path}: label '{name}' is {value!r}, not one value (nnU-Net region labels cannot be "
                            "imported): give each structure its own value")
        names[value] = name
    return names


def map_values(names: Mapping[int, str], table: Mapping[str, str], key: Callable[[str], str],
               path: Path, what: str) -> tuple[dict[int, int], dict[str, str]]:
    """Label value -> BTCV class, and source name -> BTCV name, by ``table[key(name)]``; a name the table
    lacks is one line naming it."""
    values, mapping = {}, {}
    for value, name in sorted(names.items()):
        organ = table.get(key(name))
        if organ is None:
            raise UserError(f"{path}: label {value} '{name}' is not one of {what}'s structures "
                            f"({', '.join(sorted(set(table) - {BACKGROUND}))}): is this {what}?")
        values[value], mapping[name] = BTCV_CLASS[organ], organ
    if 0 not in values or values[0] != 0:
        raise UserError(f"{path}: label 0 must be the background, got {names.get(0)!r}")
    return values, mapping


def hold_out(cases: list[Case], fraction: float) -> list[Case]:
    """The cases with ``fraction`` of the training ones (at least one, if two or more) moved to validation,
    evenly spread over the sorted names: deterministic, and not all from one end of the numbering."""
    training = sorted((case for case in cases if case.split == "training"), key=lambda case: case.name)
    count = max(0, min(len(training) - 1, max(1, round(len(training) * fraction)))) if fraction > 0 else 0
    chosen = {training[int((index + 0.5) * len(training) / count)].name for index in range(count)}
    return [Case(case.name, case.image, "validation", case.label, case.masks) if case.name in chosen else case
            for case in cases]


def split_of_subjects(src: Path) -> dict[str, str]:
    """TotalSegmentator's meta.csv (``;``-separated): subject -> datalist split; empty without the file."""
    meta = src / "meta.csv"
    if not meta.is_file():
        return {}
    text = meta.read_text()
    if not text.strip():
        return {}
    rows = csv.DictReader(text.splitlines(), delimiter=";" if ";" in text.splitlines()[0] else ",")
    if not {"image_id", "split"} <= set(rows.fieldnames or ()):
        raise UserError(f"{meta}: needs the columns image_id and split (train, val, test), has {rows.fieldnames}")
    return {row["image_id"]: SPLITS.get(row["split"], "training") for row in rows}


def totalsegmentator_source(src: Path, val_fraction: float) -> Source:
    """Subject folders holding ``ct.nii.gz`` and ``segmentations/``; the masks of BTCV's 13 by file name."""
    subjects = sorted(path for path in src.iterdir() if (path / "ct.nii.gz").is_file() and
                      (path / "segmentations").is_dir()) if src.is_dir() else []
    if not subjects:
        raise UserError(f"{src}: not a TotalSegmentator dataset folder: no subject folder holds ct.nii.gz and "
                        "segmentations/ (expected SRC/s0000/ct.nii.gz, SRC/s0000/segmentations/liver.nii.gz ...)")
    splits, cases, notes = split_of_subjects(src), [], []
    for subject in subjects:
        masks = tuple((subject / "segmentations" / f"{structure}.nii.gz", BTCV_CLASS[organ])
                      for structure, organ in TOTALSEGMENTATOR.items()
                      if (subject / "segmentations" / f"{structure}.nii.gz").is_file())
        if not masks:
            notes.append(f"{subject.name}: none of the 13 organs' masks; left out")
            continue
        cases.append(Case(subject.name, subject / "ct.nii.gz", splits.get(subject.name, "training"), masks=masks))
    if not splits:
        cases = hold_out(cases, val_fraction)
    return Source(cases, {}, dict(TOTALSEGMENTATOR), notes)


def listed_cases(src: Path, content: dict, split: str, to: str, path: Path) -> list[Case]:
    """The cases of a Decathlon-style list (``{"image", "label"}`` entries, or image paths in ``test``)."""
    cases = []
    for entry in content.get(split) or []:
        image = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image, str) or (to != "test" and not isinstance(label, str)):
            raise UserError(f"{path}: a '{split}' entry lacks its image or label path: {entry!r}")
        if Path(image).name.startswith("._"):  # macOS resource forks that some Decathlon archives carry
            continue
        name = Path(image).name[: -len(image_suffix(image))]
        cases.append(Case(name, (src / image).resolve(), to, (src / label).resolve() if to != "test" else None))
    return cases


def amos_source(src: Path, val_fraction: float) -> Source:
    """AMOS: its dataset.json's label names and lists; its MRI cases (numbers above 500) left out."""
    path = src / "dataset.json"
    content = read_json(path, "an AMOS dataset folder")
    values, mapping = map_values(label_names(content, path), AMOS, str.lower, path, "AMOS")
    cases = [case for split, to in (("training", "training"), ("validation", "validation"), ("test", "test"))
             for case in listed_cases(src, content, split, to, path)]
    ct = [case for case in cases if not re.fullmatch(r"amos_\d+", case.name) or
          int(case.name.split("_")[1]) <= AMOS_LAST_CT_CASE]
    notes = []
    if len(ct) < len(cases):
        notes.append(f"{len(cases) - len(ct)} MRI case(s) left out (AMOS numbers its MRI scans above "
                     f"{AMOS_LAST_CT_CASE})")
    if not any(case.split == "validation" for case in ct):
        ct = hold_out(ct, val_fraction)
    return Source(ct, values, mapping, notes)


def msd_source(src: Path, val_fraction: float) -> Source:
    """A Decathlon task with BTCV organs (identified by its label names); its tumour folded into the organ."""
    path = src / "dataset.json"
    content = read_json(path, "a Decathlon task folder")
    names = label_names(content, path)
    found = {name.lower() for name in names.values()}
    task = next((task for task, table in DECATHLON.items() if set(table) == found), None)
    if task is None:
        raise UserError(f"{path}: labels {', '.join(sorted(found))} are not those of a Decathlon task with BTCV "
                        f"organs ({', '.join(DECATHLON)})")
    values, mapping = map_values(names, DECATHLON[task], str.lower, path, task)
    cases = listed_cases(src, content, "training", "training", path) + listed_cases(src, content, "test", "test", path)
    return Source(hold_out(cases, val_fraction), values, mapping, [])


def nnunet_mapping(names: Mapping[int, str], path: Path) -> tuple[dict[int, int], dict[str, str], list[str]]:
    """nnU-Net label names -> BTCV by :data:`NNUNET`; other names are background, except a tumour name in a set
    of one organ, which is folded into it."""
    organs = {value: NNUNET.get(spelling_key(name)) for value, name in names.items() if value != 0}
    found = {organ for organ in organs.values() if organ}
    table, notes = {}, []
    for value, name in names.items():
        organ = BACKGROUND if value == 0 else organs[value]
        if organ is None and len(found) == 1 and set(spelling_key(name).split()) & TUMOUR_WORDS:
            organ = next(iter(found))
            notes.append(f"'{name}' (label {value}) lies in the set's only organ: folded into {organ}")
        table[name] = organ or BACKGROUND
    values, mapping = map_values(names, table, lambda name: name, path, "this dataset")
    return values, mapping, notes


def nnunet_source(src: Path, val_fraction: float) -> Source:
    """An nnU-Net raw dataset: one CT channel (``_0000``), labels named in dataset.json."""
    path = src / "dataset.json"
    content = read_json(path, "an nnU-Net raw dataset folder")
    channels = content.get("channel_names") or content.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise UserError(f"{path}: {len(channels)} input channels ({', '.join(map(str, channels.values()))}); the "
                        "model takes one CT channel")
    ending = content.get("file_ending", ".nii.gz")
    values, mapping, notes = nnunet_mapping(label_names(content, path), path)
    cases = []
    for folder, split in (("labelsTr", "training"), ("imagesTs", "test")):
        pattern = f"*{ending}" if split == "training" else f"*_0000{ending}"
        for file in sorted((src / folder).glob(pattern)):
            name = file.name[: -len(ending)].removesuffix("_0000")
            image = src / ("imagesTr" if split == "training" else "imagesTs") / f"{name}_0000{ending}"
            if not image.is_file():
                raise UserError(f"{file}: no image {image}: not an nnU-Net raw dataset (images are "
                                f"imagesTr/CASE_0000{ending})")
            cases.append(Case(name, image.resolve(), split, file.resolve() if split == "training" else None))
    if not any(case.split == "training" for case in cases):
        raise UserError(f"{src}: no labelsTr/*{ending} files: not an nnU-Net raw dataset folder")
    return Source(hold_out(cases, val_fraction), values, mapping, notes)


SOURCES: dict[str, Callable[[Path, float], Source]] = {
    "totalsegmentator": totalsegmentator_source, "amos": amos_source, "msd": msd_source, "nnunet": nnunet_source}


def save_label(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A uint8 NIfTI label map with the image's RAS affine (qform and sform), written atomically."""
    image = nib.Nifti1Image(labels.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    atomic_save_nifti(image, path)


def remapped_label(case: Case, values: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A label map's voxels in BTCV numbering and its affine; a value dataset.json does not name is one line."""
    volume = read_volume(case.label)
    data = np.asarray(volume.data)
    found = np.unique(data)
    unknown = [v for v in found.tolist() if v != int(v) or int(v) not in values]
    if unknown:
        raise UserError(f"{case.label}: label values {', '.join(f'{v:g}' for v in unknown[:5])} are not named in "
                        "the dataset's dataset.json labels")
    table = np.zeros(int(found.max()) + 1, np.uint8)
    for value, klass in values.items():
        if value < len(table):
            table[value] = klass
    return table[data if data.dtype.kind in "ui" else data.astype(np.int32)], volume.affine


def combined_masks(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks on the image's grid as one BTCV label map (a voxel in two masks takes the later class in
    BTCV order) and the image's affine; a mask on another grid is one line."""
    image = nib.load(str(case.image))
    labels = np.zeros(image.shape[:3], np.uint8)
    for path, klass in case.masks:
        mask = nib.load(str(path))
        if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=AFFINE_TOLERANCE_MM):
            raise UserError(f"{path}: mask grid {mask.shape} differs from its CT's {image.shape} ({case.image}): "
                            "re-export the mask on the CT's grid")
        labels[np.asarray(mask.dataobj).reshape(labels.shape) > 0] = klass
    return labels, image.affine


def write_case(case: Case, source: Source, out: Path) -> dict:
    """The case's datalist entry, its label (if any) written to ``out/labels/NAME.nii.gz``."""
    entry: dict = {"image": str(case.image)}
    if case.label is None and not case.masks:
        return entry
    labels, affine = combined_masks(case) if case.masks else remapped_label(case, source.values)
    relative = f"labels/{case.name}.nii.gz"
    save_label(labels, affine, out / relative)
    classes = sorted({klass for _, klass in case.masks} if case.masks else set(source.values.values()) - {0})
    entry["label"] = relative
    if len(classes) < len(ORGANS):  # without the key every organ counts as annotated
        entry["classes"] = classes
    return entry


def import_dataset(fmt: str, src: Path, out: Path, val_fraction: float = 0.2, workers: int = 4,
                   progress: bool = True) -> tuple[Path, Source, dict]:
    """Read ``src`` in layout ``fmt``, write the labels and ``out/dataset.json``; returns (datalist, source, it)."""
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out} is the source folder: choose another folder for the imported datalist")
    source = SOURCES[fmt](src, val_fraction)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = list(with_progress(pool.map(lambda case: write_case(case, source, out), source.cases),
                                     progress, "cases"))
    splits = {split: [entry for entry, case in zip(entries, source.cases) if case.split == split]
              for split in ("training", "validation", "test")}
    datalist = {
        "name": f"{src.name} (BTCV numbering)",
        "description": f"imported by btcv-unetr import {fmt} from {src.resolve()}",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": label_map(),
        "imported": {"format": fmt, "source": str(src.resolve()), "structures": source.mapping},
        "numTraining": len(splits["training"]), "numValidation": len(splits["validation"]),
        "numTest": len(splits["test"]), **splits,
    }
    path = out / "dataset.json"
    atomic_write_json(path, datalist)
    return path, source, datalist


def download_decathlon(task_dir: Path, progress: bool = True) -> None:
    """Fetch and unpack a Decathlon task with BTCV organs into ``task_dir`` (named after the task) through
    monai.apps, checked against MONAI's MD5; nothing is kept when the download or its checksum fails.

    The archive is downloaded and unpacked in a temporary folder beside ``task_dir`` (same disk), then
    the task folder is renamed into place: a folder named after the task is always a complete one.
    """
    # download_url and extractall, not download_and_extract: that one needs `requests` to name the file
    from monai.apps.datasets import DecathlonDataset
    from monai.apps.utils import HashCheckError, download_url, extractall

    task = task_dir.name
    if task not in DECATHLON:
        raise UserError(f"--download: {task_dir} must be named after the task to fetch: one of {', '.join(DECATHLON)}")
    if (task_dir / "dataset.json").is_file():
        print(f"{task_dir} is already there: not downloaded again")
        return
    if task_dir.exists() and any(task_dir.iterdir()):
        raise UserError(f"{task_dir} exists without a dataset.json: remove it or choose another folder")
    url, md5 = DecathlonDataset.resource[task], DecathlonDataset.md5[task]
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{task}.download.", dir=task_dir.parent) as tmp:
        try:
            download_url(url, filepath=Path(tmp) / f"{task}.tar", hash_val=md5, hash_type="md5", progress=progress)
            extractall(Path(tmp) / f"{task}.tar", output_dir=tmp)
        except HashCheckError:
            raise UserError(f"{url}: the download does not match its MD5 {md5} (corrupted or changed); nothing was "
                            "kept: try again") from None
        except OSError as exc:
            raise UserError(f"cannot download {url} ({getattr(exc, 'reason', None) or exc}): download and unpack "
                            f"it yourself into {task_dir.parent}, then run without --download") from None
        if not (Path(tmp) / task / "dataset.json").is_file():
            raise UserError(f"{url}: the archive holds no {task}/dataset.json; nothing was kept")
        os.replace(Path(tmp) / task, task_dir)


def describe(source: Source, datalist: dict, path: Path) -> list[str]:
    """What the import did, for the user: the name mapping, the notes, the counts and what to run next."""
    lines = [f"  {name} -> {organ}" for name, organ in source.mapping.items() if organ != BACKGROUND]
    others = [name for name, organ in source.mapping.items() if organ == BACKGROUND and name != BACKGROUND]
    if others:
        lines.append(f"  background (not BTCV organs): {', '.join(others)}")
    labelled = [entry for split in ("training", "validation", "test") for entry in datalist[split] if "label" in entry]
    annotated = {c for entry in labelled for c in entry.get("classes", range(1, len(BTCV_LABELS)))}
    missing = [BTCV_LABELS[c] for c in range(1, len(BTCV_LABELS)) if c not in annotated]
    partial = sum("classes" in entry for entry in labelled)
    lines += [f"  note: {note}" for note in source.notes]
    if missing:
        lines.append(f"  never annotated (unknown, not background): {', '.join(missing)}")
    lines.append(f"wrote {path}: {datalist['numTraining']} training, {datalist['numValidation']} validation, "
                 f"{datalist['numTest']} test cases; {partial} of {len(labelled)} labelled cases annotate only some "
                 "organs (their 'classes'), the others all 13")
    lines.append(f"next: btcv-unetr check-data --data_dir {path.parent} --json_list {path.name}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, metavar="FORMAT", help=f"the source's layout: {', '.join(FORMATS)}")
    parser.add_argument("src", metavar="SRC", help="the dataset's folder (with --download: where the task goes, "
                                                   "named after it, e.g. data/Task09_Spleen)")
    parser.add_argument("--out", required=True, help="folder for dataset.json and labels/ (not SRC)")
    parser.add_argument("--download", action="store_true",
                        help=f"msd only: fetch the task first ({', '.join(DECATHLON)}), checked against its MD5")
    parser.add_argument("--val_fraction", type=float, default=0.2,
                        help="share of the training cases held out for validation when the source has no "
                             "labelled validation split (default 0.2)")
    parser.add_argument("--workers", type=int, default=4, help="cases converted at once (default 4)")


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val_fraction {args.val_fraction} must be at least 0 and below 1")
    if args.download:
        if args.format != "msd":
            raise UserError(f"--download fetches only the Decathlon tasks ({', '.join(DECATHLON)}): download "
                            f"{args.format} yourself and pass its folder")
        download_decathlon(src)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder" + (" (msd: add --download to fetch it)" if args.format == "msd"
                                                    else ""))
    path, source, datalist = import_dataset(args.format, src, out, args.val_fraction, args.workers)
    print("\n".join(describe(source, datalist, path)))
    return 0
