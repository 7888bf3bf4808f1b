"""Files sent to the service: identified by their bytes, checked whole, stored under fixed names.

    safe_name      the client's file name reduced to a display name (never used as a path)
    store_upload   an uploaded NIfTI, zipped DICOM series or picture -> ``input.*`` in the job folder, checked

Every problem is a :class:`BadUpload` with the HTTP status and one line for the client.
"""

from __future__ import annotations

import gzip
import re
import shutil
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..checks import Expected, dimension_problems
from ..images import Volume, dicom_series, read_volume, write_dicom_series_as_nifti

CHUNK = 1 << 20
# A zip whose members unpack to more than this many times the upload limit is refused (a zip bomb
# of DICOM files gains little from compression: real series compress 2-3x).
MAX_ZIP_EXPANSION = 8
MAX_ZIP_MEMBERS = 20000
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


def _check_gzip(path: Path, display: str) -> bytes:
    """Decompress the whole file (streaming) to find truncation; returns its first bytes."""
    head = b""
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                head = head or chunk[:1024]
    except (EOFError, OSError, zlib.error) as exc:
        raise BadUpload(400, f"{display}: truncated or corrupt gzip data ({exc.__class__.__name__}): send the "
                             "whole file again") from None
    return head


def _unzip_series(path: Path, folder: Path, display: str, limit_bytes: int) -> Path:
    """The zip's files under numbered names in ``folder/dicom`` (member names are never used as paths)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS or sum(i.file_size for i in members) > MAX_ZIP_EXPANSION * limit_bytes:
                raise BadUpload(413, f"{display}: the zip unpacks to more than {MAX_ZIP_EXPANSION} times the upload "
                                     "limit or holds too many files: send one DICOM series per job")
            target = folder / "dicom"
            target.mkdir()
            for number, info in enumerate(members):
                with archive.open(info) as source, open(target / f"{number:05d}.dcm", "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise BadUpload(400, f"{display}: unreadable zip ({exc.__class__.__name__}): zip the series folder "
                             "again") from None
    return target


def _series_to_nifti(dicom: Path, out: Path, display: str) -> None:
    """The one DICOM series in ``dicom`` as NIfTI with its geometry."""
    series = dicom_series(dicom)
    if len(series) != 1:
        found = "no DICOM series" if not series else f"{len(series)} DICOM series"
        raise BadUpload(400, f"{display}: the zip holds {found}; send exactly one series (its .dcm files) per job")
    try:
        write_dicom_series_as_nifti(dicom, series[0], out)
    except RuntimeError as exc:
        raise BadUpload(400, f"{display}: the DICOM series cannot be read ({(str(exc).splitlines() or [''])[0]})") \
            from None


def _check_dimensions(path: Path, display: str, expected: Expected) -> Volume:
    """The header's shape against the model's (NIfTI: header only; pictures: read whole, they are small)."""
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            image = nib.load(str(path))
            volume = Volume(tuple(image.shape), image.affine, np.empty(0))
            if path.name.endswith(".nii") and path.stat().st_size < image.dataobj.offset + \
                    int(np.prod(image.shape)) * image.get_data_dtype().itemsize:
                raise BadUpload(400, f"{display}: the file ends before its voxels do (truncated): send the whole file")
        else:
            volume = read_volume(path)
    except BadUpload:
        raise
    except Exception as exc:  # nibabel and SimpleITK raise many types for bad headers
        raise BadUpload(400, f"{display}: unreadable image ({exc.__class__.__name__}: "
                             f"{(str(exc).splitlines() or [''])[0]})") from None
    problems = dimension_problems(Path(display), volume, expected, is_label=False)
    if problems:
        raise BadUpload(400, str(problems[0]))
    return volume


def store_upload(upload: Path, folder: Path, display: str, expected: Expected,
                 limit_bytes: int) -> tuple[str, Path, Volume]:
    """Identify ``upload`` by its bytes, check it and move it to ``folder/input.*``; returns the kind, the path
    and its :class:`Volume` (shape and affine; voxels read for pictures only).

    ``kind``: ``nifti`` (``.nii``/``.nii.gz``), ``dicom`` (a zipped series, converted to NIfTI) or
    ``picture`` (PNG/JPEG, 2D models). ``display`` names the file in messages.
    """
    with open(upload, "rb") as stream:
        head = stream.read(1024)
    kind = _kind_of(head)
    volumes = expected.spatial_dims == 3
    accepted = ".nii, .nii.gz or a .zip of one DICOM series" if volumes else "a PNG or JPEG picture"
    if kind == "nifti-gz":
        head = _check_gzip(upload, display)
        if not _is_nifti_header(head):
            raise BadUpload(400, f"{display}: gzip data that is not a NIfTI image; send {accepted}")
    if kind is None or volumes != (kind in ("nifti-gz", "nifti", "zip")):
        found = "an empty file" if not head else "not a NIfTI image, DICOM zip or picture" if kind is None else \
            f"a {KIND_NAMES[kind]} file"
        raise BadUpload(400, f"{display}: {found}; this model takes {accepted}")
    if kind == "zip":
        dicom = _unzip_series(upload, folder, display, limit_bytes)
        path = folder / "input.nii.gz"
        _series_to_nifti(dicom, path, display)
        shutil.rmtree(dicom)
        upload.unlink()
    else:
        path = folder / {"nifti-gz": "input.nii.gz", "nifti": "input.nii", "png": "input.png",
                         "jpeg": "input.jpg"}[kind]
        upload.replace(path)
    volume = _check_dimensions(path, display, expected)
    return ("dicom" if kind == "zip" else "picture" if kind in ("png", "jpeg") else "nifti"), path, volume
