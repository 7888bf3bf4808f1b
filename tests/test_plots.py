import numpy as np
import pytest

from btcv_unetr.inference.plots import class_colours, legend_entries, save_overlay, to_display_order

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


def _legend_of(monkeypatch, tmp_path, labels, names=None) -> list[tuple[str, tuple]]:
    """(text, RGB) of each legend entry save_overlay draws for ``labels``."""
    from matplotlib.figure import Figure
    drawn = []
    original = Figure.legend

    def recording_legend(self, *args, handles=(), **kwargs):
        drawn.extend((handle.get_label(), tuple(round(c, 4) for c in handle.get_facecolor()[:3])) for handle in handles)
        return original(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(Figure, "legend", recording_legend)
    image = np.full(labels.shape, -100.0, np.float32)
    assert save_overlay(image, labels, (1.0, 1.0, 2.5), tmp_path / "c_overlay.png", title="c", names=names)
    return drawn


def _three_classes() -> np.ndarray:
    labels = np.zeros((40, 30, 20), np.uint8)
    labels[10:20, 10:20, 5:15] = 2
    labels[25:30, 5:10, 8:12] = 1
    labels[30:35, 20:25, 2:6] = 15  # beyond BTCV's 14 classes
    return labels


def test_legend_names_the_classes_of_the_dataset_at_hand(monkeypatch, tmp_path):
    names = [f"part {i}" for i in range(1, 16)]  # a datalist's labels 1..15 (not BTCV's organs)
    drawn = _legend_of(monkeypatch, tmp_path, _three_classes(), names)
    assert [text for text, _ in drawn] == ["part 1", "part 2", "part 15"]
    colours = class_colours(16) / 255.0
    assert [colour for _, colour in drawn] == [tuple(round(c, 4) for c in colours[v]) for v in (1, 2, 15)]


def test_legend_numbers_classes_without_names_never_btcv_organs(monkeypatch, tmp_path):
    drawn = _legend_of(monkeypatch, tmp_path, _three_classes())
    assert [text for text, _ in drawn] == ["class 1", "class 2", "class 15"]
    assert legend_entries(_three_classes(), ["liver", "tail"]) == [(1, "liver"), (2, "tail"), (15, "class 15")]
    assert legend_entries(np.zeros((4, 4, 4), np.uint8)) == []


def test_case_overlay_draws_a_volume_file_in_display_order_with_its_legend(monkeypatch, tmp_path):
    """save_case_overlay (batch inference's and the service's one path): an LPS-stored scan is drawn in RAS
    order with the spacing of its header, the title and the names passed on."""
    import nibabel as nib

    from btcv_unetr.inference import plots
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(image, np.diag([-0.7, -0.8, 3.0, 1.0])), tmp_path / "scan.nii.gz")
    drawn = {}
    monkeypatch.setattr(plots, "save_overlay", lambda *args, **kwargs: drawn.update(args=args, kwargs=kwargs) or True)
    assert plots.save_case_overlay(tmp_path / "scan.nii.gz", labels, tmp_path / "o.png", title="scan", names=["a", "b"])
    shown, mask, spacing, path = drawn["args"]
    assert np.array_equal(shown, image[::-1, ::-1, :]) and mask[-1, -1, 0] == 2 and mask.sum() == 2
    assert spacing == pytest.approx([0.7, 0.8, 3.0]) and path == tmp_path / "o.png"
    assert drawn["kwargs"] == {"title": "scan", "names": ["a", "b"]}


def test_case_overlay_blends_a_pictures_mask_in_its_class_colours(tmp_path):
    import SimpleITK as sitk

    from btcv_unetr.data.images import read_volume
    from btcv_unetr.inference.plots import save_case_overlay
    picture = np.full((6, 4, 3), 100, np.uint8)  # (X, Y, RGB)
    labels = np.zeros((6, 4), np.uint8)
    labels[1, 2] = 1
    sitk.WriteImage(sitk.GetImageFromArray(picture.transpose(1, 0, 2), isVector=True), str(tmp_path / "p.png"))
    assert save_case_overlay(read_volume(tmp_path / "p.png"), labels, tmp_path / "o.png")
    drawn = np.asarray(read_volume(tmp_path / "o.png").data)
    assert drawn.shape == (6, 4, 3) and (drawn[0, 0] == 100).all()  # unlabelled pixels unchanged
    assert drawn[1, 2].tolist() == [round(0.5 * 100 + 0.5 * c) for c in class_colours(2)[1]]
