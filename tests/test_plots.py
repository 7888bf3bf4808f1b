import numpy as np
import pytest

from btcv_unetr.inference.plots import save_overlay, to_display_order

matplotlib = pytest.importorskip("matplotlib")  # an install extra ('plot'); the test extra includes it


def test_display_order_is_ras_whatever_the_file_order():
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    lps_affine = np.diag([-0.7, -0.8, 3.0, 1.0])
    ras_image, ras_labels, spacing = to_display_order(image, image.astype(np.uint8), lps_affine)
    assert np.array_equal(ras_image, image[::-1, ::-1, :]) and np.array_equal(ras_labels, ras_image)
    assert spacing == pytest.approx([0.7, 0.8, 3.0])


def test_overlay_is_a_png_with_the_organs(tmp_path):
    image = np.full((40, 30, 20), -100.0, np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 10:20, 5:15] = 6
    labels[25:30, 5:10, 8:12] = 1
    assert save_overlay(image, labels, (1.0, 1.0, 2.5), tmp_path / "c_overlay.png", title="c")
    data = (tmp_path / "c_overlay.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob(".*tmp*"))
