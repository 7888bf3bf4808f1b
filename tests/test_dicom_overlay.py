"""The overlay series (issue 27, section 2): one RGB Secondary Capture image per source slice, in the source's study
and frame of reference, drawn on the slice's own pixels; a series built from pydicom's GE CT slice (CT_small.dcm)
and read by btcv_unetr.data.dicom, as tests/test_dicom_wild.py builds its series."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("matplotlib")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.pixels import apply_windowing  # noqa: E402
from test_dicom_wild import _ct_slices, _read, _write  # noqa: E402

from btcv_unetr.errors import UserError  # noqa: E402
from btcv_unetr.inference.dicom_overlay import ALPHA, write_dicom_overlay  # noqa: E402
from btcv_unetr.inference.plots import class_colours  # noqa: E402

NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver"]
COLOURS = class_colours(len(NAMES) + 1).astype(int)  # spleen red (220, 20, 60), liver blue (30, 144, 255)
WARNING = "WARNING: this model was trained on synthetic phantoms only; its masks are not for clinical use"
PROVENANCE = {"weights_sha256": "0f1e2d", "precision": "fp32", "package_version": "0.3.0"}


def _series(folder: Path, count: int = 6, **edits) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The series' files (shuffled, as a PACS export lists them), its RAS affine and a mask of two organs: spleen
    (a box, slices 1-3) and liver (a disk, slices 2-4), both clear of the image's corners; slice 0 has none."""
    paths = _write(_ct_slices(count, **edits), folder)
    volume = _read(folder)
    labels = np.zeros(volume.voxels.shape, dtype=np.uint8)  # (X columns, Y rows, Z) = (128, 128, count)
    labels[30:70, 40:80, 1:4] = 1
    x, y = np.mgrid[:128, :128]
    labels[(x - 95) ** 2 + (y - 60) ** 2 < 15 ** 2, 2:5] = 6
    random.Random(0).shuffle(paths)
    return paths, volume.affine, labels


def _sources_by_position(paths: list[Path]) -> list:
    return sorted((pydicom.dcmread(str(p)) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))


def _windowed(source) -> np.ndarray:
    """The source's pixels in HU through W 400 / L 40, by pydicom's own DICOM windowing, ``(rows, columns)``."""
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    window = Dataset()
    window.PhotometricInterpretation, window.BitsStored, window.PixelRepresentation = "MONOCHROME2", 8, 0
    window.WindowCenter, window.WindowWidth = 40, 400
    return np.rint(apply_windowing(hu.astype(np.float64), window)).astype(int)


def _interior(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its outer ring: pixels whose 3 x 3 neighbourhood is all inside."""
    padded = np.pad(mask, 1)
    return np.all([padded[1 + dy:mask.shape[0] + 1 + dy, 1 + dx:mask.shape[1] + 1 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def _contour(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    outside = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    return mask & outside


def test_one_rgb_image_per_source_slice_in_the_source_study_at_its_position(tmp_path):
    paths, affine, labels = _series(tmp_path / "ct")
    written = write_dicom_overlay(labels, affine, paths, NAMES, tmp_path / "overlay", provenance=PROVENANCE)
    assert [p.name for p in written] == [f"overlay_{k:04d}.dcm" for k in range(1, 7)]
    assert sorted(p.name for p in (tmp_path / "overlay").iterdir()) == [p.name for p in written]  # no temporaries
    overlays = [pydicom.dcmread(str(p)) for p in written]
    sources = _sources_by_position(paths)
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 1
    assert overlays[0].SeriesInstanceUID != sources[0].SeriesInstanceUID
    for k, (overlay, source) in enumerate(zip(overlays, sources)):
        assert overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and overlay.Modality == "OT"
        assert overlay.file_meta.MediaStorageSOPInstanceUID == overlay.SOPInstanceUID != source.SOPInstanceUID
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "StudyDate"):
            assert overlay[keyword].value == source[keyword].value, keyword
        assert int(overlay.SeriesNumber) == int(source.SeriesNumber) + 2000 and int(overlay.InstanceNumber) == k + 1
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            np.testing.assert_array_equal(np.asarray(overlay[keyword].value, float),
                                          np.asarray(source[keyword].value, float))
        assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert overlay.PhotometricInterpretation == "RGB" and overlay.BurnedInAnnotation == "YES"
        assert overlay.pixel_array.dtype == np.uint8
        assert overlay.pixel_array.shape == (int(source.Rows), int(source.Columns), 3) == (128, 128, 3)
        assert json.loads(overlay.ImageComments) == PROVENANCE  # no warning given: the provenance alone
        assert overlay.SeriesDescription == "UNETR organ overlay"
        assert "W 400, L 40" in overlay.DerivationDescription


def test_organs_are_blended_in_their_colour_and_outlined_and_the_rest_is_the_windowed_ct(tmp_path):
    paths, affine, labels = _series(tmp_path / "ct")
    written = write_dicom_overlay(labels, affine, paths, NAMES, tmp_path / "overlay")
    for k, (path, source) in enumerate(zip(written, _sources_by_position(paths))):
        rgb = pydicom.dcmread(str(path)).pixel_array.astype(int)
        grey = _windowed(source)
        organs = labels[:, :, k].T  # (rows, columns)
        for value in (1, 6):
            inside = _interior(organs == value)
            if not (organs == value).any():
                continue
            blend = np.rint((1 - ALPHA) * grey[inside][:, None] + ALPHA * COLOURS[value])
            np.testing.assert_allclose(rgb[inside], blend, atol=1)
            assert (rgb[inside].argmax(axis=1) == COLOURS[value].argmax()).all()  # the organ's hue dominates
            contour = _contour(organs == value)
            assert contour.sum() > 40 and (rgb[contour] == COLOURS[value]).all()  # opaque outline
        outside = organs == 0
        differs = outside & (rgb != grey[..., None]).any(axis=2)
        if k == 0 or k == 5:  # no organ on the slice: no legend, the windowed CT everywhere
            assert not differs.any()
            continue
        rows, columns = np.nonzero(differs)  # the legend: a box in the bottom-left corner
        assert rows.min() >= 128 - 2 * 14 and columns.max() < 64
        coloured = {tuple(c) for c in rgb[differs] if len(set(c)) > 1}  # its swatches; its text is white on grey
        assert coloured == {tuple(COLOURS[v]) for v in (1, 6) if (organs == v).any()}


def test_the_warning_is_burned_in_and_in_the_series_description_and_comments(tmp_path):
    paths, affine, labels = _series(tmp_path / "ct", count=3)
    written = write_dicom_overlay(labels, affine, paths, NAMES, tmp_path / "overlay", provenance=PROVENANCE,
                                  warning=WARNING)
    for path, source in zip(written, _sources_by_position(paths)):
        overlay = pydicom.dcmread(str(path))
        assert overlay.SeriesDescription.startswith("NOT FOR CLINICAL USE")
        warning, provenance = overlay.ImageComments.split("\n")
        assert warning == WARNING and json.loads(provenance) == PROVENANCE
        assert "warning" in overlay.DerivationDescription
    first = pydicom.dcmread(str(written[0])).pixel_array.astype(int)  # slice 0: no organ, no legend
    differs = (first != _windowed(_sources_by_position(paths)[0])[..., None]).any(axis=2)
    rows = np.nonzero(differs)[0]
    assert rows.min() == 0 and rows.max() < 128 // 2  # a band of text lines from the top, nothing else
    ink = first[differs]
    yellow = (ink[:, 0] > ink[:, 2] + 60) & (ink[:, 1] > ink[:, 2] + 60)
    assert yellow.sum() > 100  # the text, in a colour no grey has


def test_a_series_it_cannot_place_is_refused_in_one_line(tmp_path):
    paths, affine, labels = _series(tmp_path / "ct", count=3)
    half_a_slice = affine.copy()
    half_a_slice[:3, 3] += 0.5 * affine[:3, 2]
    for bad_affine, bad_labels in ((half_a_slice, labels), (affine, labels[:64])):
        with pytest.raises(UserError, match=r"is not a slice of the mask's grid") as refused:
            write_dicom_overlay(bad_labels, bad_affine, paths, NAMES, tmp_path / "overlay")
        assert "\n" not in str(refused.value) and str(refused.value).endswith("the mask is written as NIfTI only")
    anonymised, affine, labels = _series(tmp_path / "anonymised", count=3, StudyInstanceUID="")
    with pytest.raises(UserError, match=r"the series has no StudyInstanceUID .*; the mask is written as NIfTI only$"):
        write_dicom_overlay(labels, affine, anonymised, NAMES, tmp_path / "overlay")
    assert not (tmp_path / "overlay").exists()


def test_an_anonymised_series_is_referenced_through_the_file_meta_and_a_rerun_leaves_one_series(tmp_path):
    paths, affine, labels = _series(tmp_path / "ct", count=4, SOPInstanceUID="")  # the meta header keeps them
    folder = tmp_path / "overlay"
    write_dicom_overlay(labels, affine, paths, NAMES, folder)
    fewer = [p for p in paths if pydicom.dcmread(str(p)).InstanceNumber != 4]
    written = write_dicom_overlay(labels, affine, fewer, NAMES, folder)  # the last slice gone: 3 images
    assert sorted(folder.iterdir()) == written
    for path, source in zip(written, _sources_by_position(fewer)):
        reference = pydicom.dcmread(str(path)).SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.file_meta.MediaStorageSOPInstanceUID != ""


def test_without_matplotlib_the_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"^--output_format dicom_overlay needs matplotlib .*\[plot\]'$"):
        write_dicom_overlay(np.zeros((2, 2, 1), np.uint8), np.eye(4), [tmp_path / "a.dcm"], NAMES, tmp_path / "o")
