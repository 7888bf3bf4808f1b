"""Image files in and masks out, each in its own geometry: NIfTI by nibabel, MHA/MHD/NRRD and the 2D
pictures (PNG, JPEG, BMP) by SimpleITK.

    image_shape       the voxel shape from the header only
    header_affine     the RAS affine from the header only; shear_problem: one the way back to the scan cannot follow
    read_nifti_header a NIfTI header alone (whatever its scaling); scaling_problem, sform_qform_note: what it says
    picture_header    a PNG's, JPEG's or BMP's size and bit depth from its first bytes (nothing decoded)
    check_picture_size  refuse a picture over --max_pixels from its header, before it is decoded
    read_volume       any accepted file -> voxels (X, Y, Z) and the RAS affine (checks, overlays, metrics)
    picture_scale     what a picture's brightest value is (255 for 8-bit, 65535 for 16-bit): its own bit depth
    SimpleITKReader   the same for MONAI's ``LoadImage`` (MONAI reads the ITK formats only with ``itk``)
    mask_path         where a case's mask goes: ``CASE_seg`` with the input's own format
    write_mask        labels on the input's voxel grid, written with the input's geometry and provenance, atomically
    mask_provenance   the provenance a mask's header carries (NIfTI extension, NRRD/MHA metadata), or None

Voxel order is the file's (i, j, k) in every array here; SimpleITK's ``GetArrayFromImage`` is
(k, j, i), hence the transposes. ITK's world is LPS and NIfTI's RAS: the affines returned are RAS,
as nibabel's and MONAI's are.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from ..config.schema import MAX_PIXELS
from ..errors import UserError
from ..files import atomic_path, atomic_save_nifti

DESCRIP_BYTES = 80  # the NIfTI-1 header's descrip field


def descrip(prov: Mapping[str, Any]) -> str:
    """The short form of ``prov`` for a NIfTI ``descrip`` (ASCII, at most 80 bytes): version, the weights
    checksum's first 12 hex digits, precision, device, overlap, TTA, and a marker for synthetic training data.

    A long version string is cut (the full one is in the JSON extension), and the marker shortened to
    keep the rest whole.
    """
    version = str(prov.get("package_version"))
    version = version if len(version) <= 16 else version[:15] + "~"
    text = " ".join([f"btcv-unetr {version}", f"w:{str(prov.get('weights_sha256') or '?')[:12]}",
                     str(prov.get("precision")), str(prov.get("device")), f"ov {float(prov.get('overlap', 0)):g}",
                     f"tta {'on' if prov.get('tta') else 'off'}"])
    if prov.get("synthetic_training_data"):
        marked = f"{text} SYNTHETIC-TRAINED"
        text = marked if len(marked) <= DESCRIP_BYTES else f"{text} SYNTH"
    return text.encode("ascii", "replace")[:DESCRIP_BYTES].decode("ascii")


NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The meta key of an image SimpleITKReader read: the brightest value of its stored type (:func:`picture_scale`).
PICTURE_SCALE_KEY = "picture_scale"


@dataclass
class Volume:
    shape: tuple[int, ...]  # voxel order (i, j[, k]), then the colour components if more than one
    affine: np.ndarray
    data: np.ndarray
    components: int = 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:-1] if self.components > 1 else self.shape


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along each voxel axis (i, j, k) of a 4x4 voxel-to-world ``affine``: the lengths of its
    first three columns, whatever the orientation (plain floats: MONAI's metrics refuse numpy scalars)."""
    return tuple(float(size) for size in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_picture(path: str | Path) -> bool:
    """A 2D picture file (PNG, JPEG, BMP): pixels without a physical geometry."""
    return str(path).lower().endswith(PICTURE_SUFFIXES)


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def image_suffix(path: str | Path) -> str:
    """``.nii.gz``, ``.nrrd`` ...: the accepted suffix ``path`` ends with (case kept), else its last suffix."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[-len(suffix):]
    return Path(path).suffix


def ras_affine(image) -> np.ndarray:
    """The 4x4 voxel-to-RAS affine of a 3D SimpleITK image (identity for other dimensions)."""
    if image.GetDimension() != 3:
        return np.eye(4)
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def _itk_array(image) -> np.ndarray:
    """Voxels in (i, j, k[, component]) order."""
    import SimpleITK as sitk
    array = sitk.GetArrayFromImage(image)
    scalar_axes = image.GetDimension()
    order = tuple(reversed(range(scalar_axes))) + tuple(range(scalar_axes, array.ndim))
    return array.transpose(order)


def itk_message(text: str) -> str:
    """SimpleITK's error text in one line: ``PNGImageIO: Error while reading file: a.png`` from its three lines
    (the C++ source location first, then ``ITK ERROR: PNGImageIO(0x55...): ...``)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    useful = [line for line in lines if line.startswith("ITK ERROR:")] or lines[-1:]
    message = re.sub(r"\(0x[0-9a-fA-F]+\)", "", useful[0].removeprefix("ITK ERROR:").strip())
    return message.removeprefix("sitk::ERROR:").strip()


def _itk_read(path: str | Path, information_only: bool = False):
    """SimpleITK's reader of ``path`` after its header (``information_only``) or the image; its RuntimeError
    with the message in one line (:func:`itk_message`)."""
    import SimpleITK as sitk
    try:
        if information_only:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return reader
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise RuntimeError(itk_message(str(exc))) from None


def header_affine(path: str | Path) -> np.ndarray:
    """The 4x4 voxel-to-RAS affine a volume's header declares, no voxel read: nibabel's for a NIfTI (its sform when
    sform_code > 0, else its qform), SimpleITK's origin, spacing and direction for the ITK formats (identity for
    other than 3D ones, as :func:`ras_affine`)."""
    if is_nifti(path):
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    return ras_affine(_itk_read(path, information_only=True))


# Beyond this ratio of a sheared voxel axis's offset to the grid's voxel size the way back to the scan's grid
# (inference/inversion.py, its tolerance) cannot map the model's grid onto the scan's axis by axis.
SHEAR_TOLERANCE = 1e-6
# MONAI's Orientation labels: RAS+ axis codes, as the preprocessing builds them (data/transforms.py).
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def grid_shear(affine: np.ndarray, pixdim: Sequence[float] | None = None, axcodes: str = "RAS") -> float:
    """How sheared the model's preprocessed grid finds a scan of ``affine`` (4x4, mm): 0 for perpendicular voxel axes,
    else the largest offset of one grid axis along another, as a share of the largest voxel step (both in grid
    voxels of ``pixdim`` mm, isotropic if None).

    The preprocessing reorients the scan to ``axcodes`` (nibabel's ``io_orientation``, as MONAI's Orientation does),
    then resamples it onto ``rotation @ diag(pixdim)``, the rotation of the Cholesky factorisation of the reoriented
    axes (MONAI's ``zoom_affine``): a shear stays in the factor ``R`` (upper triangular), which the way back to the
    scan takes within :data:`SHEAR_TOLERANCE` of its largest entry, as this measures it.
    """
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3]
    start = nib.orientations.io_orientation(affine)
    order = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(axcodes, AXIS_LABELS))[:, 0]
    reoriented = np.empty_like(linear)
    reoriented[:, order.astype(int)] = linear  # the scan's axis j becomes the grid's axis order[j]
    factor = np.linalg.cholesky(reoriented.T @ reoriented).T
    grid = factor / np.asarray(pixdim if pixdim is not None else (1.0, 1.0, 1.0), dtype=np.float64)[:, None]
    return float(np.abs(np.triu(grid, 1)).max() / np.abs(grid).max())


def axes_from_perpendicular(affine: np.ndarray) -> float:
    """The largest angle, in degrees, by which two voxel axes of ``affine`` miss being perpendicular."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = columns / np.linalg.norm(columns, axis=0)
    cosines = np.clip(np.abs(unit.T @ unit)[np.triu_indices(3, 1)], 0.0, 1.0)
    return float(np.degrees(np.arcsin(cosines.max())))


def shear_problem(affine: np.ndarray, pixdim: Sequence[float] | None = None, axcodes: str = "RAS") -> str | None:
    """One line when a scan of ``affine`` has voxel axes too far from perpendicular for the way back to its grid
    (:func:`grid_shear` over :data:`SHEAR_TOLERANCE`), or axes of no length; else None."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    if not np.isfinite(affine).all() or not all(size > 0 for size in spacing):
        return f"its affine has voxel sizes {tuple(round(s, 4) for s in spacing)} mm: fix the header's geometry"
    try:
        shear = grid_shear(affine, pixdim, axcodes)
    except np.linalg.LinAlgError:  # two axes along one line: no grid to resample onto
        shear = math.inf
    if shear <= SHEAR_TOLERANCE:
        return None
    return (f"its affine is sheared (voxel axes {axes_from_perpendicular(affine):.2g} degrees from perpendicular, a "
            "tilted acquisition exported as is): the model's grid cannot be mapped back onto it; resample it onto "
            "perpendicular axes (e.g. 3D Slicer's Resample Scalar Volume, or dcm2niix's tilt correction from the "
            "DICOM series) and run again")


# A NIfTI's scl_slope and scl_inter beyond this magnitude scale no scanner's values (a CT's are 1 and -1024 or 0).
MAX_SCALING = 1e6


def scaling_problem(slope: float, inter: float) -> str | None:
    """One line when a NIfTI header's scaling ``value * scl_slope + scl_inter`` is not one to apply; else None.

    ``scl_slope`` 0 or NaN means no scaling (the NIfTI standard, as nibabel and ITK read it: ``scl_inter`` is then
    ignored); otherwise both must be finite and within :data:`MAX_SCALING` in magnitude. nibabel refuses an infinite
    ``scl_inter`` in library words, ignores an infinite ``scl_slope`` that ITK applies, and applies ``1e30`` as is.
    """
    slope, inter = float(slope), float(inter)
    if slope == 0 or math.isnan(slope):
        return None
    if math.isfinite(slope) and math.isfinite(inter) and abs(slope) <= MAX_SCALING and abs(inter) <= MAX_SCALING:
        return None
    return (f"its header scales the stored values by scl_slope {slope:g} and scl_inter {inter:g}, which no scanner's "
            f"values take (both finite and at most {MAX_SCALING:g} in magnitude; a CT's are 1 and -1024 or 0): fix the "
            "scaling, or set scl_slope 1 and scl_inter 0")


def read_nifti_header(path: str | Path):
    """The NIfTI-1 or NIfTI-2 header of ``path`` (``.nii`` or ``.nii.gz``, either byte order), read alone: unlike
    ``nib.load`` it is read whatever its scaling says; ``ValueError`` or ``OSError`` for what is no NIfTI header."""
    from nibabel.openers import ImageOpener
    with ImageOpener(str(path)) as stream:
        head = stream.read(540)
    if len(head) < 348:
        raise ValueError(f"{len(head)} bytes, shorter than a NIfTI header")
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    try:
        return header_class.from_fileobj(io.BytesIO(head), check=False)
    except Exception as exc:  # nibabel raises several types for what is not its header
        raise ValueError(f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0]}") from None


def nifti_header_problem(header) -> str | None:
    """One line when a NIfTI-1 or NIfTI-2 ``header`` declares what nibabel or MONAI would read wrongly or fail on
    late, in library words: its scaling (:func:`scaling_problem`); else None."""
    return scaling_problem(header["scl_slope"], header["scl_inter"])


def sform_qform_note(header) -> str | None:
    """One line when a NIfTI header's sform and qform (both codes above 0) place a corner voxel more than a voxel
    apart; else None. The sform is used, as nibabel and MONAI choose it (sform_code > 0); ITK (ITK-SNAP, SimpleITK)
    takes the qform unless the sform_code is 1 (scanner), so viewers built on it show the scan elsewhere."""
    try:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        sform, qform = np.asarray(header.get_sform(), np.float64), np.asarray(header.get_qform(), np.float64)
    except Exception:  # nibabel raises several types for a qform it cannot turn into an affine: the checks say why
        return None
    if sform_code <= 0 or qform_code <= 0 or not (np.isfinite(sform).all() and np.isfinite(qform).all()):
        return None
    shape = [max(1, int(n)) for n in header.get_data_shape()[:3]] + [1] * (3 - len(header.get_data_shape()[:3]))
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    apart = float(np.linalg.norm((sform - qform) @ corners, axis=0).max())
    voxel = min(voxel_spacing(sform))
    if not apart > voxel:
        return None
    others = "ITK-based tools (ITK-SNAP) read it too" if sform_code == 1 else \
        "ITK-based tools (ITK-SNAP) read the qform and show the scan elsewhere"
    return (f"its sform (code {sform_code}) and qform (code {qform_code}) place voxels up to {apart:.3g} mm apart "
            f"({apart / voxel:.2g} voxels): the sform is used, as nibabel and MONAI do, and the mask carries it as "
            f"both; {others}")


def image_shape(path: str | Path) -> tuple[int, ...]:
    """The voxel shape (i, j, k[, components]) from the file's header, without reading the voxels."""
    if is_nifti(path):
        return tuple(nib.load(str(path)).shape)
    reader = _itk_read(path, information_only=True)
    components = reader.GetNumberOfComponents()
    return tuple(reader.GetSize()) + ((components,) if components > 1 else ())


@dataclass(frozen=True)
class PictureHeader:
    """A picture as its header declares it: ``width`` (columns) and ``height`` (rows) in pixels, and
    ``bits`` per sample (PNG: 1 to 16 per channel; JPEG: 8 or 12; BMP: bits per pixel)."""

    width: int
    height: int
    bits: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): each holds the frame's size.
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_HEADER_LIMIT = 1 << 20  # a frame marker further in than 1 MB of metadata: not a picture this reads


def _png_header(head: bytes) -> PictureHeader:
    # The IHDR chunk comes first: length (4), "IHDR", width and height (big-endian 32 bits), bit depth.
    if len(head) < 25 or head[12:16] != b"IHDR":
        raise ValueError("no PNG header (IHDR) at its start")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return PictureHeader(width, height, head[24])


def _bmp_header(head: bytes) -> PictureHeader:
    # A 14-byte file header, then the DIB header: its size says its kind. The 12-byte OS/2 core header holds
    # 16-bit sizes, the others 32-bit ones; a negative height is a top-down picture.
    if len(head) < 26:
        raise ValueError("its BMP header is cut short")
    size = int.from_bytes(head[14:18], "little")
    if size == 12:
        width, height = int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
        bits = int.from_bytes(head[24:26], "little")
    elif size >= 40 and len(head) >= 30:
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = abs(int.from_bytes(head[22:26], "little", signed=True))
        bits = int.from_bytes(head[28:30], "little")
    else:
        raise ValueError(f"a BMP header of unknown size {size}")
    return PictureHeader(width, height, bits)


def _jpeg_header(stream) -> PictureHeader:
    # Segments after the start-of-image marker: 0xFF, a marker byte, then (except for the stand-alone markers)
    # a big-endian length that counts itself. The first start-of-frame segment holds precision, height, width.
    stream.seek(2)
    while stream.tell() < JPEG_HEADER_LIMIT:
        byte = stream.read(1)
        if not byte:
            break
        if byte != b"\xff":
            continue  # bytes between segments: skipped as decoders do
        marker = stream.read(1)
        while marker == b"\xff":  # fill bytes
            marker = stream.read(1)
        if not marker or marker[0] == 0xDA or marker[0] == 0xD9:  # start of scan or end of image: no frame before
            break
        if marker[0] in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
            continue
        length_bytes = stream.read(2)
        if len(length_bytes) < 2:
            break
        length = int.from_bytes(length_bytes, "big")
        if marker[0] in JPEG_FRAMES:
            frame = stream.read(5)
            if len(frame) < 5:
                break
            return PictureHeader(int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big"), frame[0])
        if length < 2:
            raise ValueError("a JPEG segment of length below 2")
        stream.seek(length - 2, 1)
    raise ValueError("no JPEG frame header (SOF) before its data")


def picture_header(path: str | Path) -> PictureHeader:
    """The size and bit depth a PNG, JPEG or BMP file declares, from its first bytes (the file's kind from its
    signature, whatever its suffix); ``ValueError`` naming what is missing for anything else."""
    with open(path, "rb") as stream:
        head = stream.read(64)
        if head.startswith(PNG_SIGNATURE):
            return _png_header(head)
        if head.startswith(b"BM"):
            return _bmp_header(head)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_header(stream)
    raise ValueError("not a PNG, JPEG or BMP file (its first bytes are none of their signatures)")


def pixels_problem(width: int, height: int, max_pixels: int, whose: str = "") -> str | None:
    """One line with the numbers when a ``width`` x ``height`` picture has more than ``max_pixels`` pixels, else
    None; ``whose`` comes before the flag's name (the service says ``this server's ``). The command line and the
    service both judge a picture's size by this."""
    if width * height <= max_pixels:
        return None
    return (f"{width} x {height} pixels ({width * height / 1e6:.1f} megapixels) exceed {whose}"
            f"--max_pixels {max_pixels / 1e6:g} megapixels")


def check_picture_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> PictureHeader:
    """The picture's header, once its size is within ``max_pixels``: else a one-line :class:`UserError` naming the
    file, its size and what to do, before a pixel is decoded (a decoder allocates the declared size whole). An
    unreadable header is a one-line error too."""
    try:
        header = picture_header(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable picture ({exc}): convert it to PNG again") from None
    if header.width < 1 or header.height < 1:
        raise UserError(f"{path}: unreadable picture (its header declares {header.width} x {header.height} pixels)")
    problem = pixels_problem(header.width, header.height, max_pixels)
    if problem:
        raise UserError(f"{path}: {problem}: shrink the picture, or raise --max_pixels if this machine's memory "
                        "takes it")
    return header


def picture_scale(dtype: np.dtype) -> float:
    """The brightest value of a picture read as ``dtype``: 65535 for a 16-bit PNG, 255 for 8-bit pictures (PNG,
    JPEG, BMP; PNGs of 1, 2 or 4 bits are read as 8-bit, their values spread to 0..255)."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind == "u" else 255.0


def read_volume(path: str | Path, max_pixels: int | None = None) -> Volume:
    """Voxels and RAS affine of a NIfTI (nibabel) or ITK-format (SimpleITK) file; errors are the libraries'
    (SimpleITK's in one line). With ``max_pixels`` (the inputs a user names), a picture's size is checked from its
    header first (:func:`check_picture_size`); files this project wrote or checked before are read without."""
    path = Path(path)
    if is_nifti(path):
        image = nib.load(str(path))
        return Volume(tuple(image.shape), image.affine, np.asanyarray(image.dataobj))
    if is_picture(path) and max_pixels is not None:
        check_picture_size(path, max_pixels)
    image = _itk_read(path)
    data = _itk_array(image)
    return Volume(tuple(data.shape), ras_affine(image), data, image.GetNumberOfComponentsPerPixel())


class SimpleITKReader(ImageReader):
    """MONAI image reader for MHA/MHD/NRRD files through SimpleITK: data (X, Y, Z) with a RAS affine;
    and for pictures: (X, Y[, colour]) with X the columns, Y the rows.

    MONAI's own ``ITKReader`` needs the ``itk`` package, which this project does not install.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(is_image_file(name) and not is_nifti(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs):
        # LoadImage tries a reader it was given on every file: leave NIfTI to nibabel, as MONAI does.
        if not self.verify_suffix(data):
            raise ValueError(f"SimpleITKReader reads {', '.join(ITK_SUFFIXES + PICTURE_SUFFIXES)} files only")
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError("SimpleITKReader reads one file per image")
        return _itk_read(names[0])

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        image = img  # a SimpleITK image is iterable (its voxels): never pass it to ensure_tuple
        affine = ras_affine(image)
        array = _itk_array(image)
        meta = {"affine": affine, "original_affine": affine.copy(),
                "spatial_shape": np.asarray(image.GetSize()), "space": "RAS",
                "original_channel_dim": float("nan") if image.GetNumberOfComponentsPerPixel() == 1 else -1,
                # MONAI casts the voxels to float32: a picture's bit depth is kept here for its scaling to 0..1.
                PICTURE_SCALE_KEY: picture_scale(array.dtype)}
        return array, meta


def mask_path(out_dir: Path, case: str, image: Path) -> Path:
    """``out_dir/CASE_seg`` with the input's own format (``.nii.gz`` for NIfTI and DICOM inputs, ``.png``
    for pictures: lossless, whatever the input's format)."""
    if is_picture(image):
        return out_dir / f"{case}_seg.png"
    suffix = image_suffix(image)
    if is_nifti(image) or suffix.lower() not in ITK_SUFFIXES:
        suffix = ".nii.gz"
    elif suffix.lower() in (".mhd", ".nhdr"):  # header + data pairs: one self-contained file instead
        suffix = ".mha" if suffix.lower() == ".mhd" else ".nrrd"
    return out_dir / f"{case}_seg{suffix}"


# The key of a mask's provenance: the NIfTI extension's JSON object and the NRRD/MHA metadata field.
PROVENANCE_KEY = "btcv_unetr_provenance"
# NIfTI has no registered extension code for JSON; "comment" (6) is the one meant for free text.
NIFTI_COMMENT_CODE = 6


def _nifti_provenance(mask: nib.Nifti1Image, provenance: Mapping) -> None:
    """The short form in ``descrip`` (shown by most viewers), the full one as a JSON extension."""
    mask.header["descrip"] = descrip(provenance).encode("ascii")
    content = json.dumps({PROVENANCE_KEY: dict(provenance)}, sort_keys=True).encode()
    mask.header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_COMMENT_CODE, content))


def write_mask(labels: np.ndarray, like: Path, path: Path, provenance: Mapping | None = None) -> None:
    """Write uint8 ``labels`` (the voxel grid of image ``like``) to ``path`` with ``like``'s geometry.

    NIfTI masks carry the image's affine as both qform and sform; ITK-format masks the image's
    origin, spacing and direction (read from its header only). ``provenance`` (see
    :func:`btcv_unetr.inference.provenance.provenance`) goes into the header: NIfTI ``descrip`` (short) and an
    extension (JSON), an NRRD/MHA metadata field (JSON). PNG masks carry none: SimpleITK writes no
    PNG text chunks.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    if is_nifti(path):
        affine = nib.load(str(like)).affine if is_nifti(like) else read_volume(like).affine
        mask = nib.Nifti1Image(labels, affine)
        mask.set_qform(affine, code=1)
        mask.set_sform(affine, code=1)
        if provenance is not None:
            _nifti_provenance(mask, provenance)
        atomic_save_nifti(mask, path)
        return
    import SimpleITK as sitk
    if is_picture(path):
        with atomic_path(path) as tmp:
            sitk.WriteImage(sitk.GetImageFromArray(labels.T), str(tmp))
        return
    header = sitk.ImageFileReader()
    header.SetFileName(str(like))
    header.ReadImageInformation()
    mask = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    mask.SetOrigin(header.GetOrigin())
    mask.SetSpacing(header.GetSpacing())
    mask.SetDirection(header.GetDirection())
    if provenance is not None:
        mask.SetMetaData(PROVENANCE_KEY, json.dumps(dict(provenance), sort_keys=True))
    with atomic_path(path) as tmp:
        sitk.WriteImage(mask, str(tmp), True)


def mask_provenance(path: str | Path) -> dict | None:
    """The provenance :func:`write_mask` stored in the mask at ``path``, or None where there is none."""
    if is_nifti(path):
        for extension in nib.load(str(path)).header.extensions:
            if extension.get_code() != NIFTI_COMMENT_CODE:
                continue
            try:
                content = json.loads(extension.get_content().rstrip(b"\0"))
            except ValueError:
                continue  # another tool's comment
            if isinstance(content, dict) and isinstance(content.get(PROVENANCE_KEY), dict):
                return content[PROVENANCE_KEY]
        return None
    if is_picture(path):
        return None
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return json.loads(reader.GetMetaData(PROVENANCE_KEY)) if reader.HasMetaDataKey(PROVENANCE_KEY) else None
