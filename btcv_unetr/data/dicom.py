"""DICOM series as scanners, anonymisers and PACS exports write them, read into one volume with its true geometry.

    find_series       every image series under a folder: any file names (no ``.dcm`` needed), any order, sub-folders
    choose_series     the series to segment: ``--series_uid``, else the CT series with the most slices; a line that
                      lists every series found
    read_series       voxels ``(X, Y, Z)`` float32 in modality units (Hounsfield for CT) and a RAS affine, from the
                      positions the files declare; what was repaired is said in ``notes``
    write_series_as_nifti   the same, written atomically as NIfTI (the rest of the pipeline reads files)
    read_header, header_text, sop_class_uid, sop_instance_uid, frame_count, frame_geometry, decode_frames
                      one file's header and pixels, for the DICOM writers that place their objects on the series

Headers are read by pydicom (tolerant of missing meta headers, implicit VR, big endian, empty UIDs); pixels are
decoded by GDCM through SimpleITK, which reads every transfer syntax scanners send (uncompressed, deflate, RLE, JPEG
baseline, extended 12-bit and lossless, JPEG-LS, JPEG 2000), so no decoder plugin is needed.

Geometry is taken from each slice's ImagePositionPatient, never from file order or a single spacing tag, the way
dicom2nifti does: identical slices at one position are dropped (said), different ones refused; missing slices or
uneven spacing are resampled onto a uniform grid from the real positions (said); a gantry tilt is refused. The
volume's X runs along the slices' columns, Y along their rows, Z along the slice normal (row x column cosine), the
order SimpleITK writes, so a mask on it maps back to the files by position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_save_nifti

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Two slices closer than this along the normal are at one position; a slice farther than this from the line of
# positions is sheared (tilt). Scanners write positions to about 1e-3 mm.
SAME_POSITION_MM = 0.01
TILT_TOLERANCE_MM = 0.05
# The uniform grid may place a slice this far (a share of the step) from its declared position; beyond, resample.
UNIFORM_SHARE = 0.1
CT_AIR = -1024.0  # Hounsfield units; anything below is padding outside the reconstruction circle

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 - .4 variants
NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "ECG", "RWV"}


@dataclass
class Slice:
    """One 2D image of a series: a file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # the frame of a multi-frame file; None for a single-frame file
    position: np.ndarray  # (3,) ImagePositionPatient, mm, DICOM's LPS world
    orientation: np.ndarray  # (6,) row cosine then column cosine
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int
    columns: int
    instance_uid: str  # "" where the anonymiser left none

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


@dataclass
class Series:
    """The image files of one SeriesInstanceUID (and one orientation and size) under a folder."""

    uid: str
    modality: str
    description: str
    kind: str  # "volume" (stackable slices), "localizer", "secondary capture", "no geometry"
    slices: list[Slice] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return sorted({s.path for s in self.slices})

    def summary(self) -> str:
        kind = "" if self.kind == "volume" else f" {self.kind}"
        described = f" '{self.description}'" if self.description else ""
        count = f"{len(self.slices)} {'slice' if self.kind == 'volume' else 'image'}{'s' * (len(self.slices) != 1)}"
        return f"{self.uid or '(no series UID)'} ({self.modality or '?'}{kind}, {count}{described})"


@dataclass
class SeriesVolume:
    """What :func:`read_series` gives: voxels ``(X, Y, Z)`` float32, a 4x4 voxel-to-RAS affine (mm), the slices
    stacked (sorted, duplicates dropped; each on grid plane ``planes[i]``) and one line per repair."""

    voxels: np.ndarray
    affine: np.ndarray
    slices: list[Slice]
    planes: list[int]
    notes: list[str]


def header_text(dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    return str(value).strip() if value is not None else ""


def sop_class_uid(dataset) -> str:
    """The SOP Class UID of the dataset, else the file meta header's (anonymisers empty the dataset's)."""
    uid = header_text(dataset, "SOPClassUID")
    meta = getattr(dataset, "file_meta", None)
    return uid or (header_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")


def sop_instance_uid(dataset) -> str:
    uid = header_text(dataset, "SOPInstanceUID")
    meta = getattr(dataset, "file_meta", None)
    return uid or (header_text(meta, "MediaStorageSOPInstanceUID") if meta is not None else "")


def _floats(value, count: int) -> np.ndarray | None:
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def frame_count(dataset) -> int:
    """The frames of an image header: NumberOfFrames, 1 when it is absent or not a positive number."""
    try:
        return max(1, int(str(dataset.get("NumberOfFrames") or 1)))
    except ValueError:
        return 1


def frame_geometry(dataset, frame: int | None) -> tuple[np.ndarray | None, np.ndarray | None, tuple | None]:
    """(position, orientation, pixel spacing) of a single-frame image, or of one frame of an enhanced multi-frame
    image (per-frame functional groups, else the shared ones)."""
    if frame is None:
        return (_floats(dataset.get("ImagePositionPatient"), 3), _floats(dataset.get("ImageOrientationPatient"), 6),
                _floats(dataset.get("PixelSpacing"), 2))

    def group_value(sequence: str, keyword: str, count: int):
        for groups in (dataset.get("PerFrameFunctionalGroupsSequence"), dataset.get("SharedFunctionalGroupsSequence")):
            if not groups:
                continue
            item = groups[frame] if groups is dataset.get("PerFrameFunctionalGroupsSequence") else groups[0]
            inner = item.get(sequence)
            if inner and keyword in inner[0]:
                return _floats(inner[0].get(keyword), count)
        return None

    return (group_value("PlanePositionSequence", "ImagePositionPatient", 3),
            group_value("PlaneOrientationSequence", "ImageOrientationPatient", 6),
            group_value("PixelMeasuresSequence", "PixelSpacing", 2))


def _image_kind(dataset, sop_class: str) -> str | None:
    """What an image file is for stacking; None for what is not an image at all (SR, RT plans, SEG ...)."""
    modality = header_text(dataset, "Modality").upper()
    if modality in NOT_IMAGES or "Rows" not in dataset or "Columns" not in dataset:
        return None
    if sop_class.startswith(SECONDARY_CAPTURE):
        return "secondary capture"
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer"
    return "volume"


def read_header(path: Path):
    """pydicom's dataset of ``path`` without its pixels, or None for a file that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError, EOFError, OverflowError):
        return None


def _files_under(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (sub-folders too, hidden ones skipped), in name order."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return [p for p in found if p.is_file() and not p.is_symlink()]


def find_series(folder: Path) -> list[Series]:
    """The image series under ``folder``, most slices first: one per SeriesInstanceUID, split further where one
    UID holds images of different orientations or sizes (a localizer sent with its CT) or kinds."""
    groups: dict[tuple, Series] = {}
    for path in _files_under(folder):
        dataset = read_header(path)
        if dataset is None:
            continue
        kind = _image_kind(dataset, sop_class_uid(dataset))
        if kind is None:
            continue
        frames = frame_count(dataset)
        for frame in ([None] if frames == 1 else range(frames)):
            position, orientation, spacing = frame_geometry(dataset, frame)
            frame_kind = kind if position is not None and orientation is not None else "no geometry"
            uid = header_text(dataset, "SeriesInstanceUID")
            key = (uid, frame_kind, None if orientation is None else tuple(np.round(orientation, 3)),
                   int(dataset.Rows), int(dataset.Columns))
            series = groups.setdefault(key, Series(uid, header_text(dataset, "Modality").upper(),
                                                   header_text(dataset, "SeriesDescription"), frame_kind))
            series.slices.append(Slice(path, frame, position if position is not None else np.zeros(3),
                                       orientation if orientation is not None else np.array([1., 0, 0, 0, 1, 0]),
                                       tuple(spacing) if spacing is not None else (1.0, 1.0),
                                       int(dataset.Rows), int(dataset.Columns), sop_instance_uid(dataset)))
    return sorted(groups.values(), key=lambda s: (s.kind != "volume", -len(s.slices), s.uid))


def choose_series(found: Sequence[Series], display: str, series_uid: str | None = None,
                  how_to_pick: str = "--series_uid UID picks another") -> tuple[Series, str | None]:
    """The series to segment and, where the folder holds more than one, a line naming every series and the choice
    (ending in ``how_to_pick``).

    ``series_uid`` picks one; otherwise the stackable series with the most slices (CT first). Localizers and
    secondary captures are never stacked into the volume.
    """
    volumes = [s for s in found if s.kind == "volume"]
    if series_uid:
        chosen = [s for s in volumes if s.uid == series_uid]
        if not chosen:
            others = "; ".join(s.summary() for s in found) or "none"
            raise UserError(f"{display}: no stackable DICOM series with --series_uid {series_uid} (found: {others})")
        series = chosen[0]
    elif not volumes:
        found_text = "; ".join(s.summary() for s in found)
        raise UserError(f"{display}: no DICOM image series that can be stacked into a volume"
                        + (f" (found: {found_text})" if found_text else " (no DICOM image files)")
                        + ": expected the slices of one CT series")
    else:
        series = sorted(volumes, key=lambda s: (s.modality != "CT", -len(s.slices), s.uid))[0]
    if len(found) == 1:
        return series, None
    listed = "; ".join(("used: " if s is series else "") + s.summary() for s in found)
    return series, f"{display}: {len(found)} DICOM series: {listed}; {how_to_pick}"


def check_modality(series: Series, display: str, expected: str = "CT", allowed: bool = False,
                   hint: str = "give --any_modality to segment it anyway") -> None:
    """A model trained on ``expected`` images refuses a series of another modality unless ``allowed``."""
    if series.modality and series.modality != expected and not allowed:
        raise UserError(f"{display}: a {series.modality} series, and this model segments {expected}: its intensities "
                        f"mean something else ({hint})")


def planned_grid(series: Series) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The ``(X, Y, Z)`` shape and spacing (mm) :func:`read_series` will give, from the headers alone (no pixel
    decoded): for checking a series against limits before reading it."""
    first = series.slices[0]
    along = np.unique(np.round([float(s.position @ first.normal) for s in series.slices], 2))
    if len(along) > 1:
        grid, step = _uniform_planes(along)
    else:
        grid, step = along, 1.0
    return (first.columns, first.rows, len(grid)), (first.pixel_spacing[1], first.pixel_spacing[0], step)


def decode_frames(path: Path, display: str) -> np.ndarray:
    """All frames of ``path`` as ``(frames, rows, columns)`` float32 in modality units (rescale slope and intercept
    applied), as stored: MONOCHROME1 is not inverted (GDCM inverts it for display; the units are the same)."""
    import SimpleITK as sitk
    try:
        image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
    except RuntimeError as exc:
        dataset = read_header(path)
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        named = f" ({syntax.name})" if syntax is not None and getattr(syntax, "name", "") else ""
        last = (str(exc).strip().splitlines() or ["cannot be read"])[-1].split(": ")[-1]
        raise UserError(f"{display}: {path.name}: the pixels of this DICOM file{named} cannot be decoded ({last}): "
                        "the file is damaged or its compression is not supported; send it uncompressed or export "
                        "the series again") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{display}: {path.name}: a colour DICOM image ({image.GetNumberOfComponentsPerPixel()} "
                        "channels): the model takes grey-level CT slices")
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    if voxels.ndim == 2:
        voxels = voxels[None]
    # The header GDCM read with the pixels (no second read of the file): "group|element" -> text.
    def tag(key: str, default: str) -> str:
        return image.GetMetaData(key).strip() if image.HasMetaDataKey(key) else default

    if tag("0028|0004", "").upper() == "MONOCHROME1":
        # GDCM stored max - value (bitwise NOT for signed pixels) before the rescale: undone here.
        slope, intercept = float(tag("0028|1053", "") or 1.0), float(tag("0028|1052", "") or 0.0)
        signed = tag("0028|0103", "0") == "1"
        top = -1.0 if signed else float(2 ** int(tag("0028|0101", "16")) - 1)
        voxels = np.float32(slope * top + 2 * intercept) - voxels
    return voxels


def _pixels(slices: Sequence[Slice], display: str) -> list[np.ndarray]:
    """The ``(rows, columns)`` pixels of every slice, each file decoded once."""
    decoded: dict[Path, np.ndarray] = {}
    out = []
    for item in slices:
        if item.path not in decoded:
            decoded[item.path] = decode_frames(item.path, display)
        frames = decoded[item.path]
        out.append(frames[item.frame or 0])
    return out


def _drop_duplicates(slices: list[Slice], pixels: list[np.ndarray], along: np.ndarray, display: str
                     ) -> tuple[list[Slice], list[np.ndarray], np.ndarray, str | None]:
    """Slices at one position: identical ones dropped (said), different ones refused."""
    keep = [0]
    for i in range(1, len(slices)):
        if along[i] - along[keep[-1]] > SAME_POSITION_MM:
            keep.append(i)
        elif not np.array_equal(pixels[i], pixels[keep[-1]]):
            raise UserError(f"{display}: two different slices at one position ({along[i]:.2f} mm along the normal: "
                            f"{slices[keep[-1]].path.name} and {slices[i].path.name}): the series mixes two "
                            "acquisitions; remove one of them or pick the series with --series_uid")
    dropped = len(slices) - len(keep)
    note = None if not dropped else \
        f"{display}: {dropped} duplicate slice(s) (identical, at a position already filled) dropped"
    return [slices[i] for i in keep], [pixels[i] for i in keep], along[keep], note


def _check_tilt(slices: Sequence[Slice], along: np.ndarray, display: str) -> None:
    """Refuse positions that leave the line along the normal (a gantry tilt: sheared slices)."""
    normal = slices[0].normal
    offsets = [s.position - slices[0].position - (a - along[0]) * normal for s, a in zip(slices, along)]
    worst = max(float(np.linalg.norm(o)) for o in offsets)
    if worst > TILT_TOLERANCE_MM:
        extent = float(along[-1] - along[0]) or 1.0
        degrees = float(np.degrees(np.arctan2(worst, extent)))
        raise UserError(f"{display}: a gantry tilt of about {degrees:.1f} degrees (each slice shifted in its plane "
                        "along the series): tilted series are not supported; reconstruct it without tilt on the "
                        "scanner, or correct the tilt with dicom2nifti, then segment the NIfTI")


def _uniform_planes(along: np.ndarray) -> tuple[np.ndarray, float]:
    """Positions of the uniform grid from the first to the last slice, and its step (mm): the slices' own spacing
    when it is uniform, else the smallest step between two slices (a missing slice leaves a gap of whole steps)."""
    steps = np.diff(along)
    count = len(along)
    step = float((along[-1] - along[0]) / (count - 1))
    if np.abs(along - (along[0] + step * np.arange(count))).max() <= UNIFORM_SHARE * step:
        return along[0] + step * np.arange(count), step
    smallest = float(steps.min())
    planes = int(round((along[-1] - along[0]) / smallest)) + 1
    step = float((along[-1] - along[0]) / (planes - 1))
    return along[0] + step * np.arange(planes), step


def _resample_along(pixels: Sequence[np.ndarray], along: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Slices at positions ``along`` linearly interpolated onto positions ``grid``: ``(Z, rows, columns)`` and the
    grid plane of each slice (a slice within a tenth of a step of a plane is copied there unchanged)."""
    step = float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    stack = np.empty((len(grid), *pixels[0].shape), dtype=np.float32)
    for k, z in enumerate(grid):
        upper = int(np.clip(np.searchsorted(along, z), 1, len(along) - 1)) if len(along) > 1 else 0
        lower = max(upper - 1, 0)
        if abs(along[lower] - z) <= UNIFORM_SHARE * step or lower == upper:
            stack[k] = pixels[lower]
        elif abs(along[upper] - z) <= UNIFORM_SHARE * step:
            stack[k] = pixels[upper]
        else:
            weight = float((z - along[lower]) / (along[upper] - along[lower]))
            stack[k] = (1 - weight) * pixels[lower] + weight * pixels[upper]
    planes = [int(round((a - grid[0]) / step)) for a in along]
    return stack, planes


def read_series(series: Series, display: str) -> SeriesVolume:
    """Series ``series`` as one volume in its own geometry (see the module's docstring); ``display`` names it in
    messages. CT voxels below air (padding outside the reconstruction circle, -2000 or -3024) become air."""
    slices = list(series.slices)
    normal = slices[0].normal
    along_all = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(along_all, kind="stable")
    slices, along = [slices[i] for i in order], along_all[order]
    pixels = _pixels(slices, display)
    notes: list[str] = []
    slices, pixels, along, duplicates = _drop_duplicates(slices, pixels, along, display)
    if duplicates:
        notes.append(duplicates)
    if len(slices) > 1:
        _check_tilt(slices, along, display)
        grid, step = _uniform_planes(along)
    else:
        grid, step = along, float(series_slice_thickness(slices[0]) or 1.0)
    stack, planes = _resample_along(pixels, along, grid)
    if len(grid) != len(slices):
        steps = np.diff(along)
        notes.append(f"{display}: slice positions uneven or missing (steps of {steps.min():.3g} to {steps.max():.3g} "
                     f"mm): resampled onto a uniform {step:.3g} mm grid of {len(grid)} slices from the files' own "
                     f"positions ({len(grid) - len(slices)} interpolated)")
    if series.modality == "CT":
        np.maximum(stack, CT_AIR, out=stack)
    first = slices[0]
    row_spacing, column_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * column_spacing  # X: along a row, from column to column
    lps[:3, 1] = first.orientation[3:] * row_spacing  # Y: down the columns, from row to row
    lps[:3, 2] = normal * step
    lps[:3, 3] = first.position + (grid[0] - along[0]) * normal
    voxels = np.ascontiguousarray(stack.transpose(2, 1, 0))  # (Z, rows, columns) -> (X, Y, Z)
    return SeriesVolume(voxels, LPS_TO_RAS @ lps, slices, planes, notes)


def series_slice_thickness(item: Slice) -> float | None:
    """SpacingBetweenSlices, else SliceThickness, of a one-slice series (its only hint of a third spacing)."""
    dataset = read_header(item.path)
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats([dataset.get(keyword)] if dataset is not None and dataset.get(keyword) else [], 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    return None


def write_series_as_nifti(volume: SeriesVolume, path: Path) -> None:
    """``volume`` as a NIfTI file (float32 voxels, its affine as sform and qform), atomically."""
    import nibabel as nib
    image = nib.Nifti1Image(volume.voxels, volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    atomic_save_nifti(image, path)
