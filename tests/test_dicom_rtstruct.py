"""DICOM RT Structure Set output (btcv_unetr/inference/dicom_rtstruct.py) on a series of pydicom's GE CT slice.

The oracle reads the written file back with pydicom, places every contour on the grid of the series as
btcv_unetr.data.dicom reads it (its affine, not the writer's per-image arithmetic), fills each polygon by its voxel
centres (skimage.draw.polygon) and combines a plane's contours even-odd, as viewers do; the result is compared with
the mask (Dice per organ, and voxel for voxel).
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
draw = pytest.importorskip("skimage.draw", reason="the post extra is not installed: pip install 'btcv-unetr[post]'")
from pydicom import config as pydicom_config  # noqa: E402
from test_dicom_wild import _ct_slices, _write  # noqa: E402

from btcv_unetr.data import dicom as reader  # noqa: E402
from btcv_unetr.errors import UserError  # noqa: E402
from btcv_unetr.inference import dicom_rtstruct  # noqa: E402
from btcv_unetr.inference.dicom_outputs import warning_label  # noqa: E402
from btcv_unetr.inference.dicom_rtstruct import (  # noqa: E402
    EXTRA_LINE,
    RT_STRUCTURE_SET_STORAGE,
    plane_contours,
    write_dicom_rtstruct,
)
from btcv_unetr.inference.plots import class_colours  # noqa: E402

NAMES = ("liver", "left kidney", "spleen")
WARNING = ("WARNING: this model was trained on synthetic phantoms (btcv_unetr.synthetic): it is not for real scans; "
           "its masks of real CT are mostly wrong")
PROVENANCE = {"package_version": "0.0", "weights_sha256": "ab" * 32, "precision": "fp32", "tta": False}


def _series(folder, count: int = 12, missing: tuple[int, ...] = (), **edits) -> reader.SeriesVolume:
    """``count`` CT slices 2 mm apart (pydicom's CT_small.dcm, 128 x 128 at 0.66 mm) written to ``folder`` without
    the slices ``missing``, read back by the project's reader: the grid a mask of the series is on."""
    slices = _ct_slices(count, **edits)
    _write([s for k, s in enumerate(slices) if k not in missing], folder)
    series, _ = reader.choose_series(reader.find_series(folder), str(folder))
    return reader.read_series(series, str(folder))


def _ellipsoid(shape, spacing, centre, radii) -> np.ndarray:
    """Voxels of ``shape`` whose centres lie in the ellipsoid (``centre`` in voxels, ``radii`` in mm)."""
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grids, centre, spacing, radii)) <= 1.0


def _organs(volume: reader.SeriesVolume) -> np.ndarray:
    """Three organs on the grid: a liver with a hole through its middle slices, a left kidney, a spleen."""
    shape, spacing = volume.voxels.shape, np.abs(np.diag(volume.affine)[:3])
    labels = np.zeros(shape, dtype=np.uint8)
    labels[_ellipsoid(shape, spacing, (64, 60, 5.5), (26, 18, 9))] = 1
    labels[_ellipsoid(shape, spacing, (64, 60, 5.5), (6, 5, 3.5))] = 0  # the hole: inner contours on 3-4 planes
    labels[_ellipsoid(shape, spacing, (22, 28, 5), (8, 12, 7))] = 2
    labels[_ellipsoid(shape, spacing, (104, 98, 7), (10, 7, 5))] = 3
    return labels


def _rasterise(rtstruct, volume: reader.SeriesVolume, shape) -> tuple[np.ndarray, set[int]]:
    """The classes the structure set's contours enclose on the grid (even-odd per plane and ROI; ROI number =
    class), and the planes that have a contour. Each point must lie on its referenced image's plane."""
    plane_of = {s.instance_uid: k for s, k in zip(volume.slices, volume.planes)}
    to_voxel = np.linalg.inv(reader.LPS_TO_RAS @ volume.affine)
    labels, planes = np.zeros(shape, dtype=np.uint8), set()
    for roi in rtstruct.ROIContourSequence:
        filled = np.zeros(shape, dtype=bool)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            voxels = (to_voxel @ np.c_[points, np.ones(len(points))].T)[:3].T
            k = plane_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            np.testing.assert_allclose(voxels[:, 2], k, atol=1e-3)  # on the plane of the image it references
            rows, columns = draw.polygon(voxels[:, 0], voxels[:, 1], shape=shape[:2])
            inside = np.zeros(shape[:2], dtype=bool)
            inside[rows, columns] = True
            filled[:, :, k] ^= inside  # even-odd: a hole's contour cuts it out of the organ's
            planes.add(k)
        labels[filled] = roi.ReferencedROINumber
    return labels, planes


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _write_rtstruct(volume, labels, path, **kwargs) -> None:
    """The structure set of ``labels``, its source files given in an order unlike the planes' (any order works)."""
    files = [s.path for s in volume.slices]
    random.Random(3).shuffle(files)
    write_dicom_rtstruct(labels, volume.affine, files, NAMES, path, **kwargs)


def test_contours_rasterised_back_give_the_mask_with_references_names_colours_and_warning(tmp_path, monkeypatch):
    volume = _series(tmp_path / "ct")
    labels = _organs(volume)
    path = tmp_path / "case_rtstruct.dcm"
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.RAISE)  # VR checks
    _write_rtstruct(volume, labels, path, provenance=PROVENANCE, warning=WARNING)
    rtstruct = pydicom.dcmread(str(path))
    back, planes = _rasterise(rtstruct, volume, labels.shape)
    dice = {name: _dice(back == c, labels == c) for c, name in enumerate(NAMES, start=1)}
    print("Dice per organ after the RTSTRUCT round trip:", dice)
    assert min(dice.values()) >= 0.95
    np.testing.assert_array_equal(back, labels)  # voxel for voxel: the holes too
    assert planes == set(np.nonzero(labels.any(axis=(0, 1)))[0])
    hole_plane = labels[:, :, 5]
    assert len(plane_contours(hole_plane == 1)) == 2 and hole_plane[64, 60] == 0  # outer and inner ring

    first = pydicom.dcmread(str(volume.slices[0].path), stop_before_pixels=True)
    assert rtstruct.SOPClassUID == rtstruct.file_meta.MediaStorageSOPClassUID == RT_STRUCTURE_SET_STORAGE
    assert rtstruct.Modality == "RTSTRUCT" and rtstruct.ApprovalStatus == "UNAPPROVED"
    assert (rtstruct.StudyInstanceUID, rtstruct.PatientName, rtstruct.PatientID) == \
        (first.StudyInstanceUID, first.PatientName, first.PatientID)
    assert rtstruct.SeriesInstanceUID != first.SeriesInstanceUID
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == rtstruct.FrameOfReferenceUID == first.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence] == \
        [(first.SOPClassUID, s.instance_uid) for s in volume.slices]  # every image, in slice order

    assert [(r.ROINumber, r.ROIName, r.ROIGenerationAlgorithm) for r in rtstruct.StructureSetROISequence] == \
        [(1, "liver", "AUTOMATIC"), (2, "left kidney", "AUTOMATIC"), (3, "spleen", "AUTOMATIC")]
    assert all(r.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID for r in rtstruct.StructureSetROISequence)
    colours = class_colours(len(NAMES) + 1)
    assert [list(c.ROIDisplayColor) for c in rtstruct.ROIContourSequence] == [list(colours[c]) for c in (1, 2, 3)]
    observations = rtstruct.RTROIObservationsSequence
    assert [(o.ReferencedROINumber, o.RTROIInterpretedType) for o in observations] == \
        [(1, "ORGAN"), (2, "ORGAN"), (3, "ORGAN")]
    kidney = observations[1].RTROIIdentificationCodeSequence[0]
    assert (kidney.CodeMeaning, kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("Kidney", "Left")

    assert rtstruct.SeriesDescription == "NOT FOR CLINICAL USE: phantom-trained"
    assert rtstruct.StructureSetLabel == "NOT FOR CLINICAL"
    description, provenance = rtstruct.StructureSetDescription.split(" | provenance: ")
    assert description == WARNING and json.loads(provenance) == PROVENANCE
    assert all(r.ROIDescription == WARNING for r in rtstruct.StructureSetROISequence)


def test_the_file_is_valid_dicom_and_without_a_warning_says_none(tmp_path):
    volume = _series(tmp_path / "ct", count=4)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[40:60, 50:70, 1:3] = 2  # one class of three: one ROI
    path = tmp_path / "rtstruct.dcm"
    _write_rtstruct(volume, labels, path)
    with pydicom_config.strict_reading():  # every value read back against its VR (lengths, characters)
        rtstruct = pydicom.dcmread(str(path))
        rtstruct.walk(lambda dataset, element: element.value)
    assert rtstruct.preamble == b"\0" * 128
    assert rtstruct.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert rtstruct.file_meta.MediaStorageSOPInstanceUID == rtstruct.SOPInstanceUID
    present = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "ReferringPhysicianName", "AccessionNumber", "OperatorsName", "Manufacturer", "StructureSetDate",
               "StructureSetTime", "SeriesNumber", "PositionReferenceIndicator")  # type 1 and 2 of the IOD
    assert all(keyword in rtstruct for keyword in present)
    assert rtstruct.SeriesDescription == "UNETR organ contours" and "StructureSetDescription" not in rtstruct
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["left kidney"]
    assert "ROIDescription" not in rtstruct.StructureSetROISequence[0]
    assert [len(r.ContourSequence) for r in rtstruct.ROIContourSequence] == [2]  # planes 1 and 2
    square = np.asarray(rtstruct.ROIContourSequence[0].ContourSequence[0].ContourData, dtype=float).reshape(-1, 3)
    assert len(square) == 8  # a square's staircase is cut to its corners: 2 points per side, none collinear


def test_a_contour_past_64_kib_is_written_whole(tmp_path, monkeypatch):
    """Explicit VR gives a DS value at most 64 KiB (about 2,500 points): a large organ on a fine grid passes it."""
    circle = 60 + 50 * np.exp(2j * np.pi * np.arange(9000) / 9000)  # 9,000 points of a circle, voxel coordinates
    monkeypatch.setattr(dicom_rtstruct, "plane_contours", lambda plane: [np.c_[circle.real, circle.imag]])
    volume = _series(tmp_path / "ct", count=2)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[50:60, 50:60, 0] = 1
    path = tmp_path / "rtstruct.dcm"
    _write_rtstruct(volume, labels, path)
    contour = pydicom.dcmread(str(path)).ROIContourSequence[0].ContourSequence[0]
    assert contour.NumberOfContourPoints == 9000 and len(contour.ContourData) == 27000
    assert contour["ContourData"].VR == "DS"  # not turned into UN bytes, as pydicom does in explicit VR
    assert sum(len(str(v)) + 1 for v in contour.ContourData) > 65536


def test_planes_interpolated_over_missing_slices_get_no_contour(tmp_path):
    volume = _series(tmp_path / "ct", missing=(4, 5))  # 10 files; the reader fills planes 4 and 5
    assert volume.voxels.shape[2] == 12 and sorted(volume.planes) == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    labels = _organs(volume)
    path = tmp_path / "rtstruct.dcm"
    _write_rtstruct(volume, labels, path)
    back, planes = _rasterise(pydicom.dcmread(str(path)), volume, labels.shape)
    assert planes == set(np.nonzero(labels.any(axis=(0, 1)))[0]) - {4, 5}
    imaged = sorted(volume.planes)
    np.testing.assert_array_equal(back[:, :, imaged], labels[:, :, imaged])
    assert not back[:, :, [4, 5]].any()


def test_empty_sop_uids_are_taken_from_the_file_meta(tmp_path):
    volume = _series(tmp_path / "ct", count=3, SOPInstanceUID="", SOPClassUID="")  # the meta header keeps both
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[30:50, 30:50, :] = 1
    path = tmp_path / "rtstruct.dcm"
    _write_rtstruct(volume, labels, path)
    rtstruct = pydicom.dcmread(str(path))
    metas = [pydicom.dcmread(str(s.path)).file_meta for s in volume.slices]
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in referenced] == \
        [(m.MediaStorageSOPClassUID, m.MediaStorageSOPInstanceUID) for m in metas]
    contours = rtstruct.ROIContourSequence[0].ContourSequence
    assert {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours} == \
        {m.MediaStorageSOPInstanceUID for m in metas}


def _no_frame_of_reference(tmp_path):
    return _series(tmp_path / "ct", count=3, FrameOfReferenceUID=""), None


def _no_instance_uid_anywhere(tmp_path):
    volume = _series(tmp_path / "ct", count=3)
    dataset = pydicom.dcmread(str(volume.slices[1].path))
    dataset.SOPInstanceUID, dataset.file_meta.MediaStorageSOPInstanceUID = "", ""
    dataset.save_as(str(volume.slices[1].path), enforce_file_format=False)
    return volume, None


def _off_the_grid(tmp_path):
    volume = _series(tmp_path / "ct", count=3)
    shifted = volume.affine.copy()
    shifted[2, 3] += 1.0  # half a slice along the normal
    return volume, shifted


def _other_pixel_spacing(tmp_path):
    volume = _series(tmp_path / "ct", count=3)
    scaled = volume.affine.copy()
    scaled[:3, :2] *= 1.5  # the same origin and axes, but wider pixels than the images'
    return volume, scaled


def _no_study_uid(tmp_path):
    return _series(tmp_path / "ct", count=3, StudyInstanceUID=""), None


@pytest.mark.parametrize("case, message", [
    (_no_frame_of_reference, r"the series has no FrameOfReferenceUID, which an RTSTRUCT needs to be placed on it"),
    (_no_instance_uid_anywhere, r"0001\.dcm has no SOPInstanceUID \(emptied by an anonymiser\?\), which an RTSTRUCT "
                                r"needs to reference it"),
    (_off_the_grid, r"instance [\d.]+ is not a slice of the series' grid: an RTSTRUCT needs one series"),
    (_other_pixel_spacing, r"0000\.dcm has a pixel spacing other than the mask's grid"),
    (_no_study_uid, r"the series has no StudyInstanceUID, which an RTSTRUCT needs to reference it"),
], ids=["no frame of reference", "no instance UID anywhere", "off the grid", "other pixel spacing", "no study UID"])
def test_a_series_an_rtstruct_cannot_reference_is_one_line_and_no_file(tmp_path, case, message):
    volume, affine = case(tmp_path)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
    labels[30:50, 30:50, :] = 1
    path = tmp_path / "rtstruct.dcm"
    with pytest.raises(UserError, match=message + r".*; the mask is written as NIfTI only$") as caught:
        write_dicom_rtstruct(labels, volume.affine if affine is None else affine, [s.path for s in volume.slices],
                             NAMES, path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(tmp_path / "ct"))
    assert list(tmp_path.glob("rtstruct*")) == []  # nothing written, not even a temporary


def test_an_empty_mask_is_one_line(tmp_path):
    volume = _series(tmp_path / "ct", count=2)
    with pytest.raises(UserError, match=r"the mask has no organ voxel on any image of the series.*NIfTI only$"):
        _write_rtstruct(volume, np.zeros(volume.voxels.shape, dtype=np.uint8), tmp_path / "rtstruct.dcm")


def test_without_scikit_image_the_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.measure", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^--output_format dicom_rtstruct needs scikit-image .*"
                                        r"pip install 'btcv-unetr\[post\]'$") as caught:
        write_dicom_rtstruct(np.zeros((2, 2, 1), np.uint8), np.eye(4), [tmp_path / "x.dcm"], NAMES, tmp_path / "o.dcm")
    assert str(caught.value) == EXTRA_LINE


def test_warning_labels_fit_a_series_description():
    assert warning_label(None, "UNETR organ contours") == "UNETR organ contours"
    assert warning_label(WARNING, "x") == "NOT FOR CLINICAL USE: phantom-trained"
    assert warning_label("WARNING: this model's weights are random (it was never trained): its masks mean nothing",
                         "x") == "NOT FOR CLINICAL USE: untrained weights"
    other = warning_label("WARNING: " + "a very long reason " * 10, "x")
    assert len(other) == 64 and other.startswith("NOT FOR CLINICAL USE: a very long reason")
