"""btcv_unetr.serve.uploads, in-process: files identified by their bytes, sized from their headers, checked
whole, and stored under fixed names; every refusal is one line with an HTTP status (400 or 413)."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from btcv_unetr.data.checks import Expected
from btcv_unetr.serve.limits import Declared, JobLimits
from btcv_unetr.serve.settings import MB
from btcv_unetr.serve.uploads import MAX_ZIP_EXPANSION, BadUpload, safe_name, store_upload

VOLUMES, PICTURES = Expected(3, 1), Expected(2, 3)
LIMITS = JobLimits(max_job_memory_gb=1)  # the machine's memory decides nothing here


def _nifti(array: np.ndarray, zooms=(1.5, 1.5, 2.0), compress: bool = True) -> bytes:
    image = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    data = image.to_bytes()
    return gzip.compress(data, mtime=0) if compress else data


def _store(tmp_path: Path, content: bytes, expected: Expected = VOLUMES, limit_bytes: int = 64 * MB,
           limits: JobLimits = LIMITS, memory: int = 0) -> tuple[str, Path, Declared]:
    """``content`` received as an upload of a file the client calls "scan"; ``memory`` is the job's estimate."""
    folder = tmp_path / "job"
    folder.mkdir(exist_ok=True)
    upload = tmp_path / "upload.part"
    upload.write_bytes(content)
    return store_upload(upload, folder, "scan", expected, limit_bytes, limits, lambda declared: memory)


def _refusal(tmp_path: Path, content: bytes, **kwargs) -> tuple[int, str]:
    """The status and the line of a refused upload, checked to be one line naming the client's file only."""
    with pytest.raises(BadUpload) as refused:
        _store(tmp_path, content, **kwargs)
    detail = refused.value.detail
    assert detail.startswith("scan: ") and "\n" not in detail and str(tmp_path) not in detail, detail
    return refused.value.status, detail


def _png(path: Path, rows: int, columns: int, channels: int = 3) -> np.ndarray:
    shape = (rows, columns, channels) if channels > 1 else (rows, columns)
    pixels = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=channels > 1), str(path))
    return pixels


def _dicom_zip(folder: Path, slices: int = 3, extra: dict[str, bytes] | None = None) -> bytes:
    """A zipped series of ``slices`` CT slices of 8 columns x 6 rows (0.7 mm pixels, 2.5 mm apart), under
    member names that point outside any folder, and ``extra`` members."""
    uid = "1.2.826.0.1.3680043.2.1125.1.88"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k in range(slices):
            plane = sitk.GetImageFromArray(np.full((6, 8), k, np.int16))
            plane.SetSpacing((0.7, 0.7))
            for tag, value in {"0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2",
                               "0008|0018": f"{uid}.3.{k}", "0020|0013": str(k + 1),
                               "0020|0032": f"0\\0\\{2.5 * k:g}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
                plane.SetMetaData(tag, value)
            path = folder / f"{k}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(plane)
            archive.write(path, f"../../outside/{k}.dcm")
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize("compress, name", [(True, "input.nii.gz"), (False, "input.nii")])
def test_a_nifti_is_stored_under_a_fixed_name_with_what_its_header_declares(tmp_path, compress, name):
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    kind, path, declared = _store(tmp_path, _nifti(voxels, compress=compress))
    assert (kind, path) == ("nifti", tmp_path / "job" / name)
    assert declared == Declared((4, 5, 6), (1.5, 1.5, 2.0), 1, 2)
    assert np.array_equal(np.asarray(nib.load(path).dataobj), voxels)
    assert not (tmp_path / "upload.part").exists()  # moved, not copied


def _cut_short(array: np.ndarray) -> bytes:
    """A whole header whose voxels stop half-way (the file was cut, then compressed again)."""
    whole = _nifti(array, compress=False)
    return gzip.compress(whole[:352 + array.nbytes // 2], mtime=0)


def _zero_spacing() -> bytes:
    """A header without a transform whose second voxel size is 0 (nibabel refuses such an affine)."""
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), None)
    image.header["pixdim"][1:4] = (1.0, 0.0, 1.0)
    return gzip.compress(image.to_bytes(), mtime=0)


def _with_nan() -> bytes:
    voxels = np.zeros((6, 6, 6), np.float32)
    voxels[0, 0, :3] = np.nan
    voxels[1, 1, 1] = np.inf
    return _nifti(voxels)


@pytest.mark.parametrize("content, expected", [
    (b"", "scan: an empty file; this model takes .nii, .nii.gz or a .zip of one DICOM series"),
    (b"hello, not an image", "scan: not a NIfTI image, DICOM zip or picture; this model takes .nii"),
    (gzip.compress(b"x" * 2000, mtime=0), "scan: gzip data that is not a NIfTI image; send .nii, .nii.gz or a .zip"),
    (_nifti(np.zeros((4, 4, 4), np.int16))[:60], "scan: truncated or corrupt gzip data"),
    (_cut_short(np.zeros((8, 8, 8), np.int16)), "scan: holds 512 bytes of voxels where its header declares 1024 "
                                                "(8 x 8 x 8 int16): the file is cut short; send the whole file"),
    (_with_nan(), "scan: 4 NaN or infinite voxels: replace them"),
    (_nifti(np.zeros((16, 16), np.int16), zooms=(1.0, 1.0, 1.0)), "scan: image is 2D with shape (16, 16)"),
    (_zero_spacing(), "scan: the header's voxel spacing (1.0, 0.0, 1.0) is not positive: fix the header"),
    (b"PK\x03\x04 broken", "scan: unreadable zip (BadZipFile): zip the series folder again"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "scan: a PNG file; this model takes .nii, .nii.gz or a .zip"),
], ids=["empty", "text", "gzip_of_text", "truncated_gzip", "short_voxels", "nan", "2d", "zero_spacing", "bad_zip",
        "png_to_a_3d_model"])
def test_uploads_that_are_not_a_whole_finite_volume_are_400_in_one_line(tmp_path, content, expected):
    status, detail = _refusal(tmp_path, content)
    assert status == 400 and detail.startswith(expected), detail
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == []  # nothing stored as the job's input


def _nifti_with(shape=(8, 8, 8), affine=np.diag([1.5, 1.5, 2.0, 1.0]), **fields) -> bytes:
    """A gzipped int16 NIfTI whose header ``fields`` are set as written (nibabel keeps them on saving)."""
    image = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
    for key, value in fields.items():
        image.header[key] = value
    return gzip.compress(image.to_bytes(), mtime=0)


SHEARED = np.array([[1.5, 0.3, 0, 0], [0, 1.5, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])
TILTED = np.eye(4)  # turned 0.2 rad about x, axes still perpendicular: an oblique scan, taken
TILTED[1:3, 1:3] = np.array([[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]) @ np.diag([1.5, 2.0])


@pytest.mark.parametrize("content, expected", [
    (_nifti_with(scl_slope=1.0, scl_inter=np.inf), "scan: its header scales the stored values by scl_slope 1 and "
                                                   "scl_inter inf, which no scanner's values take"),
    (_nifti_with(scl_slope=1e30, scl_inter=0.0), "scan: its header scales the stored values by scl_slope 1e+30"),
    (_nifti_with(scl_slope=np.inf, scl_inter=0.0), "scan: its header scales the stored values by scl_slope inf"),
    (_nifti_with(shape=(8, 8, 8, 1, 1)), "scan: image is 5D with shape (8, 8, 8, 1, 1), expected a 3D volume"),
    (_nifti_with(affine=SHEARED), "scan: its affine is sheared (voxel axes 11 degrees from perpendicular"),
], ids=["scl_inter_inf", "scl_slope_1e30", "scl_slope_inf", "5d_singletons", "sheared"])
def test_nifti_headers_that_failed_late_are_400_from_the_header(tmp_path, content, expected):
    """What nibabel or MONAI failed on after the upload was taken, or segmented without a word: one line, 400."""
    status, detail = _refusal(tmp_path, content)
    assert status == 400 and detail.startswith(expected), detail


@pytest.mark.parametrize("content", [
    _nifti_with(scl_slope=1.0, scl_inter=-1024.0), _nifti_with(scl_slope=np.nan, scl_inter=5.0),
    _nifti_with(shape=(8, 8, 8, 1)), _nifti_with(affine=TILTED)],
    ids=["ct_scaling", "no_scaling", "singleton_4th_axis", "tilted_perpendicular_axes"])
def test_nifti_headers_that_keep_their_geometry_are_taken(tmp_path, content):
    assert _store(tmp_path, content)[0] == "nifti"


@pytest.mark.parametrize("limits, memory, expected", [
    (JobLimits(max_voxels=500, max_job_memory_gb=1), 0, "scan: 10 x 10 x 10 voxels (0 million) exceed this "
                                                        "server's --max_voxels 0.0005 million"),
    (JobLimits(max_extent_mm=(10.0, 10.0, 10.0), max_job_memory_gb=1), 0,
     "scan: a field of view of 15 x 15 x 20 mm is larger than any body this server takes"),
    (LIMITS, 3 << 30, "scan: 10 x 10 x 10 would need about 3.0 GB to segment, over this server's "
                      "--max_job_memory_gb 1.0"),
])
def test_volumes_over_a_limit_are_413_from_their_header(tmp_path, limits, memory, expected):
    status, detail = _refusal(tmp_path, _nifti(np.zeros((10, 10, 10), np.int16)), limits=limits, memory=memory)
    assert status == 413 and detail.startswith(expected), detail


def test_a_zipped_dicom_series_is_stored_as_numbered_files_and_a_nifti(tmp_path):
    content = _dicom_zip(tmp_path)
    kind, path, declared = _store(tmp_path, content)
    assert (kind, path) == ("dicom", tmp_path / "job" / "input.nii.gz")
    assert declared.shape == (8, 6, 3) and declared.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert sorted(p.name for p in (tmp_path / "job" / "dicom").iterdir()) == ["00000.dcm", "00001.dcm", "00002.dcm"]
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()
    image = nib.load(path)
    assert image.shape == (8, 6, 3) and np.allclose(image.header.get_zooms(), (0.7, 0.7, 2.5), atol=1e-4)
    assert [int(np.asarray(image.dataobj)[0, 0, k]) for k in range(3)] == [0, 1, 2]  # slices in order


def test_zips_are_sized_from_their_directory_before_anything_is_unpacked(tmp_path):
    too_many = JobLimits(max_dicom_files=2, max_job_memory_gb=1)
    status, detail = _refusal(tmp_path, _dicom_zip(tmp_path), limits=too_many)
    assert status == 413 and "the zip holds 3 files, over this server's --max_dicom_files 2" in detail
    bomb = _dicom_zip(tmp_path, extra={"padding.bin": b"\x00" * (MAX_ZIP_EXPANSION * 2 * MB)})
    status, detail = _refusal(tmp_path, bomb, limit_bytes=2 * MB)
    assert status == 413 and f"over {MAX_ZIP_EXPANSION} times the upload limit" in detail
    assert not (tmp_path / "job" / "dicom").exists()


def test_a_zip_of_anything_but_one_series_is_400(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "no images here")
    status, detail = _refusal(tmp_path, buffer.getvalue())
    assert status == 400 and detail == ("scan: no DICOM image series that can be stacked into a volume (no DICOM "
                                        "image files): expected the slices of one CT series")


def test_a_picture_for_a_2d_model_is_sized_from_its_header_and_stored(tmp_path):
    _png(tmp_path / "photo.png", rows=6, columns=9)
    kind, path, declared = _store(tmp_path, (tmp_path / "photo.png").read_bytes(), expected=PICTURES)
    assert (kind, path) == ("picture", tmp_path / "job" / "input.png")
    assert declared == Declared((9, 6), (1.0, 1.0), 3, 1)


@pytest.mark.parametrize("case, status, expected", [
    ("grey", 400, "scan: 1 colour channel(s); the model takes 3 (in_channels 3)"),
    ("nifti", 400, "scan: a NIfTI file; this model takes a PNG or JPEG picture"),
    ("cut", 400, "scan: unreadable picture"),
    ("large", 413, "scan: 9 x 6 pixels (0.0 megapixels) exceed this server's --max_pixels 5e-05 megapixels"),
])
def test_pictures_a_2d_model_cannot_take_are_refused(tmp_path, case, status, expected):
    _png(tmp_path / "photo.png", rows=6, columns=9, channels=1 if case == "grey" else 3)
    content = {"nifti": _nifti(np.zeros((8, 8, 8), np.int16)),
               "cut": (tmp_path / "photo.png").read_bytes()[:60]}.get(case, (tmp_path / "photo.png").read_bytes())
    limits = JobLimits(max_pixels=50, max_job_memory_gb=1) if case == "large" else LIMITS
    refused_status, detail = _refusal(tmp_path, content, expected=PICTURES, limits=limits)
    assert refused_status == status and detail.startswith(expected), detail


@pytest.mark.parametrize("filename, name", [
    ("../../etc/passwd Case 7.nii.gz", "passwd_Case_7"), ("C:\\scans\\liver.NII", "liver"),
    ("series.zip", "series"), ("photo.JPEG", "photo"), ("..", "scan"), (None, "scan"), ("$(rm -rf).nii", "rm_-rf"),
    ("x" * 100 + ".nii.gz", "x" * 64),
])
def test_client_file_names_become_safe_display_names(filename, name):
    assert safe_name(filename) == name
