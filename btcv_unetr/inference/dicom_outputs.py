"""The DICOM results of a DICOM series, one writer per format behind one table: what every PACS can show.

    DICOM_OUTPUTS      format name (``--output_format``) -> :class:`DicomOutput` (its file name, its writer)
    wanted_outputs     the DICOM outputs the flags ask for
    write_dicom_output one output of one case; a series the format cannot reference is one :class:`UserError` line
    warning_label      a description marked "NOT FOR CLINICAL USE: ..." when the model card warns (every writer's)

Each writer takes the labels ``(X, Y, Z)`` on the series' grid (as btcv_unetr.data.dicom reads it), that grid's RAS
affine, the series files stacked into it, the class names, the provenance of the mask and the model card's warning
(a phantom-trained model says so in every DICOM object it writes), and writes atomically. The writer's module is
imported only when its format is asked for: each needs its own extra.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.schema import InferConfig, output_formats


@dataclass(frozen=True)
class DicomOutput:
    format: str  # the --output_format value
    short: str  # its name in a service request (``store: ["seg", "rtstruct", "overlay"]``)
    kind: str  # its key among a case's outputs and a job's outputs
    ending: str  # CASE{ending}: a file, or a folder for a series of images
    job_file: str  # its name in a service job's folder
    writer: str  # "module:function" in btcv_unetr.inference
    what: str  # for messages


DICOM_OUTPUTS: dict[str, DicomOutput] = {o.format: o for o in (
    DicomOutput("dicom_seg", "seg", "seg", "_seg.dcm", "seg.dcm", "dicom_seg:write_dicom_seg", "DICOM SEG"),
    DicomOutput("dicom_rtstruct", "rtstruct", "rtstruct", "_rtstruct.dcm", "rtstruct.dcm",
                "dicom_rtstruct:write_dicom_rtstruct", "DICOM RTSTRUCT"),
    DicomOutput("dicom_overlay", "overlay", "overlay_series", "_overlay_dcm", "overlay_dcm",
                "dicom_overlay:write_dicom_overlay", "DICOM overlay series"),
)}


LO_LIMIT = 64  # characters of a DICOM LO value (SeriesDescription, ContentDescription)


def warning_label(warning: str | None, plain: str) -> str:
    """``plain`` without a warning; with one, its gist after "NOT FOR CLINICAL USE: ", cut to 64 characters (an LO
    such as SeriesDescription): what a PACS shows in its series list."""
    if not warning:
        return plain[:LO_LIMIT]
    text = warning.lower()
    if "phantom" in text:
        gist = "phantom-trained"
    elif "synthetic" in text:
        gist = "trained on synthetic data"
    elif "random" in text or "never trained" in text:
        gist = "untrained weights"
    else:
        gist = warning.removeprefix("WARNING:").strip()
    return f"NOT FOR CLINICAL USE: {gist}"[:LO_LIMIT]


BY_SHORT_NAME = {o.short: o for o in DICOM_OUTPUTS.values()}


def dicom_files(path: Path) -> list[Path]:
    """The DICOM files an output wrote at ``path``: the file, or a folder's files (the overlay series) in order."""
    return sorted(path.iterdir()) if path.is_dir() else [path]


def wanted_outputs(infer: InferConfig) -> list[DicomOutput]:
    """The DICOM outputs ``--output_format`` asks for, in the table's order."""
    formats = output_formats(infer)
    return [output for name, output in DICOM_OUTPUTS.items() if name in formats]


def write_dicom_output(output: DicomOutput, labels: np.ndarray, affine: np.ndarray, source_files: Sequence[Path],
                       names: Sequence[str], path: Path, provenance: Mapping | None = None,
                       warning: str | None = None) -> None:
    """Write ``output`` for one mask to ``path`` (a file, or a folder for the overlay series)."""
    module, function = output.writer.split(":")
    writer = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    writer(np.asarray(labels, dtype=np.uint8), affine, list(source_files), list(names), path,
           provenance=provenance, warning=warning)
