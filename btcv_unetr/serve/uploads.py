"""Files sent to the service: identified by their bytes, checked whole, stored under fixed names.

    safe_name      the client's file name reduced to a display name (never used as a path)
    store_upload   an uploaded NIfTI, zipped DICOM series or picture -> ``input.*`` in the job folder, checked

Every problem is a :class:`BadUpload` with the HTTP status and one line for the client.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data.checks import Expected, dimension_problems
from ..data.dicom import (
    Series,
    check_modality,
    choose_series,
    find_series,
    planned_grid,
    read_series,
    write_series_as_nifti,
)
from ..data.images import (
    Volume,
    nifti_header_problem,
    picture_header,
    read_volume,
    shear_problem,
    voxel_spacing,
)
from ..errors import UserError
from ..files import atomic_write_json
from .limits import Declared, JobLimits, limit_problem
from .settings import MB

CHUNK = MB
# A zip whose members unpack to more than this many times the upload limit is refused (a zip bomb
# of DICOM files gains little from compression: real series compress 2-3x).
MAX_ZIP_EXPANSION = 8
KIND_NAMES = {"nifti-gz": "NIfTI", "nifti": "NIfTI", "zip": "zip", "png": "PNG", "jpeg": "JPEG"}


class BadUpload(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def safe_name(filename: str | None) -> str:
    """``scan`` from ``../../etc/scan.nii.gz``: the last path part, without the image suffix, letters,
    digits, ``._-`` only, at most 64 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = re.sub(r"(?i)(\.nii(\.gz)?|\.zip|\.png|\.jpe?g|\.dcm)$", "", name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64]
    return name or "scan"


def _kind_of(head: bytes) -> str | None:
    """``nifti-gz``, ``nifti``, ``zip``, ``png``, ``jpeg`` from the first bytes, else None."""
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if _is_nifti_header(head):
        return "nifti"
    return None


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (348-byte header, magic ``n+1``) or NIfTI-2 (540, ``n+2``), either byte order."""
    if len(head) < 348:
        return False
    size = int.from_bytes(head[:4], "little")
    swapped = int.from_bytes(head[:4], "big")
    if 348 in (size, swapped):
        return head[344:347] in (b"n+1", b"ni1")
    return 540 in (size, swapped) and head[4:7] in (b"n+2", b"ni2")


def _nifti_header(head: bytes, display: str):
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (nibabel reads either byte order)."""
    header_class = nib.Nifti2Header if int.from_bytes(head[:4], "little") == 540 or \
        int.from_bytes(head[:4], "big") == 540 else nib.Nifti1Header
    try:
        return header_class.from_fileobj(io.BytesIO(head), check=False)
    except Exception as exc:  # nibabel raises several types for inconsistent headers
        raise BadUpload(400, f"{display}: unreadable NIfTI header ({exc.__class__.__name__}: {_first_line(exc)})") \
            from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _declared_nifti(header, display: str, expected: Expected) -> tuple[Declared, np.ndarray]:
    """What the header declares, after the model's dimension check; and its affine (RAS, mm)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    affine = header.get_best_affine()
    problems = dimension_problems(Path(display), Volume(shape, affine, np.empty(0)), expected, is_label=False)
    if problems:
        raise BadUpload(400, str(problems[0]))
    spacing = voxel_spacing(affine)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise BadUpload(400, f"{display}: the header's voxel spacing {spacing} is not positive: fix the header")
    # What nibabel would fail on late (an infinite scl_inter) or apply as is (scl_slope 1e30), and an affine the
    # way back to the scan cannot follow: refused from the header, as test.py and check-data refuse them.
    problem = nifti_header_problem(header) or shear_problem(affine, expected.pixdim, expected.axcodes)
    if problem:
        raise BadUpload(400, f"{display}: {problem}")
    return Declared(shape[:3], spacing, 1, header.get_data_dtype().itemsize), affine


def _check_voxel_bytes(stream, header, display: str) -> None:
    """Read the voxels once, in chunks, from ``stream`` placed at the header's data offset: refuse fewer
    bytes than the header declares (a short or truncated file) and NaN or infinite values (the model
    cannot use them), without holding the volume in memory."""
    dtype = header.get_data_dtype()
    needed = math.prod(header.get_data_shape()) * dtype.itemsize
    seen, bad, remainder = 0, 0, b""
    try:
        while seen < needed and (chunk := stream.read(min(CHUNK, needed - seen))):
            seen += len(chunk)
            if dtype.kind in "fc":
                data = remainder + chunk
                usable = len(data) - len(data) % dtype.itemsize
                bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
                remainder = data[usable:]
    except (EOFError, OSError, zlib.error) as exc:
        raise BadUpload(400, f"{display}: truncated or corrupt gzip data ({exc.__class__.__name__}): send the "
                             "whole file again") from None
    if seen < needed:
        shape = " x ".join(map(str, header.get_data_shape()))
        raise BadUpload(400, f"{display}: holds {seen} bytes of voxels where its header declares {needed} ({shape} "
                             f"{dtype.name}): the file is cut short; send the whole file")
    if bad:
        raise BadUpload(400, f"{display}: {bad} NaN or infinite voxels: replace them (e.g. by the lowest "
                             "intensity) and send it again")


def _unzip_series(path: Path, folder: Path, display: str, limit_bytes: int, max_files: int) -> Path:
    """The zip's files under numbered names in ``folder/dicom`` (member names are never used as paths);
    the number of files and their unpacked size are checked from the zip's directory first."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            if len(members) > max_files:
                raise BadUpload(413, f"{display}: the zip holds {len(members)} files, over this server's "
                                     f"--max_dicom_files {max_files}: send one DICOM series per job")
            unpacked = sum(i.file_size for i in members)
            if unpacked > MAX_ZIP_EXPANSION * limit_bytes:
                raise BadUpload(413, f"{display}: the zip unpacks to {unpacked / MB:.0f} MB, over "
                                     f"{MAX_ZIP_EXPANSION} times the upload limit ({MAX_ZIP_EXPANSION * limit_bytes / MB:.0f}"
                                     " MB): send one DICOM series per job")
            target = folder / "dicom"
            target.mkdir()
            for number, info in enumerate(members):
                # zipfile stops each member at its declared size and checks its CRC: the sizes above hold.
                with archive.open(info) as source, open(target / f"{number:05d}.dcm", "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise BadUpload(400, f"{display}: unreadable zip ({exc.__class__.__name__}): zip the series folder "
                             "again") from None
    return target


def _header_information(path: Path):
    """SimpleITK's reader of ``path`` after reading its header only (sizes, spacing, origin; no pixels)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


SERIES_RECORD = "series.json"  # in the job folder: the stacked files (for the SEG) and the reader's notes


def _declared_series(dicom: Path, display: str, series_uid: str | None = None
                     ) -> tuple[Series, Declared, list[str]]:
    """The series to segment in ``dicom`` (btcv_unetr.data.dicom: ``series_uid``, else the CT series with the most
    slices; localizers and secondary captures never stacked) and the grid it will be read onto, from the headers
    alone."""
    try:
        series, listing = choose_series(find_series(dicom), display, series_uid,
                                        how_to_pick="the form field series_uid picks another")
        check_modality(series, display, hint="this service segments CT only")
    except UserError as exc:
        raise BadUpload(400, str(exc).replace(str(dicom), display)) from None
    shape, spacing = planned_grid(series)
    return series, Declared(shape, spacing), [listing] if listing else []


def _series_to_nifti(series: Series, dicom: Path, folder: Path, display: str, notes: list[str]) -> Path:
    """``series`` stacked by position (repairs said in the notes) as ``folder/input.nii.gz``; the stacked files and the
    notes in ``folder/series.json``."""
    try:
        volume = read_series(series, display)
    except UserError as exc:
        raise BadUpload(400, str(exc).replace(str(dicom), display)) from None
    path = folder / "input.nii.gz"
    write_series_as_nifti(volume, path)
    files = [str(p.relative_to(dicom)) for p in dict.fromkeys(s.path for s in volume.slices)]
    atomic_write_json(folder / SERIES_RECORD, {"files": files, "notes": [*notes, *volume.notes]})
    return path


def input_notes(folder: Path) -> list[str]:
    """The notes :func:`store_series` left for a job's input (none for other inputs)."""
    record = folder / SERIES_RECORD
    return list(json.loads(record.read_text())["notes"]) if record.is_file() else []


def series_record_files(folder: Path) -> list[Path] | None:
    """The DICOM files a job's volume was stacked from (for its SEG), or None for a job without the record."""
    record = folder / SERIES_RECORD
    if not record.is_file():
        return None
    return [folder / "dicom" / name for name in json.loads(record.read_text())["files"]]


def _declared_picture(path: Path, display: str, expected: Expected) -> Declared:
    """A PNG's or JPEG's size (read as the command line reads it: :func:`picture_header`) and colour channels from
    its header (the pixels are not decoded)."""
    try:
        header = picture_header(path)
        channels = _header_information(path).GetNumberOfComponents()
    except (OSError, ValueError, RuntimeError) as exc:
        raise BadUpload(400, f"{display}: unreadable picture ({_first_line(exc).replace(str(path), display)})") \
            from None
    size = (header.width, header.height)
    shape = size + ((channels,) if channels > 1 else ())
    problems = dimension_problems(Path(display), Volume(shape, np.eye(4), np.empty(0), channels), expected,
                                  is_label=False)
    if problems:
        raise BadUpload(400, str(problems[0]))
    return Declared(size, (1.0, 1.0), channels, 1)


def _checked_picture(path: Path, display: str) -> None:
    """Decode the picture once (after its size was accepted): a truncated or corrupt file is refused now."""
    try:
        read_volume(path)
    except Exception as exc:  # SimpleITK raises RuntimeError, PIL-backed readers others
        why = _first_line(exc).replace(str(path), display)  # never the server's paths
        raise BadUpload(400, f"{display}: unreadable picture ({exc.__class__.__name__}: {why})") from None


def _refuse_over_limits(declared: Declared, display: str, limits: JobLimits,
                       memory_of: Callable[[Declared], int]) -> None:
    problem = limit_problem(declared, limits, memory_of(declared))
    if problem:
        raise BadUpload(413, f"{display}: {problem}")


def store_series(dicom: Path, folder: Path, display: str, limits: JobLimits,
                 memory_of: Callable[[Declared], int], series_uid: str | None = None) -> tuple[str, Path, Declared]:
    """The series of ``dicom`` (an unzipped upload, or a series fetched from the PACS) to segment: ``series_uid``,
    else the CT series with the most slices; checked against the limits from its headers, then converted to
    ``folder/input.nii.gz``; returns ``("dicom", path, declared)``."""
    series, declared, notes = _declared_series(dicom, display, series_uid)
    _refuse_over_limits(declared, display, limits, memory_of)
    path = _series_to_nifti(series, dicom, folder, display, notes)
    return "dicom", path, declared


def store_upload(upload: Path, folder: Path, display: str, expected: Expected, limit_bytes: int,
                 limits: JobLimits, memory_of: Callable[[Declared], int],
                 series_uid: str | None = None) -> tuple[str, Path, Declared]:
    """Identify ``upload`` by its bytes, check it and move it to ``folder/input.*``; returns the kind, the path
    and what its header declares.

    ``kind``: ``nifti`` (``.nii``/``.nii.gz``), ``dicom`` (a zipped series, kept in ``folder/dicom`` and
    converted to NIfTI) or ``picture`` (PNG/JPEG, 2D models). ``display`` names the file in messages;
    ``memory_of`` estimates a job's peak memory for :func:`limit_problem`; ``series_uid`` picks the series of a
    zip that holds several. Sizes are checked from the
    header before the voxels are read (413); the voxels are then read once, in chunks, for short data
    and non-finite values (400).
    """
    with open(upload, "rb") as stream:
        head = stream.read(1024)
    kind = _kind_of(head)
    volumes = expected.spatial_dims == 3
    accepted = ".nii, .nii.gz or a .zip of one DICOM series" if volumes else "a PNG or JPEG picture"
    if kind == "nifti-gz":
        try:
            with gzip.open(upload, "rb") as stream:
                head = stream.read(540)
        except (EOFError, OSError, zlib.error) as exc:
            raise BadUpload(400, f"{display}: truncated or corrupt gzip data ({exc.__class__.__name__}): send the "
                                 "whole file again") from None
        if not _is_nifti_header(head):
            raise BadUpload(400, f"{display}: gzip data that is not a NIfTI image; send {accepted}")
    if kind is None or volumes != (kind in ("nifti-gz", "nifti", "zip")):
        found = "an empty file" if not head else "not a NIfTI image, DICOM zip or picture" if kind is None else \
            f"a {KIND_NAMES[kind]} file"
        raise BadUpload(400, f"{display}: {found}; this model takes {accepted}")
    if kind == "zip":
        dicom = _unzip_series(upload, folder, display, limit_bytes, limits.max_dicom_files)
        upload.unlink()
        return store_series(dicom, folder, display, limits, memory_of, series_uid)
    if kind in ("png", "jpeg"):
        path = folder / ("input.png" if kind == "png" else "input.jpg")
        upload.replace(path)
        declared = _declared_picture(path, display, expected)
        _refuse_over_limits(declared, display, limits, memory_of)
        _checked_picture(path, display)
        return "picture", path, declared
    header = _nifti_header(head, display)
    declared, _ = _declared_nifti(header, display, expected)
    _refuse_over_limits(declared, display, limits, memory_of)
    with (gzip.open(upload, "rb") if kind == "nifti-gz" else open(upload, "rb")) as stream:
        # A single-file NIfTI's voxels start after the header at the least, whatever vox_offset says (as nibabel
        # reads it); gzip decompresses up to there.
        stream.seek(max(int(header.get_data_offset()), header.single_vox_offset))
        _check_voxel_bytes(stream, header, display)
    path = folder / ("input.nii.gz" if kind == "nifti-gz" else "input.nii")
    upload.replace(path)
    return "nifti", path, declared
