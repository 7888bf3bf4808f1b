"""Images from the wild through test.py (issue 27, section 3): nibabel's own test files, NIfTI headers with the quirks
real files carry (sform and qform apart, scaling, a singleton 4th axis, qform only), and NRRD and MHA files as
3D Slicer and ITK-SNAP write them (text headers and raw voxels built here, not by this project's writer). Each is
segmented with its mask on its own grid: same voxel shape, and the affine its header declares, read here from the
header's own numbers, not from the code under test. What cannot keep its geometry is refused in one line: those
cases are in test_fault_corpus.py.

One test.py run segments every file of the folder (one model load); each file's mask is then checked on its own.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.data.checks import check_data, data_notes
from btcv_unetr.data.images import read_volume
from btcv_unetr.model.build import build_model

TINY = str(CONFIG_DIR / "tiny.yaml")
NIBABEL = Path(data_path)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TILT = np.radians(12.0)  # an oblique acquisition: 12 degrees about the left-right axis, axes still perpendicular
TILTED = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(TILT), -np.sin(TILT)], [0.0, np.sin(TILT), np.cos(TILT)]])


def _voxels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """int16 voxels (i, j, k): air around a body of soft tissue, so that the model sees a scan."""
    data = np.full(shape, -1000, np.int16)
    body = tuple(slice(n // 5, n - n // 5 or 1) for n in shape)
    data[body] = np.random.default_rng(seed).integers(-100, 200, data[body].shape)
    return data


def _vector(values) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def slicer_nrrd(path: Path, data: np.ndarray, space: str, directions: np.ndarray, origin, detached: bool = False) -> \
        np.ndarray:
    """An int16 NRRD as 3D Slicer writes a scalar volume: ``space``, ``space directions`` (the columns of
    ``directions``: each voxel axis's step in mm, in ``space``), ``space origin``, gzip-encoded voxels, first axis
    fastest; ``detached``: the header in ``path`` (.nhdr) and the raw voxels beside it. Returns the RAS affine the
    header declares."""
    raw = np.asarray(data, "<i2").tobytes(order="F")
    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", "type: short", "dimension: 3", f"space: {space}",
             "sizes: " + " ".join(str(n) for n in data.shape),
             "space directions: " + " ".join(_vector(directions[:, axis]) for axis in range(3)),
             "kinds: domain domain domain", "endian: little", f"encoding: {'raw' if detached else 'gzip'}",
             f"space origin: {_vector(origin)}"]
    if detached:
        path.with_suffix(".raw").write_bytes(raw)
        path.write_text("\n".join([*lines, f"data file: {path.with_suffix('.raw').name}"]) + "\n")
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + gzip.compress(raw, mtime=0))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = directions, origin
    return affine if space == "right-anterior-superior" else LPS_TO_RAS @ affine


def itksnap_mha(path: Path, data: np.ndarray, direction: np.ndarray, spacing, origin, orientation: str) -> np.ndarray:
    """An int16 MetaImage as ITK-SNAP saves one (ITK's MetaIO): ``TransformMatrix`` (the voxel axes' LPS unit
    vectors, one after the other), ``Offset``, ``ElementSpacing``, ``AnatomicalOrientation`` and the voxels in the
    same file. Returns the RAS affine the header declares."""
    lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             "CompressedData = False",
             "TransformMatrix = " + " ".join(f"{v:.17g}" for v in direction.T.ravel()),
             "Offset = " + " ".join(f"{v:.17g}" for v in origin), "CenterOfRotation = 0 0 0",
             f"AnatomicalOrientation = {orientation}", "ElementSpacing = " + " ".join(f"{v:g}" for v in spacing),
             "DimSize = " + " ".join(str(n) for n in data.shape), "ElementType = MET_SHORT",
             "ElementDataFile = LOCAL"]
    path.write_bytes(("\n".join(lines) + "\n").encode() + np.asarray(data, "<i2").tobytes(order="F"))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = direction * np.asarray(spacing, float), origin
    return LPS_TO_RAS @ affine


def _nifti_like(source: Path, path: Path, data: np.ndarray | None = None, **fields) -> np.ndarray:
    """``source``'s header (a nibabel test file) with ``data`` (its own by default) and header ``fields`` changed,
    saved at ``path``; returns the affine nibabel reads from it."""
    image = nib.load(source)
    header = image.header.copy()
    for key, value in fields.items():
        header[key] = value
    data = np.asanyarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return nib.load(path).affine


def _wild_folder(folder: Path) -> dict[str, tuple[Path, np.ndarray, tuple[int, ...]]]:
    """Every input that must be segmented: name -> (file, RAS affine its header declares, voxel shape)."""
    cases: dict[str, tuple[Path, np.ndarray, tuple[int, ...]]] = {}

    def add(name: str, path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> None:
        cases[name] = (path, np.asarray(affine, np.float64), tuple(shape))

    # nibabel's own files as they ship: big-endian int16 (LAS), and a uint8 sform without qform smaller than a window.
    # (Its resampled_anat_moved.nii holds SPM's NaN outside the field of view: refused, in the fault corpus.)
    for name in ("anatomical.nii", "standard.nii.gz"):
        shutil.copy(NIBABEL / name, folder / name)
        image = nib.load(NIBABEL / name)
        add(name, folder / name, image.affine, image.shape)
    # A real oblique EPI (nibabel's example4d: tilted, axes perpendicular), its first volume as (X, Y, Z, 1).
    example = nib.load(NIBABEL / "example4d.nii.gz")
    first = np.asanyarray(example.dataobj)[..., :1]
    add("example4d_first", folder / "example4d_first.nii.gz",
        _nifti_like(NIBABEL / "example4d.nii.gz", folder / "example4d_first.nii.gz", first), first.shape[:3])
    # sform and qform 5 voxels apart, both coded: the sform is what nibabel and MONAI read.
    anatomical = nib.load(NIBABEL / "anatomical.nii")
    sform = anatomical.affine.copy()
    qform = sform.copy()
    qform[:3, 3] += [10.0, 0.0, 0.0]  # 5 voxels of 2 mm
    image = nib.Nifti1Image(np.asanyarray(anatomical.dataobj), None, header=anatomical.header.copy())
    image.set_sform(sform, code=2)  # aligned
    image.set_qform(qform, code=1)  # scanner
    nib.save(image, folder / "sform_qform_apart.nii")
    add("sform_qform_apart", folder / "sform_qform_apart.nii", sform, anatomical.shape)
    # The qform only (sform_code 0, as some converters write), with a CT's scaling (stored values * 1 - 1024).
    image = nib.Nifti1Image(np.asanyarray(anatomical.dataobj), None, header=anatomical.header.copy())
    image.set_sform(np.eye(4) * 3, code=0)
    image.set_qform(qform, code=1)
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, folder / "qform_only_scaled.nii")
    add("qform_only_scaled", folder / "qform_only_scaled.nii", qform, anatomical.shape)
    # 3D Slicer's NRRD, oblique: LPS (Slicer 4 and later) with gzip voxels, RAS (older Slicer) with a detached header.
    data = _voxels((40, 36, 20))
    steps = TILTED * [0.9, 0.9, 2.5]
    for name, space, detached in (("slicer_lps", "left-posterior-superior", False),
                                  ("slicer_ras_detached", "right-anterior-superior", True)):
        path = folder / f"{name}.{'nhdr' if detached else 'nrrd'}"
        add(name, path, slicer_nrrd(path, data, space, steps, (-18.0, 25.5, -102.25), detached), data.shape)
    # ITK-SNAP's MHA, oblique.
    add("itksnap", folder / "itksnap.mha",
        itksnap_mha(folder / "itksnap.mha", data, TILTED, (0.9, 0.9, 2.5), (12.0, -30.0, 40.5), "RAI"), data.shape)
    return cases


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict:
    """test.py over the folder of wild files, once: its output folder, what it printed, and the cases."""
    root = tmp_path_factory.mktemp("wild")
    folder = root / "in"
    folder.mkdir()
    cases = _wild_folder(folder)
    config = build_config([read_yaml(TINY)])
    weights = root / "w.pth"
    torch.manual_seed(0)
    torch.save(build_model(config.model).state_dict(), weights)
    argv = ["infer", "--config", TINY, "--pretrained_dir", str(root), "--pretrained_model_name", weights.name,
            "--input", str(folder), "--output_dir", str(root / "out"), "--no-overlay", "--no_hd95"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return {"status": status, "out": out.getvalue(), "err": err.getvalue(), "cases": cases, "folder": folder,
            "masks": root / "out"}


def test_every_wild_file_is_segmented(segmented):
    assert segmented["status"] == 0, segmented["err"]
    assert "Traceback" not in segmented["err"] and "failed" not in segmented["err"], segmented["err"]


MASKS = {"anatomical.nii": "anatomical_seg.nii.gz", "standard.nii.gz": "standard_seg.nii.gz",
         "example4d_first": "example4d_first_seg.nii.gz", "sform_qform_apart": "sform_qform_apart_seg.nii.gz",
         "qform_only_scaled": "qform_only_scaled_seg.nii.gz", "slicer_lps": "slicer_lps_seg.nrrd",
         "slicer_ras_detached": "slicer_ras_detached_seg.nrrd", "itksnap": "itksnap_seg.mha"}


@pytest.mark.parametrize("name", MASKS)
def test_a_wild_files_mask_is_on_its_grid_with_the_affine_its_header_declares(name, segmented):
    """Same voxel shape, and the header's affine to float32 precision (nibabel's own choice for NIfTI: the sform
    when its code is above 0; the NRRD and MHA headers' numbers converted to RAS here)."""
    path, affine, shape = segmented["cases"][name]
    mask = read_volume(segmented["masks"] / MASKS[name])
    assert mask.spatial_shape == shape[:3]
    assert np.allclose(mask.affine, affine, rtol=1e-6, atol=1e-4), (mask.affine, affine)
    assert set(np.unique(mask.data).tolist()) <= set(range(14))


def test_sform_and_qform_apart_are_said_in_one_note_and_the_sform_is_used(segmented):
    """The mask carries the sform as both its forms (above); test.py says once that the qform was not used."""
    notes = [line for line in segmented["err"].splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {segmented['folder'] / 'sform_qform_apart.nii'}: its sform (code 2) and qform (code 1) "
                     "place voxels up to 10 mm apart (5 voxels): the sform is used, as nibabel and MONAI do, and the "
                     "mask carries it as both; ITK-based tools (ITK-SNAP) read the qform and show the scan elsewhere"]
    mask = nib.load(segmented["masks"] / "sform_qform_apart_seg.nii.gz")
    assert np.allclose(mask.get_qform(), mask.get_sform()) and int(mask.header["sform_code"]) > 0


def test_check_data_takes_the_wild_niftis_and_notes_the_sform(segmented, tmp_path):
    """check-data over the NIfTI files as a datalist (each its own label: shapes and affines agree): no problem,
    and the same sform and qform note."""
    names = [name for name, (path, _, _) in segmented["cases"].items() if path.name.endswith((".nii", ".nii.gz"))]
    entries = []
    for name in names:
        path = segmented["cases"][name][0]
        label = nib.Nifti1Image(np.zeros(segmented["cases"][name][2][:3], np.uint8), None,
                                header=nib.load(path).header.copy())
        label.set_data_dtype(np.uint8)
        label.header["scl_slope"], label.header["scl_inter"] = 1.0, 0.0
        nib.save(label, tmp_path / f"{name}_label.nii.gz")
        entries.append({"image": str(path), "label": str(tmp_path / f"{name}_label.nii.gz")})
    (tmp_path / "list.json").write_text(json.dumps({"training": entries, "test": [{"image": e["image"]}
                                                                                  for e in entries]}))
    problems, counts = check_data(str(tmp_path), "list.json", 14, workers=1)
    assert [str(p) for p in problems] == [] and counts["training"] == len(names)
    notes = data_notes([("training", entry) for entry in entries])
    apart = segmented["cases"]["sform_qform_apart"][0]
    assert [note.split(": its ")[0] for note in notes] == [str(apart), str(tmp_path / "sform_qform_apart_label.nii.gz")]
