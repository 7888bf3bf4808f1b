"""A batch inference run: every case of ``--input`` or the datalist, one ``CASE_seg.nii.gz`` (or the input's format) per
scan in the scan's own geometry, then the metrics report.

    segment_case   predict_case (predictor + post-processing) -> write_case_outputs (mask, SEG, probabilities)
                   -> write_case_overlay -> score_case against the label, if any
    run_inference  this process's share of the cases (torchrun ranks, --num_parts: parts.py), kept or resumed
                   outputs (--overwrite, --continue), failed cases listed at the end, the report on rank 0

The cases are found in cases.py, models loaded in loader.py, the sliding window and the way back to the scan's grid
are the predictor's (predictor.py, sliding_window.py, inversion.py); the command line is command.py.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from ..config.schema import Config
from ..config.validation import parse_label_map
from ..data.checks import Expected
from ..data.datalist import class_names
from ..data.images import image_shape, mask_path, read_volume, voxel_spacing, write_mask
from ..distributed import Context, barrier, gather_objects
from ..errors import UserError, one_line
from ..files import DiskFull, atomic_write, remove_stale_temporaries
from ..io.card import card_warning
from .cases import (
    Case,
    case_output_names,
    case_outputs,
    cases_to_segment,
    check_dicom_output_inputs,
    check_distinct_outputs,
    check_image,
    find_cases,
    written_outputs,
)
from .dicom_outputs import wanted_outputs, write_dicom_output
from .evaluate import CaseMetrics, case_metrics, format_summary, map_values, summarise, write_reports
from .parts import Part, held_output_folder
from .predictor import Predictor, keep_largest_components


def predict_case(predictor: Predictor, case: Case, config: Config) -> tuple[np.ndarray, np.ndarray | None]:
    """The case's labels on its scan's grid (largest components kept on request) and, with --save_probabilities,
    its float16 probabilities."""
    labels, probabilities = predictor.segment(case.image, keep_probabilities=config.infer.save_probabilities)
    if config.infer.largest_component:
        labels = keep_largest_components(labels, predictor.config.model.out_channels)
    picture = predictor.config.model.spatial_dims == 2
    scan_shape = read_volume(case.image).spatial_shape if picture else image_shape(case.image)[:3]
    if labels.shape != tuple(scan_shape):
        raise RuntimeError(f"inverted mask {labels.shape} does not match the input {tuple(scan_shape)}")
    return labels, probabilities


def write_case_outputs(predictor: Predictor, case: Case, labels: np.ndarray, probabilities: np.ndarray | None,
                       out_dir: Path, config: Config) -> Path:
    """The mask (with its provenance), the DICOM outputs and the probabilities the flags ask for; returns the mask's
    path. Each file is written under a temporary name and renamed; every name follows the mask's
    (:func:`case_outputs`)."""
    outputs = case_outputs(case, out_dir)
    mask_file = outputs["mask"]
    provenance = predictor.provenance()
    write_mask(labels, case.image, mask_file, provenance=provenance)
    dicom = wanted_outputs(config.infer)
    if dicom:  # case.image is the reader's NIfTI of the series: the labels' grid
        names = class_names(config.data, predictor.config.model.out_channels)
        affine, warning = nib.load(str(case.image)).affine, card_warning(predictor.model_card)
        for output in dicom:
            try:
                write_dicom_output(output, labels, affine, case.dicom, names, outputs[output.kind],
                                   provenance=provenance, warning=warning)
            except UserError as exc:  # the mask is the result; a series a format cannot reference costs that file
                print(one_line(f"warning: {case.name}: no {output.what} written: {exc}"), file=sys.stderr)
    if probabilities is not None:  # the temporary's name ends in .npz: numpy adds nothing to it
        atomic_write(outputs["probabilities"], lambda tmp: np.savez_compressed(tmp, probabilities=probabilities))
    return mask_file


def write_case_overlay(case: Case, labels: np.ndarray, names: list[str], out_dir: Path) -> None:
    """``CASE_overlay.png`` (named like the mask: :func:`case_outputs`): the mask over the picture, or over the
    scan's middle slices in display order, drawn as the service draws it."""
    from .plots import save_case_overlay  # matplotlib only when overlays are asked for
    save_case_overlay(case.image, labels, case_outputs(case, out_dir)["overlay"], title=case.name, names=names)


def segment_case(predictor: Predictor, case: Case, out_dir: Path, config: Config) -> CaseMetrics | None:
    """Segment one case and write its outputs; returns its metrics when it has a label."""
    started = time.time()
    labels, probabilities = predict_case(predictor, case, config)
    mask_file = write_case_outputs(predictor, case, labels, probabilities, out_dir, config)
    seconds = time.time() - started
    if config.infer.overlay:
        write_case_overlay(case, labels, class_names(config.data, predictor.config.model.out_channels), out_dir)
    print(one_line(f"{case.name}: {labels.shape} in {seconds:.1f} s -> {mask_file}"))
    if case.label is None:
        return None
    result = score_case(case, labels, predictor.config, config.infer.hd95)
    result.seconds = seconds
    return result


def score_case(case: Case, labels: np.ndarray, model_config: Config, distances: bool) -> CaseMetrics:
    """Metrics of ``labels`` (the case's mask on its scan's grid) against the case's label file; ``model_config``
    is the model's own (2D or 3D, classes, label map)."""
    picture = model_config.model.spatial_dims == 2
    label = read_volume(case.label)
    truth = np.asarray(label.data).reshape(label.spatial_shape).astype(np.int16)
    if picture and model_config.data.label_map:
        truth = map_values(truth, parse_label_map(model_config.data.label_map))
    spacing = (1.0, 1.0) if picture else voxel_spacing(label.affine)
    return case_metrics(case.name, labels, truth, spacing, model_config.model.out_channels, distances)


def remove_part_temporaries(out_dir: Path, part: Part, cases: list[Case], context: Context) -> None:
    """Rank 0 removes the temporaries a killed run left: all of them in a whole run, only its part's cases' in a
    part of a job array (the other parts are writing theirs); the other ranks wait, so that none of theirs goes."""
    if context.is_main:
        names = None if part.whole else {name for case in part.cases(cases)
                                         for name in case_output_names(case, out_dir)}
        remove_stale_temporaries(out_dir, names)
    barrier(context)


def load_predictor_if_needed(predictor: Predictor | None, todo: list[Case], kept: list[Case], config: Config,
                             context: Context) -> Predictor | None:
    """``predictor``, else one loaded when a case is to be segmented, or (``--continue``) a kept mask scored."""
    scoring = config.infer.continue_prediction and any(case.label is not None for case in kept)
    if predictor is not None or not (todo or scoring):
        return predictor
    # Every rank loads the same model: rank 0 alone prints its card.
    with contextlib.nullcontext() if context.is_main else contextlib.redirect_stdout(io.StringIO()):
        return Predictor(config)


def segment_cases(predictor: Predictor | None, todo: list[Case], out_dir: Path, config: Config,
                  stop_on_error: bool, progress: bool) -> tuple[list[CaseMetrics], list[str]]:
    """Segment ``todo``; returns the metrics of the labelled cases and the one-line errors of the failed ones
    (``stop_on_error``: the first error is raised)."""
    # The model's own config (a checkpoint carries it) says what it takes: 2D or 3D, colour channels, its grid.
    model = predictor.config if todo else None
    expected = Expected(model.model.spatial_dims, model.model.in_channels, max_pixels=config.data.max_pixels,
                        pixdim=model.data.pixdim, axcodes=model.data.axcodes) if model else None
    results, failures = [], []
    for case in tqdm(todo, desc="cases", unit="case", disable=len(todo) < 2 or not progress):
        try:
            for note in check_image(case.image, expected):  # tqdm.write: a line of its own under the progress bar
                tqdm.write(one_line(f"note: {case.image}: {note}"), file=sys.stderr)
            result = segment_case(predictor, case, out_dir, config)
        except UserError as exc:
            if stop_on_error or isinstance(exc, DiskFull):  # a full disk fails every case after it too
                raise
            tqdm.write(f"{one_line(case.name)}: failed: {exc}", file=sys.stderr)
            failures.append(str(exc))
            continue
        if result is not None:
            results.append(result)
    return results, failures


def score_kept(predictor: Predictor | None, kept: list[Case], out_dir: Path, config: Config) -> list[CaseMetrics]:
    """``--continue``: the metrics of the kept masks of labelled cases, read from their files (no seconds)."""
    results = []
    for case in kept:
        if case.label is not None:
            mask = read_volume(mask_path(out_dir, case.name, case.image))
            labels = np.asarray(mask.data).reshape(mask.spatial_shape)
            results.append(score_case(case, labels, predictor.config, config.infer.hd95))
    return results


Gathered = tuple[list[CaseMetrics], list[str], int | None]  # a process's metrics, failures, and classes


def report(gathered: list[Gathered], cases: list[Case], out_dir: Path, config: Config, part: Part) -> dict | None:
    """Rank 0: every process's metrics in the order of ``cases`` (as one process lists them), written to
    ``metrics.csv`` and ``summary.json`` by a whole run, printed by a part; then the failed cases, if any,
    as a one-line error. Returns the summary (None without labelled cases)."""
    order = {case.name: index for index, case in enumerate(cases)}
    results = sorted((result for metrics, _, _ in gathered for result in metrics), key=lambda r: order[r.case])
    failures = [failure for _, failed, _ in gathered for failure in failed]
    summary = None
    if results:
        classes = next(count for _, _, count in gathered if count is not None)
        names = class_names(config.data, classes)
        if part.whole:
            summary = write_reports(out_dir, results, classes, names)
        else:  # the other parts' cases are not known here
            summary = summarise(results, classes, names)
            print(f"{part}: the table covers this part's cases; once every part is done, the same command with "
                  "--continue instead of --num_parts/--part_id writes the report over all cases")
        print(format_summary(summary))
        if not math.isnan(summary["mean_organ_dice"]):
            print(f"Overall Mean Dice: {summary['mean_organ_dice']:.4f}")
    if failures:
        print("\n".join(["failed cases:"] + failures), file=sys.stderr)
        raise UserError(f"{len(failures)} of {len(part.cases(cases))} case(s) failed (listed above); the others "
                        "were written")
    return summary


def run_inference(config: Config, predictor: Predictor | None = None, context: Context | None = None) -> dict | None:
    """Segment every case, or this process's share of them (``--num_parts``/``--part_id``, torchrun's ranks:
    :class:`~btcv_unetr.inference.parts.Part`); finished masks are kept unless ``--overwrite`` (``--continue``: checked,
    and scored), failed cases listed at the end. Returns the summary on rank 0 (None elsewhere, or unlabelled).

    ``predictor`` is one already loaded (from ``config``); by default it is loaded when a case needs it.
    ``context`` is this process's torchrun world (default: this process alone).

    Every output is written to a temporary name and renamed, so an interrupted run leaves complete
    masks only, and running the same command again segments the rest.
    """
    context = context or Context(0, 1, 0, torch.device("cpu"))
    out_dir = Path(config.infer.output_dir)
    part = Part.of(config.infer, context)
    with held_output_folder(out_dir, part, context), tempfile.TemporaryDirectory() as scratch:
        cases = find_cases(config, Path(scratch))
        check_distinct_outputs(cases, out_dir, written_outputs(config))
        check_dicom_output_inputs(cases, wanted_outputs(config.infer))
        remove_part_temporaries(out_dir, part, cases, context)
        todo, kept = cases_to_segment(part.mine(cases), out_dir, config)
        predictor = load_predictor_if_needed(predictor, todo, kept, config, context)
        # One process stops at a lone case's error; ranks collect theirs, so that rank 0 reports them all.
        results, failures = segment_cases(predictor, todo, out_dir, config,
                                          stop_on_error=len(cases) == 1 and not context.distributed,
                                          progress=context.is_main)
        if config.infer.continue_prediction:
            results += score_kept(predictor, kept, out_dir, config)
        classes = predictor.config.model.out_channels if predictor is not None else None
        gathered = gather_objects((results, failures, classes), context)
        return report(gathered, cases, out_dir, config, part) if context.is_main else None


