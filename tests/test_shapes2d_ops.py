"""shapes2d's morphology and blur (scipy.ndimage): the footprints, the border rule and the blur kernel, worked out by
hand."""

from __future__ import annotations

import numpy as np
import pytest

from btcv_unetr.synthetic.shapes2d import _blur, _dilate, _erode

# A pixel grown by one cross step, then one square step: the 5 x 5 square without its corners.
RADIUS_2 = np.array([[0, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [0, 1, 1, 1, 0]], bool)


def _point(size: int = 9) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[size // 2, size // 2] = True
    return mask


def test_dilation_grows_a_pixel_into_the_octagon_of_its_radius():
    assert np.array_equal(_dilate(_point(), 0), _point())
    cross = _dilate(_point(), 1)[3:6, 3:6]
    assert np.array_equal(cross, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)) and _dilate(_point(), 1).sum() == 5
    assert np.array_equal(_dilate(_point(), 2)[2:7, 2:7], RADIUS_2) and _dilate(_point(), 2).sum() == 21


def test_erosion_undoes_the_dilation_of_a_footprint_and_spares_the_pictures_border():
    assert np.array_equal(_erode(_dilate(_point(), 2), 2), _point())
    full = np.ones((6, 7), bool)
    assert _erode(full, 2).all()  # beyond the picture counts as inside: the border is no outline
    band = np.zeros((6, 7), bool)
    band[:, :3] = True  # touches the left border: eroded only from its right edge
    assert np.array_equal(_erode(band, 1), np.pad(np.ones((6, 2), bool), ((0, 0), (0, 5))))


@pytest.mark.parametrize("channels", [(), (3,)])
def test_the_blur_is_the_binomial_3x3_kernel_with_the_edge_repeated(channels):
    image = np.zeros((5, 6, *channels), np.float32)
    image[2, 3] = 16.0
    blurred = _blur(image)
    expected = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32)
    assert blurred.dtype == np.float32 and blurred.shape == image.shape
    assert np.allclose(blurred[1:4, 2:5].reshape(3, 3, -1), expected[..., None])
    assert np.isclose(blurred.sum(), 16.0 * np.prod(channels or 1))  # nothing lost or added
    assert np.allclose(_blur(np.full((4, 4, *channels), 7.0, np.float32)), 7.0)  # no dark rim at the border
