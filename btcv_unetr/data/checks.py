"""``btcv-unetr check-data``: read every datalist entry and report all problems at once.

Each problem is one line ``PATH: what is wrong`` (names escaped: :func:`~btcv_unetr.errors.one_line`). Training
runs these checks first and refuses to start on any problem, so a broken file is found in seconds, not hours into
a run. A file listed twice in a split is a problem (training would weigh it twice and cache every copy); each
file is read once however often it is listed.

Notes (``note: ...``) tell what is allowed but worth knowing: a file in both training and validation (its Dice
then overstates), 16-bit training pictures (each picture is scaled by its own bit depth).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import MAX_PIXELS, Config
from ..config.validation import parse_label_map
from ..errors import UserError, one_line
from .datalist import annotated_classes, base_dir_for, read_datalist, resolve_datalist, split_entries
from .images import (
    Volume,
    check_picture_size,
    header_affine,
    is_nifti,
    is_picture,
    nifti_header_problem,
    picture_header,
    read_nifti_header,
    read_volume,
    sform_qform_note,
    shear_problem,
)

SPLITS = ("training", "validation", "test")
AFFINE_TOLERANCE_MM = 1e-3

# The config flags of ``check-data``: the datalist, and what the model takes (dimensions, channels, classes).
CHECK_DATA_FLAGS: CommandFlags = {"model": ("spatial_dims", "in_channels", "out_channels"),
                                  "data": ("data_dir", "json_list", "label_map", "max_pixels")}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return one_line(f"{self.path}: {self.message}" if self.path else self.message)


def is_3d(shape: tuple[int, ...]) -> bool:
    """A 3D volume, possibly with one trailing singleton axis (X, Y, Z, 1), which MONAI reads as its channel; a fifth
    axis, even of 1, it cannot read (NIfTI's 5th is for vectors)."""
    return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)


@dataclass(frozen=True)
class Expected:
    """What the model takes: volumes (3) or pictures (2), with ``channels`` colour channels in 2D, pictures of at
    most ``max_pixels`` pixels (--max_pixels, checked from their headers)."""
    spatial_dims: int = 3
    channels: int = 1
    label_map: dict[int, int] | None = None
    max_pixels: int = MAX_PIXELS
    # The grid the model's preprocessing resamples onto (mm, axis codes): how sheared an affine it can map back
    # (:func:`~btcv_unetr.data.images.shear_problem`; None: isotropic voxels).
    pixdim: tuple[float, float, float] | None = None
    axcodes: str = "RAS"


def dimension_problems(path: Path, volume: Volume, expected: Expected, is_label: bool) -> list[Problem]:
    """The image's dimensions and colour channels against the model's, as one-line problems."""
    spatial = volume.spatial_shape
    if expected.spatial_dims == 3:
        if is_3d(spatial) and volume.components == 1:
            return []
        return [Problem(str(path), f"image is {len(spatial)}D with shape {volume.shape}, expected a 3D volume")]
    if len(spatial) != 2 and not (len(spatial) == 3 and spatial[2] == 1):
        return [Problem(str(path), f"image has {len(spatial)} spatial dimensions (shape {volume.shape}): a 2D model "
                                   "(spatial_dims 2) takes pictures")]
    channels = 1 if is_label else expected.channels
    if volume.components != channels:
        what = "a mask must be single-channel class indices" if is_label else \
            f"the model takes {channels} (in_channels {channels}): convert the picture or set --in_channels"
        return [Problem(str(path), f"{volume.components} colour channel(s); {what}")]
    return []


def axes_problem(path: Path, spatial_shape: tuple[int, ...]) -> str | None:
    """An MHA or NRRD of more than 3 axes, a 4th of 1 included (SimpleITK reads it without its geometry, and no
    mask can be written in it), as one line; None for others (NIfTI's (X, Y, Z, 1) reads as MONAI reads it)."""
    if is_nifti(path) or is_picture(path) or len(spatial_shape) <= 3:
        return None
    return (f"image is {len(spatial_shape)}D with shape {tuple(spatial_shape)}: save it as a 3D volume (an MHA or "
            "NRRD with more than 3 axes is read without its geometry)")


def header_problem(path: Path) -> str | None:
    """What a NIfTI's header declares that would fail late in library words or be read wrongly (its scaling:
    :func:`~btcv_unetr.data.images.nifti_header_problem`), read from its header alone; None for other files and
    for headers no reader takes (reading the file says why)."""
    if not is_nifti(path):
        return None
    try:
        header = read_nifti_header(path)
    except (OSError, ValueError, EOFError):
        return None
    return nifti_header_problem(header)


def geometry_notes(path: Path) -> list[str]:
    """What is worth knowing about a NIfTI's geometry (its sform and qform apart by more than a voxel), one line
    each; none for other files or unreadable headers."""
    if not is_nifti(path):
        return []
    try:
        note = sform_qform_note(read_nifti_header(path))
    except (OSError, ValueError, EOFError):
        return []
    return [note] if note else []


def scan_geometry_problem(path: Path, expected: Expected) -> str | None:
    """A 3D scan whose header's affine test.py could not map the mask back onto (sheared:
    :func:`~btcv_unetr.data.images.shear_problem`) as one line; None for pictures and 2D models."""
    if expected.spatial_dims != 3 or is_picture(path):
        return None
    return shear_problem(header_affine(path), expected.pixdim, expected.axcodes)


def _volume_problems(path: Path, expected: Expected = Expected(), is_label: bool = False) -> tuple[Volume | None,
                                                                                                list[Problem]]:
    if not path.exists():
        return None, [Problem(str(path), "file not found")]
    if path.is_dir():  # a DICOM series is a folder: test.py and the service read it, the training loader does not
        return None, [Problem(str(path), "a folder, not an image file: a datalist names image files (NIfTI, NRRD, "
                                         "MHA); convert a DICOM series to NIfTI first (test.py --input FOLDER "
                                         "segments one as it is)")]
    problem = header_problem(path)
    if problem:  # before the voxels: nibabel fails on some, applies others as they are
        return None, [Problem(str(path), problem)]
    try:
        if is_picture(path):  # its size from its header: a decoder allocates what the header declares
            check_picture_size(path, expected.max_pixels)
        volume = read_volume(path)
    except UserError as exc:  # its message names the file
        return None, [Problem("", str(exc))]
    except Exception as exc:  # nibabel and SimpleITK raise many types for corrupt files
        detail = (str(exc).strip().splitlines() or [""])[0]
        return None, [Problem(str(path), f"unreadable or truncated file ({exc.__class__.__name__}: {detail})")]
    problems = dimension_problems(path, volume, expected, is_label)
    for problem in (axes_problem(path, volume.spatial_shape), non_finite_problem(volume.data)):
        if problem:
            problems.append(Problem(str(path), problem))
    return volume, problems


def non_finite_problem(data: np.ndarray) -> str | None:
    """How many voxels of ``data`` are NaN, +inf or -inf (all alike: the model can use none of them, and the
    intensity window would turn an infinite one into a plausible value), as one line; None when none are."""
    if not np.issubdtype(data.dtype, np.floating):
        return None
    finite = np.isfinite(data)
    bad = int(finite.size - np.count_nonzero(finite))
    if not bad:
        return None
    nan = int(np.count_nonzero(np.isnan(data)))
    return (f"{bad} NaN or infinite voxels ({nan} NaN, {bad - nan} infinite): replace them, e.g. by the lowest "
            "intensity")


def _label_problems(label_path: Path, label: Volume, image_path: Path, image: Volume | None,
                    num_classes: int, label_map: dict[int, int] | None = None) -> list[Problem]:
    problems = []
    values = np.unique(label.data[np.isfinite(label.data)] if label.data.dtype.kind == "f" else label.data)
    if label_map is not None:
        unlisted = [v for v in values.tolist() if v not in label_map]
        if unlisted:
            problems.append(Problem(str(label_path), f"mask values {', '.join(f'{v:g}' for v in unlisted[:5])} are "
                                                     "not in --label_map"))
        values = np.asarray([label_map[v] for v in values.tolist() if v in label_map])
    bad = [v for v in values.tolist() if v < 0 or v >= num_classes or v != int(v)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(Problem(str(label_path), f"label values {shown} outside 0..{num_classes - 1}"))
    if image is not None:
        if image.spatial_shape[:3] != label.spatial_shape[:3]:
            problems.append(Problem(str(label_path), f"label shape {label.shape} differs from image shape "
                                                     f"{image.shape} ({image_path})"))
        elif not np.allclose(image.affine, label.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
            difference = float(np.abs(image.affine - label.affine).max())
            problems.append(Problem(str(label_path), f"affine differs from the image's by up to {difference:.3g} mm "
                                                     f"({image_path})"))
    return problems


def check_entry(entry: dict[str, str], num_classes: int, expected: Expected = Expected()) -> list[Problem]:
    """Problems of one ``{"image", "label"?, "classes"?}`` entry (paths already absolute)."""
    image_path = Path(entry["image"])
    image, problems = _volume_problems(image_path, expected)
    try:
        annotated_classes(entry, num_classes)
    except UserError as exc:
        problems.append(Problem("", str(exc)))
    if "label" in entry:
        label_path = Path(entry["label"])
        label, label_problems = _volume_problems(label_path, expected, is_label=True)
        problems += label_problems
        if label is not None and not label_problems:  # a mask of the wrong kind: its values mean nothing
            problems += _label_problems(label_path, label, image_path, image, num_classes, expected.label_map)
    return problems


def check_data(data_dir: str, json_list: str, num_classes: int, workers: int = 4,
               expected: Expected = Expected()) -> tuple[list[Problem], dict]:
    """Check the datalist and every file it names.

    Returns:
        (problems, counts): every problem found, and the number of entries per split.
    """
    try:
        datalist = resolve_datalist(data_dir, json_list)
        content = read_datalist(datalist)
        base_dir = base_dir_for(data_dir, datalist)
    except UserError as exc:
        return [Problem("", str(exc))], {}
    entries = [(split, entry) for split in SPLITS for entry in split_entries(content, split, base_dir)]
    counts = {split: len(content.get(split, [])) for split in SPLITS}
    problems = []
    if counts["training"] == 0:
        problems.append(Problem(str(datalist), "datalist has no 'training' entries"))
    problems += duplicate_problems(entries)
    unique = list({_entry_key(entry): entry for _, entry in entries}.values())  # each file read once
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found in pool.map(lambda entry: check_entry(entry, num_classes, expected), unique):
            problems.extend(found)
    # test.py segments the 'test' split: a scan it cannot map a mask back onto is a problem there (training and
    # validation resample it: data_notes says so).
    segmented = {_same_file(entry["image"]): entry["image"] for split, entry in entries if split == "test"}
    for path in segmented.values():
        problem = _readable_geometry_problem(Path(path), expected)
        if problem:
            problems.append(Problem(path, problem))
    return problems, counts


def _readable_geometry_problem(path: Path, expected: Expected) -> str | None:
    """:func:`scan_geometry_problem` of a file whose header reads; None for others (the checks say why)."""
    try:
        return scan_geometry_problem(path, expected) if path.is_file() else None
    except Exception:  # nibabel and SimpleITK raise many types for unreadable files
        return None


def _same_file(path: str) -> str:
    """The one name of a file however the datalist spells it (``a/../img.nii.gz``, a link to it)."""
    return os.path.realpath(path)


def _entry_key(entry: dict) -> str:
    return repr(sorted((key, _same_file(value) if key in ("image", "label") else repr(value))
                       for key, value in entry.items()))


def duplicate_problems(entries: list[tuple[str, dict[str, str]]]) -> list[Problem]:
    """One problem per image listed more than once in one split (``(split, entry)`` pairs, paths absolute), with its
    count: training would weigh it that many times and cache every copy; validation would score it that many
    times; inference would write its outputs twice."""
    problems = []
    for split in SPLITS:
        images = [entry["image"] for entry_split, entry in entries if entry_split == split]
        spelled = {}  # a file's first name in the datalist: the one shown
        listed = Counter()
        for image in images:
            spelled.setdefault(_same_file(image), image)
            listed[_same_file(image)] += 1
        for path, count in listed.items():
            if count > 1:
                problems.append(Problem(spelled[path], f"listed {count} times in '{split}': list each case once"))
    return problems


def data_notes(entries: list[tuple[str, dict[str, str]]], expected: Expected = Expected()) -> list[str]:
    """What is allowed but worth knowing, one line each: images in both training and validation, 16-bit
    training pictures, NIfTI files whose sform and qform disagree, and training or validation scans test.py could
    not segment for their sheared axes (all read from their headers).

    Pictures of mixed bit depths are a note, not a problem: each is scaled by its own bit depth (0..65535 or
    0..255 to 0..1), so an 8-bit and a 16-bit copy of one picture give the model the same input. A 16-bit file
    whose values fill 12 bits only (0..4095) looks dark to the model, hence the note.
    """
    notes = []
    training = {_same_file(e["image"]): e["image"] for split, e in entries if split == "training"}
    both = [training[path] for path in dict.fromkeys(_same_file(e["image"]) for split, e in entries
                                                     if split == "validation") if path in training]
    if both:
        notes.append(f"{len(both)} image(s) are in both 'training' and 'validation' (e.g. {both[0]}): validation "
                     "then scores cases the model trains on, and its Dice overstates")
    depths = Counter()
    example = None
    for path in training.values():
        if is_picture(path):
            try:
                bits = picture_header(path).bits
            except (OSError, ValueError):
                continue  # the checks say why
            depths[bits] += 1
            example = path if bits == 16 and example is None else example
    if depths[16]:
        mixed = f", {sum(depths.values()) - depths[16]} of fewer bits" if len(depths) > 1 else ""
        notes.append(f"{depths[16]} training picture(s) are 16-bit (e.g. {example}){mixed}: each picture is scaled "
                     "by its own bit depth (0..65535 or 0..255 to 0..1); one whose values fill fewer bits (a 12-bit "
                     "0..4095) looks dark to the model: stretch it to the full range")
    return [one_line(note) for note in notes + geometry_data_notes(entries, expected)]


def geometry_data_notes(entries: list[tuple[str, dict[str, str]]], expected: Expected = Expected()) -> list[str]:
    """Each NIfTI of the datalist whose sform and qform disagree (:func:`geometry_notes`), and each sheared scan of
    training or validation (they are resampled there; test.py refuses such a scan, as check-data does in 'test'), as
    ``PATH: note`` lines, from their headers."""
    notes = []
    files = {_same_file(entry[key]): entry[key] for _, entry in entries for key in ("image", "label") if key in entry}
    for path in files.values():
        notes += [f"{path}: {note}" for note in geometry_notes(Path(path))]
    resampled = {_same_file(e["image"]): e["image"] for split, e in entries if split in ("training", "validation")}
    for path in resampled.values():
        problem = _readable_geometry_problem(Path(path), expected)
        if problem:
            notes.append(f"{path}: test.py refuses this scan, training and validation resample it: {problem}")
    return notes


def config_data_notes(config: Config) -> list[str]:
    """:func:`data_notes` of the datalist the config names (none when it cannot be read: the checks say why)."""
    try:
        datalist = resolve_datalist(config.data.data_dir, config.data.json_list)
        content = read_datalist(datalist)
        base_dir = base_dir_for(config.data.data_dir, datalist)
    except UserError:
        return []
    return data_notes([(split, entry) for split in SPLITS for entry in split_entries(content, split, base_dir)],
                      config_expected(config))


def config_expected(config: Config) -> Expected:
    """What the config's model takes (:class:`Expected`), its preprocessed grid included."""
    label_map = parse_label_map(config.data.label_map) if config.data.label_map else None
    return Expected(config.model.spatial_dims, config.model.in_channels, label_map, config.data.max_pixels,
                    config.data.pixdim, config.data.axcodes)


def check_config_data(config: Config) -> tuple[list[Problem], dict]:
    expected = config_expected(config)
    return check_data(config.data.data_dir, config.data.json_list, config.model.out_channels,
                      workers=min(4, max(1, config.data.workers)), expected=expected)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config's flags of ``check-data`` (:data:`CHECK_DATA_FLAGS`): the datalist and what the model takes."""
    add_config_arguments(parser, CHECK_DATA_FLAGS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    problems, counts = check_config_data(config)
    for problem in problems:
        print(problem)
    for note in config_data_notes(config):
        print(f"note: {note}")
    if problems:
        print(f"check-data: {len(problems)} problem(s) found; fix them and run again")
        return 1
    print("check-data: OK, " + ", ".join(f"{n} {split}" for split, n in counts.items()) + " entries")
    return 0
