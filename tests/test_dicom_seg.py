"""DICOM Segmentation output (btcv_unetr/dicom_seg.py): ``test.py --output_format dicom_seg``, the service's
``seg.dcm`` (the service in the test's process), and a PACS round trip through a real Orthanc with its DICOMweb
plugin (tests/orthanc.py) and a real ``btcv-unetr serve --dicomweb``.

The oracle places every SEG frame on the series' grid by its ImagePositionPatient with SimpleITK's
own physical-to-index transform (not this package's affine arithmetic), and compares with the
NIfTI mask voxel for voxel.
"""

from __future__ import annotations

import io
import random
import sys
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed: pip install 'btcv-unetr[dicom]'")
pytest.importorskip("highdicom", reason="the dicom extra is not installed: pip install 'btcv-unetr[dicom]'")

import highdicom as hd  # noqa: E402
from conftest import tiny_net_config  # noqa: E402
from orthanc import orthanc_or_skip, running_orthanc  # noqa: E402
from serving import running_server, tiny_checkpoint  # noqa: E402

from btcv_unetr.config.load import (  # noqa: E402
    CONFIG_DIR,
    build_config,
    read_yaml,  # noqa: E402
)
from btcv_unetr.data import dicom as reader  # noqa: E402
from btcv_unetr.data.dicom import LPS_TO_RAS  # noqa: E402
from btcv_unetr.errors import UserError  # noqa: E402
from btcv_unetr.inference.batch import run_inference  # noqa: E402
from btcv_unetr.inference.dicom_overlay import write_dicom_overlay  # noqa: E402
from btcv_unetr.inference.dicom_rtstruct import write_dicom_rtstruct  # noqa: E402
from btcv_unetr.inference.dicom_seg import EXTRA_LINE, require_highdicom, write_dicom_seg  # noqa: E402
from btcv_unetr.inference.provenance import provenance  # noqa: E402
from btcv_unetr.labels import ORGANS  # noqa: E402
from btcv_unetr.model.build import build_model  # noqa: E402
from btcv_unetr.serve import pacs  # noqa: E402
from btcv_unetr.serve.service import PACS_REQUEST  # noqa: E402
from btcv_unetr.synthetic.phantoms import generate_case  # noqa: E402
from btcv_unetr.testing.app import in_process_service  # noqa: E402
from btcv_unetr.testing.checkpoints import seeded_checkpoint  # noqa: E402
from btcv_unetr.testing.server import free_port  # noqa: E402

pytestmark = pytest.mark.xdist_group("test_dicom_seg")  # one Orthanc and one PACS-connected server

UID_ROOT = "1.2.826.0.1.3680043.2.1125.7"
STUDY_UID, SERIES_UID, FRAME_UID = f"{UID_ROOT}.1", f"{UID_ROOT}.2", f"{UID_ROOT}.3"


def write_series(image: sitk.Image, folder: Path, shuffle: bool = True) -> list[Path]:
    """``image`` as a CT series, one slice per file (SOP instance ``UID_ROOT.4.<k+1>`` for slice k), file
    names in random order so that nothing can lean on them."""
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.8f}" for v in (direction[0], direction[3], direction[6],
                                                  direction[1], direction[4], direction[7]))
    names = list(range(image.GetDepth()))
    if shuffle:
        random.Random(5).shuffle(names)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{UID_ROOT}.4.{k + 1}",
                "0020|000d": STUDY_UID, "0020|000e": SERIES_UID, "0020|0052": FRAME_UID, "0020|0013": str(k + 1),
                "0020|0011": "3", "0010|0010": "Phantom^Seven", "0010|0020": "PH7", "0008|0020": "20240101",
                "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0037": orientation,
                "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        paths.append(folder / f"{names[k]:04d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(plane)
    return paths


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def read_seg_on_grid(path: Path, grid: sitk.Image) -> np.ndarray:
    """The SEG's frames as labels ``(X, Y, Z)`` on ``grid``: each frame placed by its ImagePositionPatient
    (SimpleITK's physical-to-index transform), its pixels (rows, columns) along the grid's (Y, X)."""
    seg = pydicom.dcmread(str(path))
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    assert np.allclose(np.array(orientation, float).reshape(2, 3).T, direction[:, :2], atol=1e-4)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    labels = np.zeros(grid.GetSize(), np.uint8)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        index = np.array(grid.TransformPhysicalPointToContinuousIndex(position))
        k = int(round(index[2]))
        assert np.allclose(index, (0, 0, k), atol=1e-3), index
        plane = labels[:, :, k]
        assert not plane[frame.T > 0].any(), "segments overlap"
        plane[frame.T > 0] = segment
    return labels


def phantom_on_lefthanded_grid(folder: Path, index: int = 3, size: int = 48) -> tuple[Path, Path]:
    """A phantom image and label stored with RAS affine diag(-0.9, 0.8, 2.5): the slice normal of its DICOM
    slices (row x column cosines) points inferior, so SimpleITK reads the series in reverse slice order."""
    case = generate_case(seed=11, index=index, size=size)
    affine = np.diag([-0.9, 0.8, 2.5, 1.0])
    affine[:3, 3] = (40.0, -30.0, -60.0)
    folder.mkdir(parents=True, exist_ok=True)
    image, label = folder / "image.nii.gz", folder / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(case.image.dataobj), affine), image)
    nib.save(nib.Nifti1Image(np.asarray(case.label.dataobj).astype(np.uint8), affine), label)
    return image, label


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> dict:
    """The phantom as a shuffled DICOM series, SimpleITK's NIfTI of it (the pipeline's path), and the
    phantom's organs resampled onto that grid."""
    folder = tmp_path_factory.mktemp("dicom_case")
    image, label = phantom_on_lefthanded_grid(folder / "nifti")
    files = write_series(sitk.ReadImage(str(image)), folder / "series")
    grid = read_series(folder / "series")
    (series,) = reader.find_series(folder / "series")
    volume = reader.read_series(series, "series")
    converted = folder / "converted.nii.gz"
    reader.write_series_as_nifti(volume, converted)
    organs = sitk.Resample(sitk.ReadImage(str(label)), grid, sitk.Transform(), sitk.sitkNearestNeighbor)
    labels = sitk.GetArrayFromImage(organs).transpose(2, 1, 0).astype(np.uint8)
    return {"folder": folder / "series", "files": files, "grid": grid, "nifti": converted, "labels": labels,
            "volume": volume}


def test_the_series_is_read_in_reverse_slice_order(dicom_case):
    """The left-handed storage is what makes the slice matching matter: file k is not slice k."""
    grid = dicom_case["grid"]
    assert grid.GetDirection()[8] < 0
    assert dicom_case["volume"].slices[0].path.name == dicom_case["files"][grid.GetDepth() - 1].name


def test_the_reader_gives_simpleitks_grid_and_voxels(dicom_case):
    """btcv_unetr.data.dicom (positions from pydicom, pixels from GDCM) against SimpleITK's own series reader."""
    grid, converted = dicom_case["grid"], nib.load(dicom_case["nifti"])
    expected = LPS_TO_RAS @ _sitk_affine(grid)
    np.testing.assert_allclose(converted.affine, expected, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(converted.dataobj),
                                  sitk.GetArrayFromImage(grid).transpose(2, 1, 0).astype(np.float32))


def _sitk_affine(image) -> np.ndarray:
    """SimpleITK's voxel-to-LPS affine of ``image``."""
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def test_a_seg_of_the_phantom_organs_has_them_voxel_for_voxel_with_codes_and_references(dicom_case, tmp_path):
    labels = dicom_case["labels"]
    assert len(np.unique(labels)) >= 10  # most organs are in the 48-voxel phantom
    path = tmp_path / "organs_seg.dcm"
    write_dicom_seg(labels, nib.load(dicom_case["nifti"]).affine, dicom_case["files"], list(ORGANS), path)
    assert np.array_equal(read_seg_on_grid(path, dicom_case["grid"]), labels)
    assert not list(tmp_path.glob(".*tmp*"))

    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == STUDY_UID and seg.FrameOfReferenceUID == FRAME_UID
    assert seg.PatientID == "PH7" and seg.SeriesInstanceUID not in (SERIES_UID, STUDY_UID)
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == SERIES_UID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == \
        {f"{UID_ROOT}.4.{k + 1}" for k in range(labels.shape[2])}
    # Each frame's source instance is the slice its position says (instance UID .4.<k+1> is slice k
    # of the stored image, slice Z-1-k of the grid read in reverse).
    depth = labels.shape[2]
    for group in seg.PerFrameFunctionalGroupsSequence:
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        k = int(round(dicom_case["grid"].TransformPhysicalPointToContinuousIndex(position)[2]))
        assert source == f"{UID_ROOT}.4.{depth - k}"

    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segments) == list(range(1, 14))
    assert [segments[n].SegmentLabel for n in range(1, 14)] == list(ORGANS)
    expected = {1: ("78961009", None), 2: ("64033007", "24028007"), 3: ("64033007", "7771000"),
                4: ("28231008", None), 5: ("32849002", None), 6: ("10200004", None), 7: ("69695003", None),
                8: ("15825003", None), 9: ("64131007", None), 10: ("91723000", None), 11: ("15776009", None),
                12: ("23451007", "24028007"), 13: ("23451007", "7771000")}
    for number, (code, side) in expected.items():
        segment = segments[number]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (code, "SCT"), segment.SegmentLabel
        modifiers = [m.CodeValue for m in getattr(kind, "SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([side] if side else []), segment.SegmentLabel
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert segment.SegmentAlgorithmType == "AUTOMATIC" and len(segment.RecommendedDisplayCIELabValue) == 3
    assert segments[1].RecommendedDisplayCIELabValue != segments[6].RecommendedDisplayCIELabValue


def test_a_series_that_is_not_the_grid_is_refused_in_one_line(dicom_case, tmp_path):
    wrong = nib.load(dicom_case["nifti"]).affine.copy()
    wrong[2, 3] += 0.5 * wrong[2, 2]  # half a slice off
    with pytest.raises(UserError, match="is not a slice of the series' grid"):
        write_dicom_seg(dicom_case["labels"], wrong, dicom_case["files"], list(ORGANS), tmp_path / "x.dcm")
    with pytest.raises(UserError, match="two instances at one slice position"):
        write_dicom_seg(dicom_case["labels"], nib.load(dicom_case["nifti"]).affine,
                        [*dicom_case["files"], dicom_case["files"][0]], list(ORGANS), tmp_path / "x.dcm")
    unplaced = []
    for path in dicom_case["files"]:  # a series without a frame of reference (GDCM writes none by default)
        dataset = pydicom.dcmread(str(path))
        del dataset.FrameOfReferenceUID
        unplaced.append(tmp_path / "unplaced" / path.name)
        unplaced[-1].parent.mkdir(exist_ok=True)
        dataset.save_as(str(unplaced[-1]))
    with pytest.raises(UserError) as caught:
        write_dicom_seg(dicom_case["labels"], nib.load(dicom_case["nifti"]).affine, unplaced, list(ORGANS),
                        tmp_path / "x.dcm")
    assert str(caught.value) == (f"{tmp_path / 'unplaced'}: the series has no FrameOfReferenceUID, which a SEG needs "
                                 "to be placed on it; the mask is written as NIfTI only")
    assert not (tmp_path / "x.dcm").exists()


def test_without_highdicom_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(UserError) as caught:
        require_highdicom()
    assert str(caught.value) == EXTRA_LINE == \
        "--output_format dicom_seg needs the dicom extra: pip install 'btcv-unetr[dicom]'"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(build_model(_config(folder).model).state_dict(), folder / "w.pth")
    return folder


def _config(weights_dir: Path, **infer):
    layers = [read_yaml(CONFIG_DIR / "tiny.yaml"),
              {"train": {"pretrained_dir": str(weights_dir), "pretrained_model_name": "w.pth"},
               "infer": {"overlay": False, "hd95": False, **infer}}]
    return build_config(layers)


def test_infer_writes_a_seg_equal_to_its_nifti_mask(weights, dicom_case, tmp_path):
    out = tmp_path / "out"
    run_inference(_config(weights, input=str(dicom_case["folder"]), output_dir=str(out), output_format="dicom_seg"))
    mask = nib.load(out / "series_seg.nii.gz")
    assert np.allclose(mask.affine, nib.load(dicom_case["nifti"]).affine, atol=1e-4)
    expected = np.asarray(mask.dataobj)
    assert expected.any()
    assert np.array_equal(read_seg_on_grid(out / "series_seg.dcm", dicom_case["grid"]), expected)
    assert pydicom.dcmread(str(out / "series_seg.dcm")).ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID


def test_infer_skips_a_case_only_when_its_seg_exists_too(weights, dicom_case, tmp_path, capsys):
    out = tmp_path / "out"
    run_inference(_config(weights, input=str(dicom_case["folder"]), output_dir=str(out)))
    assert (out / "series_seg.nii.gz").is_file() and not (out / "series_seg.dcm").exists()
    run_inference(_config(weights, input=str(dicom_case["folder"]), output_dir=str(out), output_format="dicom_seg"))
    assert (out / "series_seg.dcm").is_file()
    run_inference(_config(weights, input=str(dicom_case["folder"]), output_dir=str(out), output_format="dicom_seg"))
    assert "exists, skipped" in capsys.readouterr().out


def test_a_seg_for_a_nifti_input_is_refused_in_one_line(weights, dicom_case, tmp_path):
    scan = dicom_case["nifti"]
    with pytest.raises(UserError) as caught:
        run_inference(_config(weights, input=str(scan), output_dir=str(tmp_path / "o"), output_format="dicom_seg"))
    assert str(caught.value) == (f"{scan}: --output_format dicom_seg needs a DICOM series input (its folder of "
                                 "files); for this file use --output_format nifti")


# --- A real PACS: Orthanc with its DICOMweb plugin -------------------------------------------------------

ORTHANC = orthanc_or_skip()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, dicom_case) -> str:
    """A started Orthanc holding the phantom series (stored through Orthanc's own REST API, not the client
    under test); yields its DICOMweb root."""
    if isinstance(ORTHANC, str):
        pytest.skip(ORTHANC)
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        for path in dicom_case["files"]:
            response = httpx.post(f"{url}/instances", content=path.read_bytes(), timeout=30)
            assert response.status_code == 200, response.text
        yield f"{url}/dicom-web"


def test_a_series_is_retrieved_from_the_pacs_whole_and_within_limits(orthanc, dicom_case, tmp_path):
    count = len(dicom_case["files"])
    assert pacs.retrieve_series(orthanc, STUDY_UID, SERIES_UID, tmp_path / "got", 1 << 30, count) == count
    got = {pydicom.dcmread(str(p)).SOPInstanceUID: pydicom.dcmread(str(p)) for p in (tmp_path / "got").iterdir()}
    sent = {pydicom.dcmread(str(p)).SOPInstanceUID: pydicom.dcmread(str(p)) for p in dicom_case["files"]}
    assert sorted(got) == sorted(sent)
    for uid, dataset in sent.items():
        assert np.array_equal(got[uid].pixel_array, dataset.pixel_array)
        assert got[uid].ImagePositionPatient == dataset.ImagePositionPatient

    refusals = [
        (lambda: pacs.retrieve_series(orthanc, STUDY_UID, SERIES_UID, tmp_path / "a", 1 << 30, count - 1),
         413, f"series {SERIES_UID} has more than {count - 1} instances (this server's limit)"),
        (lambda: pacs.retrieve_series(orthanc, STUDY_UID, SERIES_UID, tmp_path / "b", 10 * 5000, count),
         413, f"series {SERIES_UID} is larger than this server's limit for a series"),
        (lambda: pacs.retrieve_series(orthanc, STUDY_UID, f"{UID_ROOT}.99", tmp_path / "c", 1 << 30, count),
         404, f"series {UID_ROOT}.99 of study {STUDY_UID} is not on the PACS"),
        (lambda: pacs.retrieve_series(orthanc, STUDY_UID, "1.2/../x", tmp_path / "d", 1 << 30, count),
         400, "series_uid must be a DICOM UID (digits and dots, at most 64 characters), got '1.2/../x'"),
        (lambda: pacs.retrieve_series(f"http://127.0.0.1:{free_port()}/dicom-web", STUDY_UID, SERIES_UID,
                                      tmp_path / "e", 1 << 30, count),
         502, f"the PACS cannot be reached for the instances of series {SERIES_UID} (Connection refused)")]
    for call, status, detail in refusals:
        with pytest.raises(pacs.PacsError) as caught:
            call()
        assert (caught.value.status, caught.value.detail) == (status, detail)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# --- The service: a SEG for every DICOM job; jobs taken from the PACS and stored back --------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service without a PACS, in the test's process (btcv_unetr.testing.app)."""
    folder = tmp_path_factory.mktemp("served")
    with in_process_service(tiny_checkpoint(folder / "run"), folder / "jobs") as client:
        yield client


@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory, orthanc):
    """A real ``btcv-unetr serve --dicomweb`` pointed at the test's Orthanc (the round trip between two real
    servers); a client on it."""
    folder = tmp_path_factory.mktemp("served_pacs")
    with running_server(tiny_checkpoint(folder / "run"), folder / "jobs", "--dicomweb", orthanc) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _wait(client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished after {timeout} s")


def _mask_and_seg(client, job_id: str, folder: Path) -> tuple[np.ndarray, Path]:
    (folder / "mask.nii.gz").write_bytes(client.get(f"/jobs/{job_id}/mask").content)
    response = client.get(f"/jobs/{job_id}/seg")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    (folder / "seg.dcm").write_bytes(response.content)
    return np.asarray(nib.load(folder / "mask.nii.gz").dataobj), folder / "seg.dcm"


def test_an_uploaded_dicom_zip_gets_a_seg_equal_to_its_mask(server, dicom_case, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in dicom_case["files"]:
            archive.write(path, f"series/{path.name}")
    response = server.post("/jobs", files={"file": ("series.zip", buffer.getvalue())})
    assert response.status_code == 202, response.text
    job = _wait(server, response.json()["id"])
    assert job["state"] == "done" and job["kind"] == "dicom", job
    assert job["links"]["seg"] == f"/jobs/{job['id']}/seg"
    mask, seg = _mask_and_seg(server, job["id"], tmp_path)
    assert mask.any() and np.array_equal(read_seg_on_grid(seg, dicom_case["grid"]), mask)
    assert pydicom.dcmread(str(seg)).ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID


def test_a_nifti_job_has_no_seg_and_a_server_without_pacs_refuses_uids(server, dicom_case):
    scan = dicom_case["nifti"]
    response = server.post("/jobs", files={"file": ("scan.nii.gz", scan.read_bytes())})
    job = _wait(server, response.json()["id"])
    answer = server.get(f"/jobs/{job['id']}/seg")
    assert answer.status_code == 404
    assert answer.json()["detail"] == f"job {job['id']} has no seg: only DICOM inputs get one"
    answer = server.post("/jobs", json={"study_uid": STUDY_UID, "series_uid": SERIES_UID})
    assert answer.status_code == 400
    assert answer.json()["detail"] == ("this server has no PACS (start it with --dicomweb URL): send the image as "
                                       "the multipart form field 'file'")


def test_a_pacs_job_takes_its_series_and_stores_its_seg_back(pacs_server, orthanc, dicom_case, tmp_path):
    response = pacs_server.post("/jobs", json={"study_uid": STUDY_UID, "series_uid": SERIES_UID})
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "dicom"
    assert response.json()["pacs"] == {"study_uid": STUDY_UID, "series_uid": SERIES_UID, "store": ["seg"]}
    job = _wait(pacs_server, response.json()["id"])
    assert job["state"] == "done" and job["stored_to_pacs"] is True, job
    mask, seg = _mask_and_seg(pacs_server, job["id"], tmp_path)
    # The SEG as the PACS now holds it, found and fetched with Orthanc's own REST API.
    base = orthanc.removesuffix("/dicom-web")
    found = httpx.post(f"{base}/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": STUDY_UID,
                                                                                "Modality": "SEG"}}, timeout=30)
    (stored_id,) = found.json()
    (tmp_path / "stored.dcm").write_bytes(httpx.get(f"{base}/instances/{stored_id}/file", timeout=30).content)
    stored = pydicom.dcmread(str(tmp_path / "stored.dcm"))
    assert stored.SOPInstanceUID == pydicom.dcmread(str(seg)).SOPInstanceUID
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    assert mask.any() and np.array_equal(read_seg_on_grid(tmp_path / "stored.dcm", dicom_case["grid"]), mask)
    assert [s.SegmentLabel for s in stored.SegmentSequence] == list(ORGANS)


def test_a_pacs_job_stores_the_rtstruct_and_the_overlay_series_it_asks_for(pacs_server, orthanc, dicom_case,
                                                                           tmp_path):
    """``store: ["rtstruct", "overlay"]``: both written and stored (the SEG written, not stored), each marked as the
    output of a model not for clinical use (the served tiny model's weights are random: its card says so)."""
    request = {"study_uid": STUDY_UID, "series_uid": SERIES_UID, "store": ["rtstruct", "overlay"]}
    response = pacs_server.post("/jobs", json=request)
    assert response.status_code == 202, response.text
    job = _wait(pacs_server, response.json()["id"])
    assert job["state"] == "done" and job["stored_to_pacs"] is True, job
    assert {"seg", "rtstruct", "overlay_series"} <= set(job["links"])
    base = orthanc.removesuffix("/dicom-web")

    def stored(modality: str) -> list:
        found = httpx.post(f"{base}/tools/find", json={"Level": "Instance", "Query": {
            "StudyInstanceUID": STUDY_UID, "Modality": modality}}, timeout=30).json()
        return [pydicom.dcmread(io.BytesIO(httpx.get(f"{base}/instances/{i}/file", timeout=30).content))
                for i in found]

    (rtstruct,) = stored("RTSTRUCT")
    assert rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    overlays = stored("OT")
    assert len(overlays) == len(dicom_case["files"]) and len({o.SeriesInstanceUID for o in overlays}) == 1
    for dataset in (rtstruct, overlays[0]):
        assert dataset.SeriesDescription.startswith("NOT FOR CLINICAL USE"), dataset.SeriesDescription
    archive = zipfile.ZipFile(io.BytesIO(pacs_server.get(f"/jobs/{job['id']}/overlay_series").content))
    assert sorted(archive.namelist()) == sorted(f"overlay_{k:04d}.dcm" for k in range(1, len(overlays) + 1))
    assert pacs_server.get(f"/jobs/{job['id']}/rtstruct").content[128:132] == b"DICM"


@pytest.mark.parametrize("body, status, detail", [
    ({"study_uid": STUDY_UID, "series_uid": f"{UID_ROOT}.99"}, 404,
     f"series {UID_ROOT}.99 of study {STUDY_UID} is not on the PACS"),
    ({"study_uid": STUDY_UID, "series_uid": "1.2.x"}, 400,
     "series_uid must be a DICOM UID (digits and dots, at most 64 characters), got '1.2.x'"),
    ({"study_uid": STUDY_UID}, 400, PACS_REQUEST), ([1, 2], 400, PACS_REQUEST),
    ({"study_uid": STUDY_UID, "series_uid": SERIES_UID, "store": ["seg", "nifti"]}, 400,
     f"'store' must be a list of seg, rtstruct, overlay: {PACS_REQUEST}")])
def test_pacs_job_mistakes_get_one_line(pacs_server, body, status, detail):
    response = pacs_server.post("/jobs", json=body)
    assert (response.status_code, response.json()) == (status, {"detail": detail})


def test_a_wrong_dicomweb_url_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, serve_sandbox):
    from btcv_unetr import cli
    for url in ("ftp://pacs/dicom-web", "http://user:secret@pacs/dicom-web", "pacs:8042"):
        assert cli.main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(free_port()),
                         "--dicomweb", url]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --dicomweb {url!r}: give the PACS's DICOMweb root as http(s)://host:port/path, without "
            "credentials or query (Orthanc: http://host:8042/dicom-web)")
    monkeypatch.setitem(sys.modules, "highdicom", None)
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", str(free_port()),
                     "--dicomweb", "http://127.0.0.1:8042/dicom-web"]) == 2
    assert capsys.readouterr().err.strip() == "error: --dicomweb needs the dicom extra: pip install 'btcv-unetr[dicom]'"


def test_a_seg_the_pacs_refuses_is_one_line(orthanc, tmp_path):
    (tmp_path / "bad.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(pacs.PacsError) as caught:
        pacs.store_instance(orthanc, tmp_path / "bad.dcm")
    assert (caught.value.status, caught.value.detail) == (502, "the PACS answered 400 Bad Request to the "
                                                               "segmentation's storage")


# --- The net's name (issue 28): a SegResNet's SEG, RTSTRUCT and overlay say SegResNet, not UNETR -------------------


def test_a_segresnet_checkpoints_seg_and_card_name_it(dicom_case, tmp_path, capsys):
    weights = seeded_checkpoint(tmp_path / "segresnet" / "model.pt", tiny_net_config("segresnet"))
    out = tmp_path / "out"
    run_inference(build_config([read_yaml(CONFIG_DIR / "tiny.yaml"), {
        "train": {"pretrained_dir": str(weights.parent), "pretrained_model_name": weights.name},
        "infer": {"overlay": False, "hd95": False, "input": str(dicom_case["folder"]), "output_dir": str(out),
                  "output_format": "dicom_seg"}}]))
    assert "  network: SegResNet (init_filters 8, blocks_down 1,1,1, blocks_up 1,1), ROI 32x32x32" in \
        capsys.readouterr().out.splitlines()  # the card test.py prints first
    seg = pydicom.dcmread(str(out / "series_seg.dcm"))
    algorithm = seg.SegmentSequence[0].SegmentAlgorithmName
    identification = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm == identification.AlgorithmName == "btcv-unetr SegResNet"
    assert seg.ManufacturerModelName == "SegResNet"
    # Its settings as parameters that highdicom reads back (key=value, comma-separated: none inside a value).
    parameters = hd.AlgorithmIdentificationSequence.from_sequence(
        seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence).parameters
    assert {key: parameters[key] for key in ("network", "model_name", "init_filters", "blocks_down", "roi_size")} == {
        "network": "SegResNet", "model_name": "segresnet", "init_filters": "8", "blocks_down": "1;1;1",
        "roi_size": "32x32x32"}


def test_the_descriptions_of_every_dicom_output_name_the_net(dicom_case, tmp_path):
    models = [tiny_net_config("unetr").model] + [tiny_net_config("swin_unetr").model] * 2
    made_with = provenance("ab" * 32, "fp32", "cpu", 0.5, False, "gaussian", None, models=models)
    labels, affine = dicom_case["labels"], nib.load(dicom_case["nifti"]).affine
    write_dicom_seg(labels, affine, dicom_case["files"], list(ORGANS), tmp_path / "seg.dcm", provenance=made_with)
    seg = pydicom.dcmread(str(tmp_path / "seg.dcm"))
    assert seg.SeriesDescription == "ensemble of 3: UNETR, Swin UNETR x2 organ segmentation"
    assert seg.ContentDescription == "ensemble of 3: UNETR, Swin UNETR x2: abdominal organs (BTCV classes)"[:64]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "btcv-unetr ensemble of 3: UNETR, Swin UNETR x2"
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "member2_model_name=swin_unetr," in parameters and "member3_roi_size=64x64x64" in parameters
    write_dicom_rtstruct(labels, affine, dicom_case["files"], list(ORGANS), tmp_path / "rt.dcm", provenance=made_with)
    rtstruct = pydicom.dcmread(str(tmp_path / "rt.dcm"))
    assert rtstruct.SeriesDescription == "ensemble of 3: UNETR, Swin UNETR x2 organ contours"
    assert rtstruct.ManufacturerModelName == "ensemble of 3: UNETR, Swin UNETR x2"
    generation = rtstruct.StructureSetROISequence[0].ROIGenerationDescription
    assert generation.startswith("ensemble of 3: UNETR, Swin UNETR x2, btcv-unetr ")
    first = write_dicom_overlay(labels, affine, dicom_case["files"], list(ORGANS), tmp_path / "overlay",
                                provenance={**made_with, "network": "SegResNet"})[0]
    overlay = pydicom.dcmread(str(first))
    assert overlay.SeriesDescription == "SegResNet organ overlay" and overlay.ManufacturerModelName == "SegResNet"
    assert "(SegResNet)" in overlay.DerivationDescription
