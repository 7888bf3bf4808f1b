"""inference/sliding_window.py's window count and bound (issue 22): the count is MONAI's (dense_patch_slices lists
the same windows), the bound refuses an overlap that multiplies the windows and names the largest that fits."""

from __future__ import annotations

import pytest
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from btcv_unetr.inference.sliding_window import largest_fitting_overlap, window_bound_problem, windows_per_pass


@pytest.mark.parametrize("shape, roi", [((96, 40, 32), (32, 32, 32)), ((20, 33, 100), (16, 32, 48)),
                                        ((96, 96, 96), (96, 96, 96)), ((200, 130), (64, 64))])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.625, 0.9, 0.99])
def test_the_count_is_the_number_of_windows_monai_lists(shape, roi, overlap):
    size = tuple(max(n, r) for n, r in zip(shape, roi))
    listed = dense_patch_slices(size, roi, _get_scan_interval(size, roi, len(roi), (overlap,) * len(roi)))
    assert windows_per_pass(shape, roi, overlap) == len(listed)


def test_a_one_voxel_stride_is_counted_without_listing_it():
    # 512 x 512 x 300 at ROI 96 and overlap 0.99: 417 * 417 * 205 windows, far too many to list.
    assert windows_per_pass((512, 512, 300), (96, 96, 96), 0.99) == 417 * 417 * 205


def test_an_overlap_within_the_bound_passes_and_factor_0_is_no_bound():
    assert window_bound_problem((96, 40, 32), (32, 32, 32), 0.75, 8.0) is None  # 18 windows, 1.8 times 10
    assert window_bound_problem((96, 40, 32), (32, 32, 32), 0.99, 0.0) is None
    assert window_bound_problem((20, 20, 20), (32, 32, 32), 0.99, 8.0) is None  # one window at any overlap


def test_the_refusal_names_the_counts_and_the_largest_overlap_that_fits():
    # 96 x 40 x 32, ROI 32: 10 windows at 0.5; 0.87 (interval 4) gives 17 * 3 = 51, 0.88 (interval 3) 23 * 4 = 92.
    assert windows_per_pass((96, 40, 32), (32, 32, 32), 0.87) == 51
    assert windows_per_pass((96, 40, 32), (32, 32, 32), 0.88) == 92
    assert largest_fitting_overlap((96, 40, 32), (32, 32, 32), 80, below=0.99) == 0.87
    assert window_bound_problem((96, 40, 32), (32, 32, 32), 0.99, 8.0, passes=4) == (
        "--infer_overlap 0.99 plans 2,340 windows (585 per pass, 4 passes), 58.5 times the 10 of overlap 0.5, over "
        "--max_windows_factor 8: use --infer_overlap 0.87 or less, or raise --max_windows_factor (0: no bound)")


def test_a_large_scan_at_a_one_voxel_stride_is_refused_with_the_ratio():
    # 141^3 at ROI 96: 8 windows at overlap 0.5, 46^3 = 97,336 at 0.99 (a 1-voxel stride).
    problem = window_bound_problem((141, 141, 141), (96, 96, 96), 0.99, 8.0)
    assert problem.startswith("--infer_overlap 0.99 plans 97,336 windows, 12,167 times the 8 of overlap 0.5, over "
                              "--max_windows_factor 8: use --infer_overlap ")
