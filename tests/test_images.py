"""btcv_unetr.data.images: every accepted format reads as voxels (i, j, k) with the same RAS affine, and masks
are written on their input's grid in its format, geometry kept.

The oracle for the ITK formats is nibabel reading the same image that SimpleITK wrote as NIfTI (SimpleITK
converts its LPS world to NIfTI's RAS itself), so the affines here are not derived from the code under test.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from btcv_unetr.data.dicom import find_series, read_series, write_series_as_nifti
from btcv_unetr.data.images import (
    SimpleITKReader,
    check_picture_size,
    image_shape,
    image_suffix,
    is_nifti,
    is_picture,
    itk_message,
    mask_path,
    picture_header,
    picture_scale,
    read_volume,
    write_mask,
)
from btcv_unetr.errors import UserError
from btcv_unetr.files import TEMPORARY_GLOB

SHAPE = (5, 4, 3)  # (i, j, k): unequal, so that a transposed axis cannot pass


def _oblique_image() -> sitk.Image:
    """A small int16 volume of distinct values with spacing, origin and a 30-degree turn about the z axis."""
    voxels = np.arange(math.prod(SHAPE), dtype=np.int16).reshape(SHAPE)  # voxels[i, j, k]
    image = sitk.GetImageFromArray(voxels.transpose(2, 1, 0))  # SimpleITK's arrays are (k, j, i)
    turn = math.radians(30)
    image.SetDirection((math.cos(turn), -math.sin(turn), 0, math.sin(turn), math.cos(turn), 0, 0, 0, 1))
    image.SetSpacing((0.8, 1.25, 2.5))
    image.SetOrigin((-12.0, 30.5, 7.0))
    return image


@pytest.fixture(scope="module")
def oblique(tmp_path_factory) -> dict[str, Path]:
    """The same image as .nii.gz, .nrrd and .mha (written by SimpleITK)."""
    folder = tmp_path_factory.mktemp("oblique")
    paths = {suffix: folder / f"scan{suffix}" for suffix in (".nii.gz", ".nrrd", ".mha")}
    for path in paths.values():
        sitk.WriteImage(_oblique_image(), str(path))
    return paths


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_every_volume_format_reads_as_i_j_k_with_the_same_ras_affine(oblique, suffix):
    expected = nib.load(oblique[".nii.gz"])
    volume = read_volume(oblique[suffix])
    assert volume.shape == SHAPE and volume.spatial_shape == SHAPE and volume.components == 1
    assert np.array_equal(np.asarray(volume.data), np.arange(math.prod(SHAPE)).reshape(SHAPE))
    assert np.allclose(volume.affine, expected.affine, atol=1e-5)
    assert np.allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), (0.8, 1.25, 2.5))  # spacing in mm
    assert image_shape(oblique[suffix]) == SHAPE  # from the header alone


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_monai_loads_itk_formats_through_the_reader_as_read_volume_does(oblique, suffix):
    data = LoadImage(reader=SimpleITKReader(), image_only=True)(str(oblique[suffix]))
    volume = read_volume(oblique[suffix])
    assert tuple(data.shape) == SHAPE and np.array_equal(np.asarray(data), volume.data)
    assert np.allclose(np.asarray(data.affine), volume.affine, atol=1e-5)
    reader = SimpleITKReader()
    assert reader.verify_suffix(str(oblique[suffix])) and not reader.verify_suffix(str(oblique[".nii.gz"]))
    with pytest.raises(ValueError, match="reads .mha, .mhd, .nrrd"):
        reader.read(str(oblique[".nii.gz"]))


def test_a_png_reads_as_columns_rows_colours_without_geometry(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 9, 3), dtype=np.uint8)  # 6 rows, 9 columns
    path = tmp_path / "photo.PNG"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    volume = read_volume(path)
    assert volume.shape == (9, 6, 3) and volume.spatial_shape == (9, 6) and volume.components == 3
    assert np.array_equal(volume.data, rgb.transpose(1, 0, 2))  # data[x, y] is the pixel of column x, row y
    assert np.array_equal(volume.affine, np.eye(4))
    assert image_shape(path) == (9, 6, 3)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_a_mask_is_written_on_its_scans_grid_in_the_scans_format_and_geometry(oblique, suffix, tmp_path):
    labels = (np.arange(math.prod(SHAPE)) % 14).reshape(SHAPE).astype(np.int64)  # uint8 once written
    out = mask_path(tmp_path, "scan", oblique[suffix])
    assert out == tmp_path / f"scan_seg{suffix}"
    write_mask(labels, oblique[suffix], out)
    mask = read_volume(out)
    assert np.asarray(mask.data).dtype == np.uint8 and np.array_equal(mask.data, labels)
    assert np.allclose(mask.affine, read_volume(oblique[suffix]).affine, atol=1e-5)
    assert not list(tmp_path.glob(TEMPORARY_GLOB))
    if suffix == ".nii.gz":  # both header transforms, so that any viewer places it on the scan
        header = nib.load(out).header
        assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1


def test_a_nifti_mask_of_an_nrrd_scan_takes_the_scans_geometry(oblique, tmp_path):
    labels = np.ones(SHAPE, np.uint8)
    write_mask(labels, oblique[".nrrd"], tmp_path / "scan_seg.nii.gz")
    assert np.allclose(nib.load(tmp_path / "scan_seg.nii.gz").affine, nib.load(oblique[".nii.gz"]).affine, atol=1e-5)


def test_a_picture_mask_is_a_png_of_the_pictures_size(tmp_path):
    labels = np.zeros((9, 6), np.uint8)  # (columns, rows)
    labels[2:4, 1] = 2
    out = mask_path(tmp_path, "photo", Path("photo.jpg"))
    assert out == tmp_path / "photo_seg.png"  # lossless, whatever the picture's format
    write_mask(labels, Path("photo.jpg"), out)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).shape == (6, 9)  # rows, columns on disk
    assert np.array_equal(read_volume(out).data, labels)


@pytest.mark.parametrize("image, mask", [
    ("img0001.nii.gz", "img0001_seg.nii.gz"), ("img0001.nii", "img0001_seg.nii.gz"),
    ("ct.NRRD", "ct_seg.NRRD"), ("ct.nhdr", "ct_seg.nrrd"), ("ct.mhd", "ct_seg.mha"), ("ct.mha", "ct_seg.mha"),
    ("face.jpeg", "face_seg.png"), ("face.bmp", "face_seg.png"), ("series.dcm", "series_seg.nii.gz"),
])
def test_mask_names_keep_the_inputs_format_as_one_file(image, mask):
    assert mask_path(Path("out"), Path(image.split(".")[0]).name, Path("in") / image) == Path("out") / mask


def test_suffixes_are_recognised_whatever_their_case():
    assert image_suffix("a/SCAN.NII.GZ") == ".NII.GZ" and image_suffix("scan.v2.nrrd") == ".nrrd"
    assert image_suffix("notes.txt") == ".txt"
    assert is_nifti("x.Nii.Gz") and not is_nifti("x.nrrd") and is_picture("x.JPG") and not is_picture("x.mha")


def test_a_dicom_series_is_found_and_converted_with_its_geometry(tmp_path):
    """Three CT slices written by SimpleITK: one series, and its NIfTI has the slices' spacing and position."""
    image = sitk.Cast(_oblique_image(), sitk.sitkInt16)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # GDCM writes axial slices
    uid = "1.2.826.0.1.3680043.2.1125.1.77"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2",
                           "0008|0018": f"{uid}.3.{k}", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:g}" for v in position),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.5"}.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"{k}.dcm"))
        writer.Execute(plane)
    (series,) = find_series(tmp_path)  # btcv_unetr.data.dicom on files GDCM wrote
    assert series.uid == f"{uid}.2" and series.modality == "CT" and len(series.slices) == image.GetDepth()
    write_series_as_nifti(read_series(series, "series"), tmp_path / "series.nii.gz")
    volume = read_volume(tmp_path / "series.nii.gz")
    assert volume.shape == SHAPE
    assert np.allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), (0.8, 1.25, 2.5), atol=1e-4)
    assert np.allclose(volume.affine[:3, 3], (12.0, -30.5, 7.0), atol=1e-4)  # LPS origin, in RAS


# ---------------------------------------------------------------- issue 22: picture headers, bit depths, one-line errors


def _grey(rows: int = 6, columns: int = 9) -> np.ndarray:
    return (np.arange(rows * columns).reshape(rows, columns) * 7 % 256).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
@pytest.mark.parametrize("colour", [False, True])
def test_a_pictures_header_gives_the_size_simpleitk_reads(tmp_path, suffix, colour):
    picture = np.stack([_grey()] * 3, -1) if colour else _grey()
    path = tmp_path / f"p{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=colour), str(path))
    header = picture_header(path)
    assert (header.width, header.height) == read_volume(path).spatial_shape == (9, 6)
    assert header.bits == (8 if suffix != ".bmp" or not colour else 24)


def test_a_progressive_jpeg_and_a_top_down_bmp_are_sized_too(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    pil.fromarray(_grey(20, 30)).save(tmp_path / "p.jpg", progressive=True)
    assert (picture_header(tmp_path / "p.jpg").width, picture_header(tmp_path / "p.jpg").height) == (30, 20)
    sitk.WriteImage(sitk.GetImageFromArray(_grey()), str(tmp_path / "p.bmp"))
    data = bytearray((tmp_path / "p.bmp").read_bytes())
    data[22:26] = (-6).to_bytes(4, "little", signed=True)  # a negative height: rows stored top-down
    (tmp_path / "p.bmp").write_bytes(bytes(data))
    assert picture_header(tmp_path / "p.bmp").height == 6


def test_a_16_bit_png_declares_16_bits_and_reads_as_uint16(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(_grey().astype(np.uint16) * 257), str(tmp_path / "p.png"))
    assert picture_header(tmp_path / "p.png").bits == 16
    assert read_volume(tmp_path / "p.png").data.dtype == np.uint16
    assert picture_scale(np.uint16) == 65535 and picture_scale(np.uint8) == 255


def _header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height and which holds no pixel data at all."""
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    crc = zlib.crc32(header).to_bytes(4, "big")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + header + crc)
    return path


def test_a_picture_over_max_pixels_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = _header_only_png(tmp_path / "huge.png", 20000, 20000)
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: pytest.fail("the picture was decoded"))
    with pytest.raises(UserError) as refused:
        read_volume(path, max_pixels=64_000_000)
    assert str(refused.value) == (f"{path}: 20000 x 20000 pixels (400.0 megapixels) exceed --max_pixels 64 megapixels: "
                                  "shrink the picture, or raise --max_pixels if this machine's memory takes it")
    assert check_picture_size(_header_only_png(tmp_path / "ok.png", 80, 50), max_pixels=4000).pixels == 4000
    with pytest.raises(UserError, match="4001 x 1 pixels"):
        check_picture_size(_header_only_png(tmp_path / "wide.png", 4001, 1), max_pixels=4000)


@pytest.mark.parametrize("content, why", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "no PNG header (IHDR) at its start"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "no JPEG frame header (SOF) before its data"),
    (b"BM\x00\x00", "its BMP header is cut short"),
    (b"GIF89a", "not a PNG, JPEG or BMP file"),
])
def test_an_unreadable_picture_header_is_one_line(tmp_path, content, why):
    path = tmp_path / "p.png"
    path.write_bytes(content)
    with pytest.raises(UserError) as refused:
        check_picture_size(path)
    assert str(refused.value).startswith(f"{path}: unreadable picture ({why}") and "\n" not in str(refused.value)


def test_a_corrupt_pictures_error_is_one_line(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(_grey(40, 50)), str(tmp_path / "p.png"))
    data = bytearray((tmp_path / "p.png").read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = bytes(b ^ 0x5A for b in data[start:start + 40])
    (tmp_path / "p.png").write_bytes(bytes(data))
    with pytest.raises(RuntimeError) as failed:
        read_volume(tmp_path / "p.png")
    assert str(failed.value) == f"PNGImageIO: Error while reading file: {tmp_path / 'p.png'}"
    assert itk_message("Exception thrown in SimpleITK ImageFileReader_Execute: /src/x.cxx:249:\n"
                       "ITK ERROR: PNGImageIO(0x55ca19bcd2e0): Error while reading file: a.png\n") == \
        "PNGImageIO: Error while reading file: a.png"


def test_an_8_bit_and_a_16_bit_png_of_one_picture_are_the_same_model_input(tmp_path):
    from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
    from btcv_unetr.data.transforms import infer_transforms
    picture = _grey(48, 64)
    sitk.WriteImage(sitk.GetImageFromArray(picture), str(tmp_path / "p8.png"))
    sitk.WriteImage(sitk.GetImageFromArray(picture.astype(np.uint16) * 257), str(tmp_path / "p16.png"))
    config = build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml"), {"model": {"in_channels": 1}}])
    transform = infer_transforms(config)
    eight, sixteen = (transform({"image": str(tmp_path / name)})["image"] for name in ("p8.png", "p16.png"))
    assert eight.shape == (1, 64, 64) and float(eight.std()) > 0.5  # a picture, not a constant
    assert np.array_equal(np.asarray(eight), np.asarray(sixteen))


def test_a_16_bit_pictures_overlay_is_the_8_bit_ones(tmp_path):
    from btcv_unetr.inference.plots import save_picture_overlay
    picture = _grey().T  # (X, Y)
    labels = (picture > 128).astype(np.uint8)
    save_picture_overlay(picture, labels, tmp_path / "o8.png")
    save_picture_overlay(picture.astype(np.uint16) * 257, labels, tmp_path / "o16.png")
    assert np.array_equal(read_volume(tmp_path / "o8.png").data, read_volume(tmp_path / "o16.png").data)


def _sheared_affines(count: int, seed: int) -> list[np.ndarray]:
    """Affines near the shear the way back to the grid takes: a random turn (or an axis permutation), one shear of
    3e-8 to 3e-5 between two axes, voxels of 0.5 to 5 mm; stored as float32, as a NIfTI's sform is."""
    from scipy.spatial.transform import Rotation
    rng, affines = np.random.default_rng(seed), []
    for trial in range(count):
        turn = Rotation.random(random_state=seed + trial).as_matrix() if trial % 2 else np.eye(3)[:, rng.permutation(3)]
        shear = np.eye(3)
        i, j = rng.choice(3, 2, replace=False)
        shear[i, j] = 10 ** rng.uniform(-7.5, -4.5) * rng.choice([-1, 1])
        affine = np.eye(4)
        affine[:3, :3] = turn @ shear @ np.diag(rng.uniform(0.5, 5.0, 3))
        affines.append(affine.astype(np.float32).astype(np.float64))
    return affines


@pytest.mark.parametrize("pixdim", [(1.5, 1.5, 2.0), (0.8, 3.0, 5.0)])
def test_the_shear_check_refuses_exactly_what_the_way_back_to_the_scan_cannot_map(pixdim, tmp_path):
    """grid_shear over SHEAR_TOLERANCE against the real thing: MONAI's preprocessing of a scan of that affine, then
    the inversion's voxel map (which raises for a grid it cannot map axis by axis), on 24 affines around the limit
    (both outcomes occur)."""
    from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
    from btcv_unetr.data.images import SHEAR_TOLERANCE, grid_shear
    from btcv_unetr.data.transforms import infer_transforms
    from btcv_unetr.inference.inversion import _voxel_map
    config = build_config([read_yaml(CONFIG_DIR / "tiny.yaml"), {"data": dict(zip(("space_x", "space_y", "space_z"),
                                                                                 pixdim))}])
    preprocess, outcomes = infer_transforms(config), []
    for index, affine in enumerate(_sheared_affines(24, seed=len(pixdim) + int(pixdim[2]))):
        path = tmp_path / f"s{index}.nii"
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.int16), affine), path)
        try:
            _voxel_map(preprocess({"image": str(path)})["image"])
            mapped = True
        except RuntimeError:
            mapped = False
        assert mapped == (grid_shear(nib.load(path).affine, pixdim) <= SHEAR_TOLERANCE), affine
        outcomes.append(mapped)
    assert any(outcomes) and not all(outcomes)


def test_a_turned_scans_affine_is_not_sheared_and_a_sheared_one_says_its_angle():
    from btcv_unetr.data.images import shear_problem
    turn = math.radians(30)
    turned = np.diag([0.8, 1.25, 2.5, 1.0])
    turned[:2, :3] = np.array([[math.cos(turn), -math.sin(turn), 0], [math.sin(turn), math.cos(turn), 0]]) @ \
        np.diag([0.8, 1.25, 2.5])
    assert shear_problem(turned.astype(np.float32)) is None
    sheared = np.diag([1.0, 1.0, 1.0, 1.0])
    sheared[0, 2] = math.tan(math.radians(3))  # z steps 3 degrees off perpendicular
    assert shear_problem(sheared).startswith("its affine is sheared (voxel axes 3 degrees from perpendicular")
    assert shear_problem(np.diag([1.0, 0.0, 1.0, 1.0])).startswith("its affine has voxel sizes (1.0, 0.0, 1.0) mm")


@pytest.mark.parametrize("slope, inter, refused", [
    (1.0, 0.0, False), (1.0, -1024.0, False), (0.0, np.inf, False), (np.nan, 5.0, False), (2.5e-3, 0.0, False),
    (1.0, np.inf, True), (1.0, np.nan, True), (np.inf, 0.0, True), (-np.inf, 0.0, True), (1e30, 0.0, True),
    (1.0, -2e6, True)])
def test_a_nifti_scaling_is_applied_only_when_finite_and_of_a_scanners_size(slope, inter, refused):
    """scl_slope 0 or NaN: no scaling (the standard, nibabel, ITK); else both finite and at most 1e6 in size."""
    from btcv_unetr.data.images import scaling_problem
    assert (scaling_problem(slope, inter) is not None) == refused


def test_a_nifti_header_nibabel_will_not_load_is_read_alone(tmp_path):
    from btcv_unetr.data.images import read_nifti_header
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, np.inf
    nib.save(image, tmp_path / "inter.nii.gz")
    with pytest.raises(nib.spatialimages.HeaderDataError):
        nib.load(tmp_path / "inter.nii.gz")
    header = read_nifti_header(tmp_path / "inter.nii.gz")
    assert header.get_data_shape() == (4, 5, 6) and math.isinf(header["scl_inter"])
    nib.save(nib.Nifti2Image(np.zeros((3, 2, 1), np.float32), np.eye(4)), tmp_path / "two.nii")
    assert isinstance(read_nifti_header(tmp_path / "two.nii"), nib.Nifti2Header)
    (tmp_path / "short.nii").write_bytes(b"\x5c\x01" + bytes(100))
    with pytest.raises(ValueError, match="102 bytes, shorter than a NIfTI header"):
        read_nifti_header(tmp_path / "short.nii")


def test_sform_and_qform_apart_by_more_than_a_voxel_are_a_note():
    from btcv_unetr.data.images import sform_qform_note
    image = nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), None)
    image.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    moved = np.diag([2.0, 2.0, 2.0, 1.0])
    for shift, code, noted in ((1.5, 1, False), (2.5, 1, True), (2.5, 0, False)):
        moved[2, 3] = shift
        image.set_qform(moved, code=code)
        assert (sform_qform_note(image.header) is not None) == noted, (shift, code)
    image.set_qform(moved, code=1)
    assert sform_qform_note(image.header).startswith("its sform (code 2) and qform (code 1) place voxels up to 2.5 mm "
                                                     "apart (1.2 voxels): the sform is used")
