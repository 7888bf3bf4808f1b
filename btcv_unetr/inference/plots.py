"""``CASE_overlay.png``: axial, coronal and sagittal slices with the mask in fixed class colours, and a legend that
names the classes of the model at hand (its datalist's labels), or numbers them when no names are known.

Needs matplotlib (``pip install 'btcv-unetr[plot]'``); without it the picture is skipped with a
note, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.images import Volume, picture_scale, read_volume, voxel_spacing
from ..files import atomic_write

# One fixed colour per organ (RGB 0-255), so pictures of different cases compare at a glance.
ORGAN_COLOURS = (
    (0, 0, 0), (220, 20, 60), (255, 140, 0), (255, 215, 0), (50, 205, 50), (0, 206, 209), (30, 144, 255),
    (138, 43, 226), (255, 0, 255), (255, 105, 180), (139, 69, 19), (0, 128, 128), (173, 255, 47), (240, 128, 128),
)
_warned = False


def _slices(labels: np.ndarray, count: int = 3) -> list[list[int]]:
    """Per axis, ``count`` slice indices through the labelled region (the middle of the volume if none)."""
    positions = []
    for axis in range(3):
        profile = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        filled = np.nonzero(profile)[0]
        lo, hi = (filled[0], filled[-1]) if filled.size else (0, labels.shape[axis] - 1)
        positions.append([int(round(lo + (hi - lo) * (i + 1) / (count + 1))) for i in range(count)])
    return positions


def to_display_order(image: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Both arrays in RAS voxel order (whatever the file's order) and the matching spacing in mm."""
    from nibabel.orientations import apply_orientation, io_orientation
    ornt = io_orientation(affine)
    spacing = np.array(voxel_spacing(affine))[ornt[:, 0].astype(int).argsort()]
    return apply_orientation(image, ornt), apply_orientation(labels, ornt), [float(s) for s in spacing]


def legend_entries(labels: np.ndarray, names: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """``(class, name)`` of every class but background present in ``labels``, in class order.

    ``names`` are the names of classes 1..N-1 (:func:`btcv_unetr.data.datalist.class_names`: the datalist's
    ``labels``, or its fallback); a class without one is called by its number, never by a BTCV organ's name:
    the mask may come from any dataset.
    """
    present = sorted(int(value) for value in np.unique(labels) if value > 0)
    return [(value, str(names[value - 1]) if names is not None and value <= len(names) else f"class {value}")
            for value in present]


def save_overlay(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], path: Path,
                 title: str = "", window: tuple[float, float] = (-175.0, 250.0),
                 names: Sequence[str] | None = None) -> bool:
    """Write the picture; returns False (and says so once) when matplotlib is missing.

    Args:
        image: CT in HU, ``(X, Y, Z)`` in RAS voxel order (see :func:`to_display_order`).
        labels: integer mask of the same shape.
        spacing: voxel size in mm, for the aspect ratio of coronal and sagittal views.
        names: the legend's names of classes 1..N-1 (see :func:`legend_entries`); None: class numbers.

    Axial and coronal views are shown as radiologists read them: the patient's right on the left.
    """
    global _warned
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:
        if not _warned:
            print("note: overlays skipped, matplotlib is not installed (pip install 'btcv-unetr[plot]')")
            _warned = True
        return False
    # The organ colours, repeated beyond them (class_colours), so that a class above 13 is drawn in its legend's colour.
    table = class_colours(max(len(ORGAN_COLOURS), int(labels.max()) + 1))
    colours = ListedColormap(table / 255.0)
    figure, axes = plt.subplots(3, 3, figsize=(10, 10), facecolor="black")
    views = ("axial", "coronal", "sagittal")
    for row, (axis, indices) in enumerate(zip((2, 1, 0), _slices(labels)[::-1])):
        others = [a for a in range(3) if a != axis]
        aspect = spacing[others[1]] / spacing[others[0]]
        for col, index in enumerate(indices):
            picture = np.take(image, index, axis=axis).T
            mask = np.take(labels, index, axis=axis).T
            if axis != 0:  # x is on screen: put the patient's right on the left
                picture, mask = picture[:, ::-1], mask[:, ::-1]
            ax = axes[row, col]
            ax.imshow(picture, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
            ax.imshow(np.ma.masked_equal(mask, 0), cmap=colours, vmin=0, vmax=len(table) - 1,
                      alpha=0.45, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{views[row]} {index}", color="white", fontsize=9)
            ax.axis("off")
    handles = [Patch(color=table[value] / 255.0, label=name) for value, name in legend_entries(labels, names)]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False, labelcolor="white")
    figure.suptitle(title, color="white")
    figure.tight_layout(rect=(0, 0.07, 1, 0.97))
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80, facecolor="black"))
    plt.close(figure)
    return True


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours: the organ colours, repeated beyond them."""
    return np.array([ORGAN_COLOURS[i % len(ORGAN_COLOURS)] if i else (0, 0, 0) for i in range(num_classes)],
                    dtype=np.uint8)


def save_case_overlay(scan: str | Path | Volume, labels: np.ndarray, path: Path, title: str = "",
                      names: Sequence[str] | None = None) -> bool:
    """``CASE_overlay.png`` of one case, the one way batch inference and the service draw it.

    Args:
        scan: the case's input (a file, or the :class:`~btcv_unetr.data.images.Volume` read from it).
        labels: its mask on the scan's own grid: ``(X, Y)`` for a picture, ``(X, Y, Z)`` for a volume.
        path: the PNG to write (atomically).
        title, names: a volume's title and legend names of classes 1..N-1 (see :func:`save_overlay`); a picture
            is drawn without either.

    A picture gets its mask blended in (:func:`save_picture_overlay`); a volume three slices per view in display
    order (:func:`to_display_order`, :func:`save_overlay`). Returns False when matplotlib is missing (volumes
    only; said once).
    """
    volume = scan if isinstance(scan, Volume) else read_volume(scan)
    if labels.ndim == 2:
        save_picture_overlay(np.asarray(volume.data), labels, path)
        return True
    image, mask, spacing = to_display_order(np.asarray(volume.data).reshape(volume.shape[:3]),
                                            labels.reshape(volume.shape[:3]), np.asarray(volume.affine))
    return save_overlay(image, mask, spacing, path, title=title, names=names)


def save_picture_overlay(picture: np.ndarray, labels: np.ndarray, path: Path, opacity: float = 0.5) -> None:
    """A 2D picture with its mask blended in the class colours, as a PNG (SimpleITK: no matplotlib needed).

    Args:
        picture: ``(X, Y)`` grayscale or ``(X, Y, 3)`` RGB as read, 8- or 16-bit (X: columns, Y: rows).
        labels: ``(X, Y)`` class indices.
    """
    import SimpleITK as sitk
    rgb = np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture[..., :3]
    rgb = rgb.astype(np.float32) * np.float32(255.0 / picture_scale(picture.dtype))  # 16-bit to 0..255 too
    colours = class_colours(int(labels.max()) + 1).astype(np.float32)
    blended = np.where((labels > 0)[..., None], (1 - opacity) * rgb + opacity * colours[labels], rgb)
    image = sitk.GetImageFromArray(np.clip(blended, 0, 255).astype(np.uint8).transpose(1, 0, 2), isVector=True)
    atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp)))
