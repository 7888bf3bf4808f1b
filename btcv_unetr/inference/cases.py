"""The cases of an inference run: what --input or the datalist names, checked before any model runs, and the
names of the outputs each case writes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.schema import Config
from ..data.checks import (
    Expected,
    axes_problem,
    dimension_problems,
    geometry_notes,
    header_problem,
    scan_geometry_problem,
)
from ..data.datalist import case_name, load_config_split
from ..data.dicom import check_modality, choose_series, find_series, read_series, write_series_as_nifti
from ..data.images import (
    IMAGE_SUFFIXES,
    Volume,
    check_picture_size,
    image_shape,
    is_image_file,
    is_picture,
    mask_path,
    read_volume,
)
from ..errors import UserError, one_line
from .dicom_outputs import DICOM_OUTPUTS, DicomOutput, wanted_outputs
from .dicom_seg import require_highdicom
from .parts import mask_problem


@dataclass
class Case:
    name: str
    image: Path
    label: Path | None = None
    dicom: tuple[Path, ...] = ()  # a DICOM input's series files: a SEG references them


def find_cases(config: Config, scratch: Path) -> list[Case]:
    """The scans to segment: ``--input`` (an image file, a folder of them or a DICOM folder), else the datalist split."""
    given = config.infer.input
    if given is None:
        entries = load_config_split(config.data, config.infer.split)
        return [Case(case_name(e["image"]), Path(e["image"]), Path(e["label"]) if "label" in e else None)
                for e in entries]
    path = Path(given)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_file():
        return [Case(case_name(path), path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
    if files:
        return [Case(case_name(p), p) for p in files]
    return [dicom_case(path, scratch, config.infer.series_uid, config.infer.any_modality)]


def dicom_case(folder: Path, scratch: Path, series_uid: str | None = None, any_modality: bool = False) -> Case:
    """The DICOM series of ``folder`` to segment (btcv_unetr.data.dicom: chosen, checked, stacked by position) as a
    NIfTI case in ``scratch``; the choice among several series and every repair of its geometry are printed."""
    found = find_series(folder)
    if not found:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series in this folder")
    series, listing = choose_series(found, str(folder), series_uid)
    if listing:
        print(listing, file=sys.stderr)
    check_modality(series, str(folder), allowed=any_modality)
    volume = read_series(series, str(folder))
    for note in volume.notes:
        print(f"note: {note}", file=sys.stderr)
    nifti = scratch / f"{folder.name}.nii.gz"
    write_series_as_nifti(volume, nifti)
    return Case(case_name(nifti), nifti, dicom=tuple(dict.fromkeys(s.path for s in volume.slices)))


def check_dicom_output_inputs(cases: list[Case], outputs: list[DicomOutput]) -> None:
    """DICOM outputs asked for: the dicom extra is installed and every case is a DICOM series, or one line."""
    if not outputs:
        return
    formats = ",".join(o.format for o in outputs)
    require_highdicom(f"--output_format {formats}")
    for case in cases:
        if not case.dicom:
            raise UserError(f"{case.image}: --output_format {formats} needs a DICOM series input (its folder of "
                            "files); for this file use --output_format nifti")


def check_image(path: Path, expected: Expected) -> list[str]:
    """A readable image of an accepted format with the dimensions and colour channels the model takes, a header
    whose scaling and geometry the model's way back to the scan can use, or a one-line error naming the file;
    checked from the header (pictures: read whole), before any window runs. Returns what is worth knowing about the
    file (its sform and qform apart), one line each."""
    if not is_image_file(path):
        raise UserError(f"{path}: not an accepted image format ({', '.join(IMAGE_SUFFIXES)}); convert it, "
                        "or give a DICOM series as its folder")
    if is_picture(path):  # its size from its header first: a decoder allocates what the header declares
        check_picture_size(path, expected.max_pixels)
    problem = header_problem(path)  # nibabel fails late on some scalings and applies others as they are
    if problem:
        raise UserError(f"{path}: {problem}")
    try:
        volume = read_volume(path) if is_picture(path) else None  # pictures are small: read them whole
        shape = volume.shape if volume is not None else image_shape(path)
    except Exception as exc:  # nibabel and SimpleITK raise several types for unreadable files
        raise UserError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None
    if volume is None:
        volume = Volume(tuple(shape), np.eye(4), np.empty(0), 1)
    problems = dimension_problems(path, volume, expected, is_label=False)
    if problems:
        raise UserError(str(problems[0]))
    try:
        problem = axes_problem(path, volume.spatial_shape) or scan_geometry_problem(path, expected)
    except Exception as exc:  # the header read above: only a file changed since could fail here
        raise UserError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None
    if problem:
        raise UserError(f"{path}: {problem}")
    return geometry_notes(path)


# The outputs besides the mask: file name after the case's output stem (see :func:`case_outputs`).
OUTPUT_ENDINGS = {**{o.kind: o.ending for o in DICOM_OUTPUTS.values()}, "probabilities": "_probabilities.npz",
                  "overlay": "_overlay.png"}
PLAIN_MASK_SUFFIXES = (".nii.gz", ".png")  # masks whose case's other outputs keep the plain case name


def output_stem(case: Case, out_dir: Path) -> str:
    """What a case's outputs besides its mask start with, named like its mask: the case name for a NIfTI or PNG
    mask (``case_overlay.png``), the case name and the mask's format otherwise (``case.nrrd_overlay.png`` beside
    ``case_seg.nrrd``), so that ``case.nii.gz`` and ``case.nrrd`` in one folder keep every output apart."""
    suffix = mask_path(out_dir, case.name, case.image).name.removeprefix(f"{case.name}_seg")
    return case.name if suffix in PLAIN_MASK_SUFFIXES else f"{case.name}{suffix}"


def case_outputs(case: Case, out_dir: Path) -> dict[str, Path]:
    """Every file :func:`~btcv_unetr.inference.batch.segment_case` may write for ``case``: ``mask`` (in the
    input's format, :func:`mask_path`), the DICOM outputs (``seg``, ``rtstruct``, ``overlay_series``: a folder),
    ``probabilities`` and ``overlay``."""
    stem = output_stem(case, out_dir)
    return {"mask": mask_path(out_dir, case.name, case.image),
            **{kind: out_dir / f"{stem}{ending}" for kind, ending in OUTPUT_ENDINGS.items()}}


def case_output_names(case: Case, out_dir: Path) -> list[str]:
    """The names of the files :func:`segment_case` may write for ``case``."""
    return [path.name for path in case_outputs(case, out_dir).values()]


def written_outputs(config: Config) -> tuple[str, ...]:
    """The kinds of :func:`case_outputs` that the flags have a run write."""
    infer = config.infer
    dicom = {o.kind for o in wanted_outputs(infer)}
    wanted = {"mask": True, **{o.kind: o.kind in dicom for o in DICOM_OUTPUTS.values()},
              "probabilities": infer.save_probabilities, "overlay": infer.overlay}
    return tuple(kind for kind, written in wanted.items() if written)


def check_distinct_outputs(cases: list[Case], out_dir: Path, kinds: tuple[str, ...] = ("mask",)) -> None:
    """Two inputs whose outputs of ``kinds`` (:func:`written_outputs`) would share a file are refused: one mask
    (``a/case.nii.gz``, ``b/case.nii.gz``), or one overlay (``case.nrrd.nii.gz``, ``case.nrrd``)."""
    seen: dict[Path, Case] = {}
    for case in cases:
        outputs = case_outputs(case, out_dir)
        for target in (outputs[kind] for kind in kinds):
            if target in seen:
                raise UserError(f"{seen[target].image} and {case.image} would both write {target}: rename one, "
                                "or segment them into different --output_dir folders")
            seen[target] = case


def cases_to_segment(cases: list[Case], out_dir: Path, config: Config) -> tuple[list[Case], list[Case]]:
    """``(to segment, kept)``: a case whose outputs exist (mask, and the DICOM outputs asked for) is kept unless
    ``--overwrite``; with ``--continue`` only when its mask is complete too (:func:`mask_problem`)."""
    infer = config.infer
    dicom = [o.kind for o in wanted_outputs(infer)]
    todo, kept = [], []
    for case in cases:
        outputs = case_outputs(case, out_dir)
        mask = outputs["mask"]
        written = mask.exists() and all(outputs[kind].exists() for kind in dicom)
        problem = mask_problem(mask, case.image) if written and infer.continue_prediction else None
        if written and problem is None and not config.general.overwrite:
            print(one_line(f"{case.name}: {mask} is complete, kept (--continue)" if infer.continue_prediction else
                           f"{case.name}: {mask} exists, skipped (--overwrite replaces it)"))
            kept.append(case)
        else:
            if problem is not None:
                print(one_line(f"{case.name}: {mask} is incomplete ({problem}): segmenting it again"))
            todo.append(case)
    return todo, kept
