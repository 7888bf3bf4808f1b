"""A coloured overlay series (DICOM Secondary Capture) for viewers that show neither SEG nor RTSTRUCT.

    soft_tissue_grey    CT in Hounsfield units -> uint8 grey through the soft-tissue window (W 400, L 40), as DICOM
                        defines a linear VOI window (PS3.3 C.11.2.1.2.1)
    draw_slice          one slice: the grey CT, each organ blended in its colour with its outline opaque, the
                        warning's lines on top, a legend of the organs present in the bottom-left corner
    write_dicom_overlay labels on the series' grid -> one RGB Secondary Capture image per source slice, as a new series
                        of the same study, atomically

The overlay is a picture of the result, burned in (BurnedInAnnotation YES): nothing in it can be measured or
edited, which is why SEG and RTSTRUCT exist; but every PACS and viewer shows it. Each image keeps its source slice's
ImagePositionPatient, ImageOrientationPatient, PixelSpacing and FrameOfReferenceUID, so that viewers that link series
by position scroll it with the CT, and references that slice (SourceImageSequence).

The CT shown is each source file's own pixels (decoded as btcv_unetr.data.dicom reads the series, GDCM through
SimpleITK), not the volume the model saw: a slice the reader interpolated over a gap has no file and gets no image.
The mask is ``(X, Y, Z)`` on the series' grid with its RAS affine, as for btcv_unetr.inference.dicom_seg.
Text (legend, warning) is drawn by matplotlib's Agg renderer: the ``plot`` extra.
"""

from __future__ import annotations

import datetime
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..data import dicom as reader
from ..data.images import LPS_TO_RAS
from ..errors import UserError
from ..files import atomic_write
from .dicom_outputs import warning_label
from .dicom_seg import COSINE_TOLERANCE, POSITION_TOLERANCE
from .plots import class_colours, legend_entries
from .provenance import network_of

SECONDARY_CAPTURE_IMAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
WINDOW = (40.0, 400.0)  # (level, width) in HU: soft tissue, the abdomen's usual window
ALPHA = 0.4  # an organ's colour over the CT inside it; its outline is opaque
SHADE = 0.35  # the CT under the warning's and the legend's text, darkened to this share so the text reads
WARNING_COLOUR = (255, 215, 0)  # yellow on the darkened CT: no organ colour and no grey
TEXT_COLOUR = (255, 255, 255)
MAX_WARNING_LINES = 4
NAME_PATTERN = re.compile(r"overlay_\d{4,}\.dcm")
EXTRA_LINE = ("--output_format dicom_overlay needs matplotlib to draw its legend and warning: "
              "pip install 'btcv-unetr[plot]'")
NIFTI_ONLY = "the mask is written as NIfTI only"


@dataclass
class _Source:
    """One source image (a file, or one frame of a multi-frame file) and the slice of the grid it is."""

    path: Path
    frame: int | None
    dataset: object  # pydicom Dataset without pixels
    plane: int
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,)
    spacing: np.ndarray  # (2,) between rows, between columns (mm)


def soft_tissue_grey(hu: np.ndarray, window: tuple[float, float] = WINDOW) -> np.ndarray:
    """``hu`` (any shape, Hounsfield units) as uint8 grey 0..255 through the linear window ``(level, width)``,
    DICOM's function: ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``, clipped, rounded to the nearest level."""
    level, width = window
    scaled = ((np.asarray(hu, dtype=np.float64) - (level - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _line_height(rows: int) -> int:
    """Pixel height of one text line on an image of ``rows`` rows: 1/32 of it (16 on a 512 slice), never below 10
    (legible on a 128 one)."""
    return max(10, int(round(rows / 32)))


def _ink(lines: Sequence[str], height: int) -> list[np.ndarray]:
    """Each of ``lines`` drawn in DejaVu Sans (matplotlib's own font: the same on every machine) as a ``(height,
    width)`` float32 coverage mask, 0 background to 1 ink, cut after its last inked column; one Agg figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import IdentityTransform
    if not lines:
        return []
    width = max(len(line) for line in lines) * height + 8  # wider than any glyph run: nothing is clipped
    total = height * len(lines)
    figure = Figure(figsize=(width / 72, total / 72), dpi=72, facecolor="black")  # 72 dpi: 1 point = 1 pixel
    canvas = FigureCanvasAgg(figure)
    for i, line in enumerate(lines):
        figure.text(1, total - (i + 0.5) * height, line, transform=IdentityTransform(), fontsize=0.72 * height,
                    family="DejaVu Sans", color="white", va="center_baseline", ha="left")
    canvas.draw()
    grey = np.asarray(canvas.buffer_rgba())[:total, :, 0].astype(np.float32) / 255.0
    masks = []
    for i in range(len(lines)):
        mask = grey[i * height:(i + 1) * height]
        inked = np.nonzero(mask.max(axis=0) > 0)[0]
        masks.append(mask[:, :inked[-1] + 1] if inked.size else mask[:, :1] * 0)
    return masks


def _warning_lines(warning: str, columns: int, height: int) -> list[np.ndarray]:
    """``warning`` wrapped to the image's width (at most MAX_WARNING_LINES lines, the last cut with an ellipsis),
    as coverage masks (:func:`_ink`)."""
    room = columns - 4
    whole = _ink([warning], height)[0]
    per_line = max(8, int(len(warning) * room / max(whole.shape[1], 1)))  # characters of an average width
    while True:
        lines = textwrap.wrap(warning, per_line) or [warning]
        if len(lines) > MAX_WARNING_LINES:
            lines = lines[:MAX_WARNING_LINES]
            lines[-1] = lines[-1][:max(per_line - 1, 1)] + "\u2026"
        masks = _ink(lines, height)
        # Capitals are wider than the average: narrower lines until each fits (a few tries at most).
        if per_line <= 8 or max(mask.shape[1] for mask in masks) <= room:
            return masks
        per_line = max(8, int(per_line * 0.9))


def _paint(rgb: np.ndarray, mask: np.ndarray, top: int, left: int, colour: Sequence[int]) -> None:
    """Blend ``colour`` into ``rgb`` (float, rows x columns x 3) by the coverage ``mask`` placed at (top, left),
    cut at the image's edges."""
    rows = min(mask.shape[0], rgb.shape[0] - top)
    columns = min(mask.shape[1], rgb.shape[1] - left)
    if rows <= 0 or columns <= 0:
        return
    cover = mask[:rows, :columns, None]
    region = rgb[top:top + rows, left:left + columns]
    region[:] = region * (1 - cover) + np.asarray(colour, dtype=np.float32) * cover


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of an organ with a 4-neighbour of another class (background included): its inner contour."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) |
               (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (labels > 0)


def draw_slice(hu: np.ndarray, labels: np.ndarray, colours: np.ndarray, names: Sequence[str],
               name_ink: Mapping[int, np.ndarray], warning_ink: Sequence[np.ndarray] = ()) -> np.ndarray:
    """One overlay image, ``(rows, columns, 3)`` uint8 RGB.

    Args:
        hu: ``(rows, columns)`` the source slice in Hounsfield units, as stored.
        labels: ``(rows, columns)`` its classes (0 background).
        colours: ``(len(names) + 1, 3)`` uint8 RGB per class.
        names: class names of ``1..len(names)``.
        name_ink: each class's name as a coverage mask (:func:`_ink`), for the legend.
        warning_ink: the warning's lines as coverage masks, drawn from the top row in WARNING_COLOUR.

    Outside the organs, the warning's band and the legend's box, every pixel is the windowed grey (R = G = B).
    """
    grey = soft_tissue_grey(hu).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    palette = colours.astype(np.float32)
    inside = labels > 0
    rgb[inside] = (1 - ALPHA) * rgb[inside] + ALPHA * palette[labels[inside]]
    edge = _outline(labels)
    rgb[edge] = palette[labels[edge]]
    height = _line_height(hu.shape[0])
    band = min(len(warning_ink) * height, hu.shape[0])
    if band:
        rgb[:band] *= SHADE
        for i, mask in enumerate(warning_ink):
            _paint(rgb, mask, i * height, 2, WARNING_COLOUR)
    entries = legend_entries(labels, names)[:max((hu.shape[0] - band) // height, 0)]  # what fits under the band
    if entries:
        swatch = height - 4
        text_left = 2 + height
        width = min(text_left + max(name_ink[value].shape[1] for value, _ in entries) + 3, hu.shape[1])
        top = hu.shape[0] - len(entries) * height
        rgb[top:, :width] *= SHADE
        for i, (value, _) in enumerate(entries):
            row = top + i * height
            rgb[row + 2:row + 2 + swatch, 2:2 + swatch] = palette[value]
            _paint(rgb, name_ink[value], row, text_left, TEXT_COLOUR)
    return np.rint(np.clip(rgb, 0, 255)).astype(np.uint8)


def _refuse(display: str, what: str) -> UserError:
    return UserError(f"{display}: {what}; {NIFTI_ONLY}")


def _sources(source_files: Sequence[Path], affine: np.ndarray, shape: tuple[int, int, int], display: str
             ) -> list[_Source]:
    """Every source image (each frame of a multi-frame file) with its slice of the grid, in slice order; a plane
    with two images keeps the first (the reader only stacks identical duplicates). One line when an image is not a
    slice of the ``(X, Y, Z)`` grid with RAS ``affine`` (columns along X, rows along Y) or has no geometry."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the same flip takes RAS back to LPS
    to_voxel = np.linalg.inv(lps)
    axes = lps[:3, :2] / np.linalg.norm(lps[:3, :2], axis=0)
    found: dict[int, _Source] = {}
    for name in source_files:
        path = Path(name)
        dataset = reader.read_header(path)
        if dataset is None:
            raise _refuse(display, f"{path.name} is not a DICOM file")
        frames = reader.frame_count(dataset)
        for frame in [None] if frames == 1 else range(frames):
            position, orientation, spacing = reader.frame_geometry(dataset, frame)
            if position is None or orientation is None or spacing is None:
                raise _refuse(display, f"{path.name} has no position, orientation or pixel spacing, which place an "
                                       "overlay image on its slice")
            voxel = to_voxel @ np.append(position, 1.0)
            k = int(round(voxel[2]))
            cosines = orientation.reshape(2, 3).T
            on_grid = np.abs(voxel[:3] - (0.0, 0.0, k)).max() < POSITION_TOLERANCE and \
                np.abs(cosines - axes).max() < COSINE_TOLERANCE and 0 <= k < shape[2] and \
                (int(dataset.get("Columns") or 0), int(dataset.get("Rows") or 0)) == shape[:2]
            if not on_grid:
                raise _refuse(display, f"{path.name}{'' if frame is None else f' frame {frame + 1}'} is not a slice "
                                       "of the mask's grid: an overlay is drawn on the series' own slices")
            found.setdefault(k, _Source(path, frame, dataset, k, position, orientation, spacing))
    return [found[k] for k in sorted(found)]


def _study_uids(first: _Source, display: str) -> tuple[str, str]:
    """(StudyInstanceUID, FrameOfReferenceUID) of the series: the overlay joins that study and that frame of
    reference; one line where an anonymiser left either empty."""
    uids = []
    for keyword, why in (("StudyInstanceUID", "which an overlay series needs to join its study"),
                         ("FrameOfReferenceUID", "which places an overlay series on the CT")):
        value = reader.header_text(first.dataset, keyword)
        if not value:
            raise _refuse(display, f"the series has no {keyword} ({first.path.name}; emptied by an anonymiser?), "
                                   f"{why}")
        uids.append(value)
    return uids[0], uids[1]


# Patient and study attributes copied from the source (type 2 ones written empty where the source has none), so
# that the PACS files the overlay under the same patient and study.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "IssuerOfPatientID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
                 "StudyDescription")
TYPE_2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber"}


def _copy_patient_study(target, source) -> None:
    from pydicom.valuerep import PersonName
    for keyword in PATIENT_STUDY:
        value = source.get(keyword)
        if value is None:
            if keyword in TYPE_2:
                setattr(target, keyword, "")
            continue
        # A person's name is re-made from its text: the overlay is written in UTF-8, whatever the source's charset.
        setattr(target, keyword, PersonName(str(value)) if keyword.endswith("Name") else value)


def _ds(values: Sequence[float]) -> list:
    from pydicom.valuerep import DSfloat
    return [DSfloat(float(v), auto_format=True) for v in values]


def _overlay_dataset(source: _Source, rgb: np.ndarray, uids: dict[str, str], number: int, texts: dict[str, str]):
    """The Secondary Capture dataset (with its file meta) of one overlay image ``rgb`` (rows, columns, 3) uint8."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid
    first = source.dataset
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE_IMAGE, meta.MediaStorageSOPInstanceUID
    _copy_patient_study(ds, first)
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["frame"]
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uids["series"], uids["series_number"], number
    ds.Modality, ds.ConversionType = "OT", "WSD"  # derived on a workstation (SC Equipment module)
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "btcv-unetr", texts["model"], __version__
    ds.SeriesDescription = texts["series"]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = texts["derivation"]
    if texts["comments"]:
        ds.ImageComments = texts["comments"]
    ds.BurnedInAnnotation = "YES"
    # Once lossy, always said so (PS3.3 C.7.6.1.1.5); the overlay itself is stored uncompressed.
    ds.LossyImageCompression = "01" if str(first.get("LossyImageCompression") or "") == "01" else "00"
    reference = Dataset()
    reference.ReferencedSOPClassUID = reader.sop_class_uid(first)
    reference.ReferencedSOPInstanceUID = reader.sop_instance_uid(first)
    if source.frame is not None:
        reference.ReferencedFrameNumber = source.frame + 1
    if reference.ReferencedSOPClassUID and reference.ReferencedSOPInstanceUID:
        ds.SourceImageSequence = [reference]
    ds.ImagePositionPatient = _ds(source.position)
    ds.ImageOrientationPatient = _ds(source.orientation)
    ds.PixelSpacing = _ds(source.spacing)
    if first.get("SliceThickness"):
        ds.SliceThickness = first.SliceThickness
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()  # pixel-interleaved: R G B, R G B, ...
    return ds


def _texts(warning: str | None, provenance: Mapping | None) -> dict[str, str]:
    """SeriesDescription, DerivationDescription, ImageComments and ManufacturerModelName of every image: the net the
    provenance names (:func:`~btcv_unetr.inference.provenance.network_of`, UNETR where none) in all but the comments,
    which hold the warning and the provenance as JSON."""
    warned, network = bool(warning and warning.strip()), network_of(provenance)
    comments = [warning.strip()] if warned else []
    if provenance:
        comments.append(json.dumps(dict(provenance), sort_keys=True))
    return {"series": warning_label(warning if warned else None, f"{network} organ overlay"), "model": network[:64],
            "derivation": (f"CT slice in a soft-tissue window (W {WINDOW[1]:g}, L {WINDOW[0]:g}) with the organs "
                           f"segmented by btcv-unetr {__version__} ({network}) blended in colour (alpha {ALPHA:g}), "
                           "outlines opaque, a legend of the organs on the slice"
                           + ("; the model card's warning burned in" if warned else "")),
            "comments": "\n".join(comments)}


def write_dicom_overlay(labels: np.ndarray, affine: np.ndarray, source_files: Sequence[Path], names: Sequence[str],
                        folder: Path, colours: np.ndarray | None = None, provenance: Mapping | None = None,
                        warning: str | None = None) -> list[Path]:
    """Write the overlay series into ``folder`` (created) as ``overlay_0001.dcm`` ...; returns them in slice order.

    Args:
        labels: ``(X, Y, Z)`` uint8 classes on the series' grid (0 background, ``1..len(names)`` organs).
        affine: 4x4 voxel-to-RAS affine of that grid (mm).
        source_files: the series' DICOM files, any order: one overlay image per source slice (per frame of a
            multi-frame file), drawn on that slice's own pixels.
        names: class names of ``1..len(names)``: the legend.
        colours: ``(len(names) + 1, 3)`` uint8 RGB; default the overlays' organ colours (as the SEG's).
        provenance: what the mask was made with: as JSON in every image's ImageComments; its net named in the
            descriptions and the manufacturer's model name.
        warning: the model card's warning: burned into the top of every image, and in ImageComments and
            SeriesDescription ("NOT FOR CLINICAL USE" prefix).

    The series joins the source's study (patient and study attributes, StudyInstanceUID, FrameOfReferenceUID), with
    a new SeriesInstanceUID and SeriesNumber the source's + 2000. Each file is written atomically; overlay files of
    an earlier run in ``folder`` that this one did not write are removed, so the folder holds one series. A series
    that cannot be placed (no study or frame of reference UID, an image off the grid) is one :class:`UserError`
    line ending "the mask is written as NIfTI only".
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(EXTRA_LINE) from None
    from pydicom.uid import generate_uid
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 3 or int(labels.max(initial=0)) > len(names):
        raise ValueError(f"labels {labels.shape} with classes up to {int(labels.max(initial=0))}: expected (X, Y, Z) "
                         f"with classes 0..{len(names)}")
    colours = class_colours(len(names) + 1) if colours is None else np.asarray(colours, dtype=np.uint8)
    if not source_files:
        raise ValueError("no source files: the overlay is drawn on the series' slices")
    display = str(Path(source_files[0]).parent)
    sources = _sources(source_files, affine, labels.shape, display)
    study, frame_of_reference = _study_uids(sources[0], display)
    number = str(sources[0].dataset.get("SeriesNumber") or "0").strip()
    uids = {"study": study, "frame": frame_of_reference, "series": generate_uid(),
            "series_number": (int(number) if number.lstrip("-").isdigit() else 0) + 2000}
    texts = _texts(warning, provenance)
    height = _line_height(labels.shape[1])
    present = [value for value, _ in legend_entries(labels, names)]
    name_ink = dict(zip(present, _ink([names[value - 1] for value in present], height)))
    warning_ink = _warning_lines(warning.strip(), labels.shape[0], height) if warning and warning.strip() else []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    decoded: dict[Path, np.ndarray] = {}
    for index, source in enumerate(sources, start=1):
        if source.path not in decoded:
            decoded = {source.path: reader.decode_frames(source.path, display)}  # one file's frames at a time
        hu = decoded[source.path][source.frame or 0]
        rgb = draw_slice(hu, labels[:, :, source.plane].T, colours, names, name_ink, warning_ink)
        dataset = _overlay_dataset(source, rgb, uids, index, texts)
        path = folder / f"overlay_{index:04d}.dcm"
        atomic_write(path, lambda tmp, ds=dataset: ds.save_as(str(tmp), enforce_file_format=True))
        written.append(path)
    for stale in folder.iterdir():  # a longer series written here before would mix two series in one folder
        if NAME_PATTERN.fullmatch(stale.name) and stale not in written and stale.is_file():
            stale.unlink()
    return written
