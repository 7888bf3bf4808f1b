"""The cases of an inference run: what --input or the datalist names, checked before any model runs, and the
names of the outputs each case writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.checks import Expected, dimension_problems
from ..data.datalist import case_name, load_config_split
from ..data.images import (
    IMAGE_SUFFIXES,
    Volume,
    dicom_series,
    image_shape,
    is_image_file,
    is_picture,
    mask_path,
    read_volume,
    write_dicom_series_as_nifti,
)
from ..errors import UserError
from .dicom_seg import SEG_SUFFIX, require_highdicom, series_files
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
    series = dicom_series(path)
    if not series:
        raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series in this folder")
    cases = []
    for uid in series:  # each series as NIfTI (SimpleITK keeps its geometry): the rest of the pipeline sees files
        nifti = scratch / f"{path.name}{'_' + uid[-8:] if len(series) > 1 else ''}.nii.gz"
        write_dicom_series_as_nifti(path, uid, nifti)
        cases.append(Case(case_name(nifti), nifti, dicom=tuple(series_files(path, uid))))
    return cases


def check_seg_inputs(cases: list[Case]) -> None:
    """``--output_format dicom_seg``: the dicom extra is installed and every case is a DICOM series, or one line."""
    require_highdicom()
    for case in cases:
        if not case.dicom:
            raise UserError(f"{case.image}: --output_format dicom_seg needs a DICOM series input (its folder of "
                            "files); for this file use --output_format nifti")


def check_image(path: Path, expected: Expected) -> None:
    """A readable image of an accepted format with the dimensions and colour channels the model takes,
    or a one-line error naming the file."""
    if not is_image_file(path):
        raise UserError(f"{path}: not an accepted image format ({', '.join(IMAGE_SUFFIXES)}); convert it, "
                        "or give a DICOM series as its folder")
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


def case_output_names(case: Case, out_dir: Path) -> list[str]:
    """The names of the files :func:`segment_case` may write for ``case``."""
    return [mask_path(out_dir, case.name, case.image).name, f"{case.name}{SEG_SUFFIX}",
            f"{case.name}_probabilities.npz", f"{case.name}_overlay.png"]


def check_distinct_outputs(cases: list[Case], out_dir: Path) -> None:
    """Two inputs whose masks would share one file (``a/case.nii.gz``, ``b/case.nii.gz``) are refused."""
    seen: dict[Path, Case] = {}
    for case in cases:
        target = mask_path(out_dir, case.name, case.image)
        if target in seen:
            raise UserError(f"{seen[target].image} and {case.image} would both write {target}: rename one, "
                            "or segment them into different --output_dir folders")
        seen[target] = case


def cases_to_segment(cases: list[Case], out_dir: Path, config: Config) -> tuple[list[Case], list[Case]]:
    """``(to segment, kept)``: a case whose outputs exist (mask, and SEG with dicom_seg) is kept unless
    ``--overwrite``; with ``--continue`` only when its mask is complete too (:func:`mask_problem`)."""
    infer = config.infer
    seg = infer.output_format == "dicom_seg"
    todo, kept = [], []
    for case in cases:
        mask = mask_path(out_dir, case.name, case.image)
        written = mask.exists() and (not seg or (out_dir / f"{case.name}{SEG_SUFFIX}").exists())
        problem = mask_problem(mask, case.image) if written and infer.continue_prediction else None
        if written and problem is None and not config.general.overwrite:
            print(f"{case.name}: {mask} is complete, kept (--continue)" if infer.continue_prediction else
                  f"{case.name}: {mask} exists, skipped (--overwrite replaces it)")
            kept.append(case)
        else:
            if problem is not None:
                print(f"{case.name}: {mask} is incomplete ({problem}): segmenting it again")
            todo.append(case)
    return todo, kept
