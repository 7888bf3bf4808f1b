"""The MONAI internals this project relies on, pinned: a MONAI release that changes one fails here first, with a
message naming what changed and the code that reads it (pyproject allows monai>=1.5,<1.7).

- inference/inversion.py ``_crop_box_before_resampling`` reads ``MetaTensor.applied_operations``: a list of dicts
  whose ``"class"`` names each spatial step (``Orientation``, ``CropForeground``, ``SpatialResample``), the
  resampling step's ``"orig_size"`` being its input's spatial size; and ``meta["original_affine"]`` /
  ``meta["spatial_shape"]``, the scan's own grid.
- inference/predictor.py ``Predictor.window_count`` counts windows with the private
  ``monai.inferers.utils._get_scan_interval`` and the arithmetic of ``sliding_window.windows_per_pass`` (the grid
  ``dense_patch_slices`` would list), which must give the number of windows
  ``sliding_window_inference`` really runs (the service's progress bar counts to it).
"""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from monai.inferers import sliding_window_inference

from btcv_unetr.data.transforms import infer_transforms
from btcv_unetr.inference.inversion import _crop_box_before_resampling, _voxel_map
from btcv_unetr.inference.predictor import Predictor

CHANGED = "MONAI changed an internal this project reads ({what}): adapt {where} to the new layout, then this test"


@pytest.fixture
def scan(tmp_path):
    """A 30 x 26 x 12 RAS scan at 2 x 2 x 3 mm: air (-1000 HU) around a body box at voxels [5:20, 4:18, 2:9]."""
    data = np.full((30, 26, 12), -1000.0, np.float32)
    data[5:20, 4:18, 2:9] = 40.0
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "scan.nii.gz")
    return tmp_path / "scan.nii.gz"


def test_applied_operations_name_each_step_and_record_the_resamplings_input_size(scan):
    config = tiny_config(data={"space_x": 4.0, "space_y": 4.0, "space_z": 6.0, "crop_before_resampling": True})
    image = infer_transforms(config)({"image": str(scan)})["image"]
    where = "inference/inversion.py _crop_box_before_resampling"
    operations = image.applied_operations
    assert isinstance(operations, list) and all(isinstance(op, dict) and "class" in op for op in operations), \
        CHANGED.format(what=f"applied_operations is no longer a list of dicts with 'class': {operations!r:.300}",
                       where=where)
    steps = [op["class"] for op in operations]
    assert steps == ["Orientation", "CropForeground", "SpatialResample"], \
        CHANGED.format(what=f"the spatial steps are recorded as {steps}", where=where)
    recorded = operations[steps.index("SpatialResample")].get("orig_size")
    assert recorded is not None and [int(n) for n in recorded] == [15, 14, 7], \
        CHANGED.format(what=f"SpatialResample's 'orig_size' is {recorded!r}, not the cropped box's size [15, 14, 7]",
                       where=where)
    for key, expected in (("original_affine", np.diag([2.0, 2.0, 3.0, 1.0])), ("spatial_shape", [30, 26, 12])):
        assert key in image.meta and np.allclose(np.asarray(image.meta[key]), expected), \
            CHANGED.format(what=f"meta[{key!r}] is {image.meta.get(key)!r}, not the scan's", where=where)
    box = _crop_box_before_resampling(image, _voxel_map(image), [30, 26, 12])
    assert box == [(5, 20), (4, 18), (2, 9)], \
        CHANGED.format(what=f"the crop box read back is {box}, not the body's [5:20, 4:18, 2:9]", where=where)


@pytest.mark.parametrize("size, overlap", [((40, 33, 32), 0.5), ((70, 20, 45), 0.25), ((32, 32, 32), 0.5)])
def test_window_count_is_the_number_of_windows_sliding_window_inference_runs(size, overlap):
    """An image smaller than the ROI along an axis is padded to it, as window_count assumes."""
    config = tiny_config(infer={"infer_overlap": overlap})
    roi = config.model.roi_size
    calls = []

    def network(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return windows

    image = torch.zeros(1, 1, *size)
    sliding_window_inference(image, roi, 1, network, overlap=overlap, mode="constant")
    counted = Predictor.window_count(SimpleNamespace(config=config, models=[None], member_models=[config.model]),
                                     image[0])
    assert counted == sum(calls), CHANGED.format(
        what=f"_get_scan_interval/windows_per_pass count {counted} windows for {size} (ROI {roi}, overlap "
             f"{overlap}) where sliding_window_inference runs {sum(calls)}",
        where="inference/predictor.py Predictor.window_count")
