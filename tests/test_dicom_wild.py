"""DICOM as scanners and anonymisers write it (issue 27): pydicom's bundled third-party files (a GE CT slice, MR in
every transfer syntax, 12-bit JPEG, a truncated file) and series the tests build from them by editing headers only,
read by btcv_unetr.data.dicom; geometry checked against the positions the files declare."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from btcv_unetr.data import dicom as reader  # noqa: E402
from btcv_unetr.errors import UserError  # noqa: E402
from btcv_unetr.model.build import build_model  # noqa: E402

STEP = 2.0


def _ct_slices(count: int, step: float = STEP, **edits) -> list:
    """``count`` copies of pydicom's GE CT slice (CT_small.dcm, 128 x 128, 0.66 mm) stacked ``step`` mm apart, each
    with its own pixels (the slice's plus 10 HU per slice), UIDs and instance number; ``edits`` set on every copy."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels, series = template.pixel_array, generate_uid()
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    slices = []
    for k in range(count):
        ds = copy.deepcopy(template)
        ds.ImagePositionPatient = [x, y, z + step * k]
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, generate_uid(), k + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = (pixels + 10 * k).astype(np.int16).tobytes()
        for key, value in edits.items():
            setattr(ds, key, value)
        slices.append(ds)
    return slices


def _write(slices, folder: Path, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(slices):
        path = folder / (names[k] if names else f"{k:04d}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(path), enforce_file_format=False)
        paths.append(path)
    return paths


def _read(folder: Path, series_uid: str | None = None) -> reader.SeriesVolume:
    series, _ = reader.choose_series(reader.find_series(folder), str(folder), series_uid)
    return reader.read_series(series, str(folder))


def _voxel_of(volume: reader.SeriesVolume, lps: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(volume.affine) @ reader.LPS_TO_RAS @ np.append(lps, 1.0))[:3]


def _assert_slices_where_declared(volume: reader.SeriesVolume) -> None:
    """Every stacked file's ImagePositionPatient is a voxel centre of the volume's plane for it, and that plane
    holds the file's own pixels (modality units)."""
    for item, plane in zip(volume.slices, volume.planes):
        dataset = pydicom.dcmread(str(item.path))
        np.testing.assert_allclose(_voxel_of(volume, np.asarray(dataset.ImagePositionPatient, float)),
                                   (0, 0, plane), atol=1e-3)
        hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        np.testing.assert_array_equal(volume.voxels[:, :, plane], np.maximum(hu, -1024).T)


def test_a_series_in_any_order_with_any_names_is_the_sorted_named_one(tmp_path):
    slices = _ct_slices(8)
    _write(slices, tmp_path / "named")
    names = [f"sub{k % 2}/IM{random.Random(k).randrange(10**6)}" for k in range(8)]  # no .dcm, in sub-folders
    shuffled = list(zip(slices, names))
    random.Random(1).shuffle(shuffled)
    _write([s for s, _ in shuffled], tmp_path / "export", [n for _, n in shuffled])
    (tmp_path / "export" / "README.txt").write_text("exported by a PACS")  # not DICOM: ignored
    named, export = _read(tmp_path / "named"), _read(tmp_path / "export")
    assert named.voxels.shape == (128, 128, 8) and not named.notes
    np.testing.assert_array_equal(export.voxels, named.voxels)
    np.testing.assert_allclose(export.affine, named.affine)
    assert np.diag(named.affine)[:3] == pytest.approx((-0.661468, -0.661468, STEP))  # RAS: columns go left
    _assert_slices_where_declared(export)


def test_an_identical_duplicate_is_dropped_and_said(tmp_path):
    slices = _ct_slices(6)
    _write([*slices, slices[3]], tmp_path / "s", [f"{k}.dcm" for k in range(6)] + ["copy_of_3.dcm"])
    volume = _read(tmp_path / "s")
    assert volume.voxels.shape[2] == 6 and volume.affine[2, 2] == pytest.approx(STEP)
    assert volume.notes == [f"{tmp_path / 's'}: 1 duplicate slice(s) (identical, at a position already filled) "
                            "dropped"]
    _assert_slices_where_declared(volume)


def test_two_different_slices_at_one_position_are_refused_in_one_line(tmp_path):
    slices = _ct_slices(5)
    slices[3].ImagePositionPatient = list(slices[2].ImagePositionPatient)
    _write(slices, tmp_path / "s")
    with pytest.raises(UserError, match=r"two different slices at one position .*0002\.dcm and 0003\.dcm"):
        _read(tmp_path / "s")


def test_missing_slices_are_resampled_onto_a_uniform_grid_through_the_real_positions(tmp_path):
    slices = _ct_slices(20)
    _write(slices[:8] + slices[12:], tmp_path / "s")  # 4 missing from the middle: 16 files
    volume = _read(tmp_path / "s")
    assert volume.voxels.shape[2] == 20 and volume.affine[2, 2] == pytest.approx(STEP)
    assert volume.planes == [*range(8), *range(12, 20)]
    assert volume.notes == [f"{tmp_path / 's'}: slice positions uneven or missing (steps of 2 to 10 mm): resampled "
                            "onto a uniform 2 mm grid of 20 slices from the files' own positions (4 interpolated)"]
    _assert_slices_where_declared(volume)
    # The planes over the gap lie between their neighbours (linear in the positions).
    lower, upper = volume.voxels[:, :, 7], volume.voxels[:, :, 12]
    np.testing.assert_allclose(volume.voxels[:, :, 9], lower + (upper - lower) * 2 / 5, atol=1e-3)


def test_a_gantry_tilt_is_refused_in_one_line(tmp_path):
    slices = _ct_slices(6)
    for k, ds in enumerate(slices):  # each slice 0.5 mm further posterior: a tilt of about 14 degrees
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
    _write(slices, tmp_path / "s")
    with pytest.raises(UserError, match=r"a gantry tilt of about 14\.0 degrees"):
        _read(tmp_path / "s")


def test_a_folder_of_several_series_uses_the_longest_ct_and_lists_them(tmp_path):
    main, second = _ct_slices(8), _ct_slices(5, SeriesDescription="thin recon")
    localizer = _ct_slices(2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="topogram")
    capture = _ct_slices(1, SOPClassUID="1.2.840.10008.5.1.4.1.1.7", SeriesDescription="dose report")
    for k, ds in enumerate([*main, *second, *localizer, *capture]):
        ds.save_as(str(tmp_path / f"f{k:03d}"), enforce_file_format=False)
    found = reader.find_series(tmp_path)
    series, listing = reader.choose_series(found, "study")
    assert series.uid == main[0].SeriesInstanceUID and len(series.slices) == 8
    assert listing.startswith(f"study: 4 DICOM series: used: {main[0].SeriesInstanceUID} (CT, 8 slices); ")
    assert "(CT localizer, 2 images 'topogram')" in listing and "(CT secondary capture, 1 image 'dose report')" \
        in listing and listing.endswith("--series_uid UID picks another")
    chosen = _read(tmp_path, second[0].SeriesInstanceUID)
    assert chosen.voxels.shape[2] == 5
    topogram = localizer[0].SeriesInstanceUID
    with pytest.raises(UserError, match=f"no stackable DICOM series with --series_uid {topogram}"):
        reader.choose_series(found, "study", topogram)


def test_monochrome1_padding_and_rescale_give_hounsfield_units(tmp_path):
    plain = _ct_slices(3)
    _write(plain, tmp_path / "plain")
    inverted = _ct_slices(3, PhotometricInterpretation="MONOCHROME1")
    for ds, ref in zip(inverted, plain):
        ds.ImagePositionPatient, ds.PixelData = ref.ImagePositionPatient, ref.PixelData
    _write(inverted, tmp_path / "mono1")
    np.testing.assert_array_equal(_read(tmp_path / "mono1").voxels, _read(tmp_path / "plain").voxels)
    # Rescale slope 2, intercept -3000; two corners padded with -2000 HU (stored 500) outside the circle.
    scaled = _ct_slices(2, RescaleSlope=2, RescaleIntercept=-3000)
    for ds in scaled:
        stored = ds.pixel_array.copy()
        stored[:4, :4] = 500
        ds.PixelData = stored.astype(np.int16).tobytes()
    _write(scaled, tmp_path / "scaled")
    volume = _read(tmp_path / "scaled")
    expected = scaled[1].pixel_array.T * 2.0 - 3000
    np.testing.assert_array_equal(volume.voxels[:, :, 1], np.maximum(expected, -1024))
    assert (volume.voxels[:4, :4] == -1024).all()


def _enhanced_ct(slices, path: Path) -> None:
    """The slices as one Enhanced CT Image (multi-frame): orientation, spacing and rescale in the shared functional
    groups, each frame's position in its own, the frames in the order of ``slices``."""
    from pydicom.dataset import Dataset
    first = copy.deepcopy(slices[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleIntercept", "RescaleSlope", "SliceLocation", "InstanceNumber"):
        if keyword in first:
            delattr(first, keyword)
    first.SOPClassUID = first.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first.NumberOfFrames, first.ImageType = len(slices), ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared, measures, orientation, rescale = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = slices[0].PixelSpacing, STEP
    orientation.ImageOrientationPatient = slices[0].ImageOrientationPatient
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = slices[0].RescaleIntercept, 1, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    shared.PixelValueTransformationSequence = [rescale]
    first.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for item in slices:
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = item.ImagePositionPatient
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    first.PerFrameFunctionalGroupsSequence = frames
    first.PixelData = b"".join(item.PixelData for item in slices)
    path.parent.mkdir(parents=True, exist_ok=True)
    first.save_as(str(path), enforce_file_format=False)


def test_an_enhanced_multiframe_ct_is_the_volume_of_its_single_frame_series(tmp_path):
    """Frames stored in reverse order, placed by their per-frame positions; rescale from the shared groups."""
    slices = _ct_slices(5)
    _write(slices, tmp_path / "single")
    _enhanced_ct(slices[::-1], tmp_path / "enhanced" / "ct.dcm")
    enhanced, single = _read(tmp_path / "enhanced"), _read(tmp_path / "single")
    assert enhanced.voxels.shape == (128, 128, 5) and [s.frame for s in enhanced.slices] == [4, 3, 2, 1, 0]
    np.testing.assert_array_equal(enhanced.voxels, single.voxels)
    np.testing.assert_allclose(enhanced.affine, single.affine)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"])
def test_every_lossless_transfer_syntax_decodes_to_the_uncompressed_pixels(name):
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    decoded = reader.decode_frames(Path(get_testdata_file(name)), "mr")
    np.testing.assert_array_equal(decoded, reference[None].astype(np.float32))


def test_12_bit_jpeg_and_jpeg_2000_from_other_writers_decode(tmp_path):
    extended = reader.decode_frames(Path(get_testdata_file("JPGExtended.dcm")), "nm")  # pydicom alone cannot: 12-bit
    assert extended.shape == (1, 1024, 256) and 0 < extended.max() < 4096 and extended.std() > 0
    ct_j2k = reader.decode_frames(Path(get_testdata_file("693_J2KI.dcm")), "ct")  # a 512^2 CT slice, JPEG 2000
    assert ct_j2k.shape == (1, 512, 512) and ct_j2k.std() > 0


def test_jpeg_lossless_process_14_decodes_to_the_pixels_written(tmp_path):
    """The most common lossless syntax in PACS archives; pydicom ships no greyscale file in it, so GDCM's writer
    (SimpleITK) makes one from the GE CT slice's HU; pydicom alone could not decode it here."""
    import SimpleITK as sitk
    source = sitk.Cast(sitk.ReadImage(get_testdata_file("CT_small.dcm")), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(tmp_path / "jpeg_lossless.dcm"))
    writer.SetImageIO("GDCMImageIO")
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(source)
    syntax = pydicom.dcmread(str(tmp_path / "jpeg_lossless.dcm"), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == "1.2.840.10008.1.2.4.70"  # JPEG Lossless, first-order prediction (process 14, SV1)
    np.testing.assert_array_equal(reader.decode_frames(tmp_path / "jpeg_lossless.dcm", "ct"),
                                  sitk.GetArrayFromImage(source).astype(np.float32))


def test_files_without_a_meta_header_or_preamble_read_as_the_same_series(tmp_path):
    """As old archives and some anonymisers store them: no 128-byte preamble, no file meta, implicit VR."""
    slices = _ct_slices(4)
    _write(slices, tmp_path / "full")
    (tmp_path / "bare").mkdir()
    for k, ds in enumerate(slices):
        bare = copy.deepcopy(ds)
        del bare.file_meta
        bare.preamble = None
        pydicom.dcmwrite(str(tmp_path / "bare" / f"{k}"), bare, implicit_vr=True, little_endian=True,
                         enforce_file_format=False)
    assert (tmp_path / "bare" / "0").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(_read(tmp_path / "bare").voxels, _read(tmp_path / "full").voxels)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "examples_ybr_color.dcm"])
def test_a_colour_image_is_one_line(name):
    with pytest.raises(UserError, match=f"{name}: a colour DICOM image \\(3 channels\\): the model takes grey-level"):
        reader.decode_frames(Path(get_testdata_file(name)), "series")


@pytest.mark.parametrize("name, says", [("MR_truncated.dcm", "MR_truncated.dcm: the pixels of this DICOM file "
                                         "(Explicit VR Little Endian) cannot be decoded"),
                                        ("JPEG2000-embedded-sequence-delimiter.dcm", "(JPEG 2000 Image Compression) "
                                         "cannot be decoded")])
def test_a_file_nobody_can_decode_is_one_line_naming_it(name, says):
    with pytest.raises(UserError, match=None) as refused:
        reader.decode_frames(Path(get_testdata_file(name)), "series")
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_series_of_another_modality_is_refused_unless_allowed(tmp_path):
    _write(_ct_slices(3, Modality="MR"), tmp_path / "s")
    (series,) = reader.find_series(tmp_path / "s")
    with pytest.raises(UserError, match="a MR series, and this model segments CT: .*give --any_modality"):
        reader.check_modality(series, "s")
    reader.check_modality(series, "s", allowed=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(build_model(tiny_config().model).state_dict(), folder / "w.pth")
    return folder


def _segment(weights: Path, series: Path, out: Path, capsys) -> str:
    pytest.importorskip("highdicom")
    from btcv_unetr import cli
    argv = ["infer", "--config", "tiny.yaml", "--pretrained_dir", str(weights), "--pretrained_model_name", "w.pth",
            "--input", str(series), "--output_dir", str(out), "--output_format", "dicom_seg", "--no-overlay",
            "--no_hd95", "--infer_overlap", "0"]
    assert cli.main(argv) == 0
    return capsys.readouterr().err


def test_an_anonymised_series_with_empty_sop_uids_gets_its_mask_and_seg(weights, tmp_path, capsys):
    """The dataset's SOP Class and Instance UIDs emptied, the file meta header keeping them (as anonymisers do):
    the SEG references the instances by the meta header's UIDs."""
    slices = _ct_slices(6, SOPClassUID="")
    for ds in slices:
        ds.SOPInstanceUID = ""
    paths = _write(slices, tmp_path / "anon")
    _segment(weights, tmp_path / "anon", tmp_path / "out", capsys)
    mask = nib.load(tmp_path / "out" / "anon_seg.nii.gz")
    assert mask.shape == (128, 128, 6)
    seg = pydicom.dcmread(str(tmp_path / "out" / "anon_seg.dcm"))
    referenced = {item.ReferencedSOPInstanceUID
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(str(p)).file_meta.MediaStorageSOPInstanceUID for p in paths}


def test_a_series_no_seg_can_reference_still_gets_its_mask_and_one_line(weights, tmp_path, capsys):
    slices = _ct_slices(4)
    for ds in slices:
        ds.SOPInstanceUID = ""
        del ds.file_meta.MediaStorageSOPInstanceUID
    _write(slices, tmp_path / "bare")
    err = _segment(weights, tmp_path / "bare", tmp_path / "out", capsys)
    assert (tmp_path / "out" / "bare_seg.nii.gz").is_file() and not (tmp_path / "out" / "bare_seg.dcm").exists()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: bare: no DICOM SEG written: {tmp_path / 'bare'}: 0000.dcm has no SOPInstanceUID "
                        "(emptied by an anonymiser?), which a SEG needs to reference it; the mask is written as NIfTI "
                        "only"]


def test_test_py_writes_every_dicom_output_marked_with_the_phantom_warning(trained_run, tmp_path, capsys):
    """``--output_format dicom_seg,dicom_rtstruct,dicom_overlay`` with a model trained on the phantoms: the SEG,
    the RTSTRUCT and the overlay series each say the model is not for clinical use; a rerun keeps them."""
    pytest.importorskip("highdicom")
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from btcv_unetr import cli
    _write(_ct_slices(4), tmp_path / "ct")
    argv = ["infer", "--pretrained_dir", str(trained_run), "--pretrained_model_name", "model.pt", "--input",
            str(tmp_path / "ct"), "--output_dir", str(tmp_path / "out"), "--output_format",
            "dicom_seg,dicom_rtstruct,dicom_overlay", "--no-overlay", "--no_hd95", "--infer_overlap", "0",
            "--device", "cpu"]
    assert cli.main(argv) == 0
    out = tmp_path / "out"
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["ct_overlay_dcm", "ct_rtstruct.dcm", "ct_seg.dcm", "ct_seg.nii.gz"]
    overlays = sorted((out / "ct_overlay_dcm").iterdir())
    assert len(overlays) == 4
    for path in (out / "ct_seg.dcm", out / "ct_rtstruct.dcm", overlays[0]):
        assert pydicom.dcmread(str(path)).SeriesDescription.startswith("NOT FOR CLINICAL USE"), path
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert f"ct: {out / 'ct_seg.nii.gz'} exists, skipped" in capsys.readouterr().out


def test_an_unknown_output_format_is_one_line(capsys):
    from btcv_unetr import cli
    assert cli.main(["infer", "--output_format", "dicom_seg,pdf", "--input", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: config key 'output_format': 'dicom_seg,pdf': give nifti or any of dicom_seg, dicom_rtstruct, "
        "dicom_overlay separated by commas")


def test_an_enhanced_ct_gets_its_mask_seg_and_overlay(weights, tmp_path, capsys):
    """The SEG of a multi-frame source references its frames (in the file's frame order, here reversed)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("highdicom")
    slices = _ct_slices(3)
    _enhanced_ct(slices[::-1], tmp_path / "enhanced" / "ct.dcm")
    from btcv_unetr import cli
    argv = ["infer", "--config", "tiny.yaml", "--pretrained_dir", str(weights), "--pretrained_model_name", "w.pth",
            "--input", str(tmp_path / "enhanced"), "--output_dir", str(tmp_path / "out"), "--output_format",
            "dicom_seg,dicom_overlay", "--no-overlay", "--no_hd95", "--infer_overlap", "0"]
    assert cli.main(argv) == 0
    assert "warning:" not in capsys.readouterr().err
    mask = np.asarray(nib.load(tmp_path / "out" / "enhanced_seg.nii.gz").dataobj)
    assert mask.shape == (128, 128, 3) and mask.any()
    assert len(list((tmp_path / "out" / "enhanced_overlay_dcm").iterdir())) == 3
    seg = pydicom.dcmread(str(tmp_path / "out" / "enhanced_seg.dcm"))
    stored = seg.pixel_array.reshape(-1, 128, 128)
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, stored):
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        plane = 3 - int(referenced)  # frame 1 of the file is the last slice
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame.astype(bool), (mask[:, :, plane] == number).T)


def test_the_service_takes_a_zip_of_several_series_and_a_series_uid(tmp_path):
    """A zip holding two CT series: the longer one is segmented and both are the job's notes; the form field
    ``series_uid`` picks the other; a malformed one is a 400."""
    pytest.importorskip("fastapi")
    import io
    import zipfile

    from serving import tiny_checkpoint

    from btcv_unetr.testing.app import in_process_service
    long, short = _ct_slices(5), _ct_slices(3, SeriesDescription="thin")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for k, ds in enumerate([*long, *short]):
            ds.save_as(str(tmp_path / f"{k}"), enforce_file_format=False)
            archive.write(tmp_path / f"{k}", f"DICOM/IM{k}")
    upload = {"file": ("study.zip", buffer.getvalue())}
    with in_process_service(tiny_checkpoint(tmp_path / "run"), tmp_path / "jobs") as client:
        job = client.post("/jobs", files=upload).json()
        assert job["shape"] == [128, 128, 5]
        assert job["notes"][0].startswith(f"study: 2 DICOM series: used: {long[0].SeriesInstanceUID} (CT, 5 slices); ")
        assert job["notes"][0].endswith("; the form field series_uid picks another")
        assert str(tmp_path) not in " ".join(job["notes"])
        picked = client.post("/jobs", files=upload, data={"series_uid": short[0].SeriesInstanceUID}).json()
        assert picked["shape"] == [128, 128, 3]
        refused = client.post("/jobs", files=upload, data={"series_uid": "1.2.x"})
        assert refused.status_code == 400 and refused.json()["detail"].startswith("series_uid must be a DICOM UID")
