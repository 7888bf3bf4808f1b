"""Every output of a case is named like its mask (issue 22): ``case.nii.gz`` and ``case.nrrd`` in one folder give two
masks, two overlays and two probability files, none written over another."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.errors import UserError
from btcv_unetr.inference.cases import Case, case_output_names, check_distinct_outputs, written_outputs
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.testing.checkpoints import seeded_checkpoint


def _phantom(path: Path, index: int, size: int) -> Path:
    """A phantom scan at ``path``: NIfTI as generated, or converted by SimpleITK to the format of the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = generate_case(seed=5, index=index, size=size).image
    if path.name.endswith(".nii.gz"):
        nib.save(image, path)
    else:
        nifti = path.with_name("converted.nii.gz")
        nib.save(image, nifti)
        sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
        nifti.unlink()
    return path


def test_two_formats_of_one_case_name_give_two_of_every_output(tmp_path):
    pytest.importorskip("matplotlib")  # the overlay
    checkpoint = seeded_checkpoint(tmp_path / "run" / "model.pt", tiny_config())
    scans = tmp_path / "scans"
    nifti, nrrd = _phantom(scans / "case.nii.gz", 1, size=40), _phantom(scans / "case.nrrd", 2, size=48)
    out = tmp_path / "out"
    argv = ["infer", "--config", "tiny.yaml", "--pretrained_dir", str(checkpoint.parent), "--pretrained_model_name",
            checkpoint.name, "--input", str(scans), "--output_dir", str(out), "--device", "cpu", "--overlay",
            "--save_probabilities", "--no_hd95"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "case.nrrd_overlay.png", "case.nrrd_probabilities.npz", "case_overlay.png", "case_probabilities.npz",
        "case_seg.nii.gz", "case_seg.nrrd"]
    # Each file holds its own scan's result: the two scans have different grids.
    for scan, mask, probabilities in [(nifti, "case_seg.nii.gz", "case_probabilities.npz"),
                                      (nrrd, "case_seg.nrrd", "case.nrrd_probabilities.npz")]:
        shape = sitk.ReadImage(str(scan)).GetSize()  # (i, j, k)
        assert sitk.ReadImage(str(out / mask)).GetSize() == shape
        with np.load(out / probabilities) as stored:
            assert stored["probabilities"].shape[-3:] == shape
    assert (out / "case_overlay.png").read_bytes() != (out / "case.nrrd_overlay.png").read_bytes()


def test_nifti_and_picture_cases_keep_their_plain_output_names(tmp_path):
    out = tmp_path / "out"
    assert case_output_names(Case("img0035", Path("/in/img0035.nii.gz")), out) == [
        "img0035_seg.nii.gz", "img0035_seg.dcm", "img0035_rtstruct.dcm", "img0035_overlay_dcm",
        "img0035_probabilities.npz", "img0035_overlay.png"]
    assert case_output_names(Case("cat", Path("/in/cat.jpg")), out) == [
        "cat_seg.png", "cat_seg.dcm", "cat_rtstruct.dcm", "cat_overlay_dcm", "cat_probabilities.npz",
        "cat_overlay.png"]
    # An .mhd header's mask is one .mha file: its other outputs follow the mask, not the input.
    assert case_output_names(Case("ct", Path("/in/ct.mhd")), out) == [
        "ct_seg.mha", "ct.mha_seg.dcm", "ct.mha_rtstruct.dcm", "ct.mha_overlay_dcm", "ct.mha_probabilities.npz",
        "ct.mha_overlay.png"]


def test_inputs_whose_other_outputs_would_meet_are_refused_in_one_line(tmp_path):
    """``case.nrrd.nii.gz`` (case name ``case.nrrd``) and ``case.nrrd`` write different masks, but the same overlay
    name: refused before anything runs, naming both inputs and the file, when overlays are written."""
    out = tmp_path / "out"
    first, second = Case("case.nrrd", Path("/in/case.nrrd.nii.gz")), Case("case", Path("/in/case.nrrd"))
    check_distinct_outputs([first, second], out, written_outputs(tiny_config(infer={"overlay": False})))
    with pytest.raises(UserError) as caught:
        check_distinct_outputs([first, second], out, written_outputs(tiny_config(infer={"overlay": True})))
    assert str(caught.value) == (f"/in/case.nrrd.nii.gz and /in/case.nrrd would both write "
                                 f"{out}/case.nrrd_overlay.png: rename one, or segment them into different "
                                 "--output_dir folders")
