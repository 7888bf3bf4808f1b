"""Image files in and masks out, each in its own geometry: NIfTI by nibabel, MHA/MHD/NRRD and the 2D
pictures (PNG, JPEG, BMP) by SimpleITK.

    image_shape       the voxel shape from the header only
    read_volume       any accepted file -> voxels (X, Y, Z) and the RAS affine (checks, overlays, metrics)
    SimpleITKReader   the same for MONAI's ``LoadImage`` (MONAI reads the ITK formats only with ``itk``)
    dicom_series      the DICOM series of a folder; write_dicom_series_as_nifti converts one
    mask_path         where a case's mask goes: ``CASE_seg`` with the input's own format
    write_mask        labels on the input's voxel grid, written with the input's geometry and provenance, atomically
    mask_provenance   the provenance a mask's header carries (NIfTI extension, NRRD/MHA metadata), or None

Voxel order is the file's (i, j, k) in every array here; SimpleITK's ``GetArrayFromImage`` is
(k, j, i), hence the transposes. ITK's world is LPS and NIfTI's RAS: the affines returned are RAS,
as nibabel's and MONAI's are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

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


def image_shape(path: str | Path) -> tuple[int, ...]:
    """The voxel shape (i, j, k[, components]) from the file's header, without reading the voxels."""
    if is_nifti(path):
        return tuple(nib.load(str(path)).shape)
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    components = reader.GetNumberOfComponents()
    return tuple(reader.GetSize()) + ((components,) if components > 1 else ())


def read_volume(path: str | Path) -> Volume:
    """Voxels and RAS affine of a NIfTI (nibabel) or ITK-format (SimpleITK) file; errors are the libraries'."""
    path = Path(path)
    if is_nifti(path):
        image = nib.load(str(path))
        return Volume(tuple(image.shape), image.affine, np.asanyarray(image.dataobj))
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
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
        import SimpleITK as sitk
        return sitk.ReadImage(str(names[0]))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        image = img  # a SimpleITK image is iterable (its voxels): never pass it to ensure_tuple
        affine = ras_affine(image)
        meta = {"affine": affine, "original_affine": affine.copy(),
                "spatial_shape": np.asarray(image.GetSize()), "space": "RAS",
                "original_channel_dim": float("nan") if image.GetNumberOfComponentsPerPixel() == 1 else -1}
        return _itk_array(image), meta


def dicom_series(folder: Path) -> list[str]:
    """The DICOM series UIDs of the files in ``folder`` (GDCM through SimpleITK)."""
    import SimpleITK as sitk
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def write_dicom_series_as_nifti(folder: Path, series: str, path: Path) -> None:
    """Series ``series`` of ``folder`` written to ``path`` as NIfTI with its geometry; SimpleITK's RuntimeError
    for a series it cannot read."""
    import SimpleITK as sitk
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series))
    sitk.WriteImage(reader.Execute(), str(path))


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
    :func:`btcv_unetr.model.provenance.provenance`) goes into the header: NIfTI ``descrip`` (short) and an
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
