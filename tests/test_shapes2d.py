"""The synthetic 2D scenes (``btcv-unetr shapes2d``): pet trimaps and face parts, PNG files and datalist."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from btcv_unetr import cli
from btcv_unetr.data.checks import Expected, check_data
from btcv_unetr.synthetic.shapes2d import FACE_CLASSES, FACE_MIRROR_PAIRS, PET_CLASSES, generate_scene, write_dataset


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation by ``radius`` px, zero beyond the border."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _read_png(path) -> tuple[np.ndarray, int]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetNumberOfComponentsPerPixel()


@pytest.mark.parametrize("kind", ["pet", "face"])
def test_same_seed_and_index_give_the_same_scene(kind):
    picture, mask = generate_scene(4, 2, 64, kind)
    again_picture, again_mask = generate_scene(4, 2, 64, kind)
    assert np.array_equal(picture, again_picture) and np.array_equal(mask, again_mask)
    for seed, index in ((4, 3), (5, 2)):
        other_picture, other_mask = generate_scene(seed, index, 64, kind)
        assert not np.array_equal(other_picture, picture) and not np.array_equal(other_mask, mask)


@pytest.mark.parametrize("kind, classes", [("pet", PET_CLASSES), ("face", FACE_CLASSES)])
@pytest.mark.parametrize("size", [16, 96])
def test_dtypes_shapes_and_class_range(kind, classes, size):
    picture, mask = generate_scene(0, 1, size, kind)
    assert picture.shape == (size, size, 3) and picture.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert mask.max() < len(classes)
    assert picture.std() > 10  # a picture, not a flat fill


def _pet_classes() -> tuple[int, int, int]:
    """The indices of background, animal and boundary, looked up by name (the tests below check that
    the pixels of each index behave as its name says)."""
    return tuple(PET_CLASSES.index(name) for name in ("background", "animal", "boundary"))


def test_pet_trimaps_hold_all_three_classes_and_an_animal_of_plausible_size():
    background, animal_class, boundary = _pet_classes()
    for index in range(6):
        _, mask = generate_scene(1, index, 128, "pet")
        assert set(np.unique(mask)) == set(range(len(PET_CLASSES)))
        assert (mask == background).mean() > 0.5  # the animal stands in front of a larger background
        animal = np.isin(mask, (animal_class, boundary)).mean()
        assert 0.02 < animal < 0.5, (index, animal)


def test_pet_boundary_is_a_thin_band_between_animal_and_background():
    for index in range(6):
        _, mask = generate_scene(2, index, 256, "pet")
        background, animal, boundary = (mask == k for k in _pet_classes())
        # The band separates the two: animal and background never touch.
        assert not np.any(_dilate(animal, 1) & background)
        # Band pixels lie within 4 px of both (all but the tips of tails and ears and slivers beside
        # an occluder, which are all band, as in the Oxford pets' trimaps).
        near_both = _dilate(background, 4)[boundary] & _dilate(animal, 4)[boundary]
        assert near_both.mean() > 0.9, (index, near_both.mean())
        # Hardly any 5 x 5 block is all band: it is at most 4 px wide.
        blocks = ~_dilate(~boundary, 2) & boundary
        assert blocks.sum() < 0.03 * boundary.sum(), (index, blocks.sum(), boundary.sum())
        assert boundary.sum() < 0.5 * (animal.sum() + boundary.sum())


def _centres(mask: np.ndarray) -> dict[str, np.ndarray]:
    """(row, column) centre of each face class present in ``mask``, by class name."""
    return {name: np.argwhere(mask == k).mean(0) for k, name in enumerate(FACE_CLASSES) if np.any(mask == k)}


def test_face_parts_are_present_and_anatomically_ordered():
    """Each class index holds the part its name says: the names are checked against the pixels."""
    k = {name: FACE_CLASSES.index(name) for name in FACE_CLASSES}
    seen = set()
    for index in range(8):
        _, mask = generate_scene(3, index, 256, "face")
        present = set(np.unique(mask).tolist())
        assert set(range(len(FACE_CLASSES))) - {k["mouth interior"]} <= present, (index, present)
        seen |= present
        centre = _centres(mask)
        for part in ("brow", "eye"):  # left is the viewer's left
            assert centre[f"left {part}"][1] < centre[f"right {part}"][1], (index, part)
        rows = [centre[name][0] for name in ("left brow", "left eye", "nose", "upper lip", "lower lip")]
        assert rows == sorted(rows), (index, rows)
        assert np.argwhere(mask == k["hair"])[:, 0].min() < np.argwhere(mask == k["skin"])[:, 0].min()
        assert (mask == k["skin"]).sum() > max((mask == k[name]).sum() for name in ("nose", "left eye", "upper lip"))
    assert k["mouth interior"] in seen  # some mouths are open


def test_a_flip_with_the_mirror_pairs_swapped_is_again_a_face_of_the_same_order():
    """FACE_MIRROR_PAIRS pair each "left X" with its "right X": flipping a mask left to right and swapping
    the pairs gives a mask whose left parts are again on the viewer's left; without the swap they are not."""
    assert {(FACE_CLASSES[a], FACE_CLASSES[b]) for a, b in FACE_MIRROR_PAIRS} == \
        {(f"left {part}", f"right {part}") for part in ("brow", "eye")}
    _, mask = generate_scene(3, 0, 128, "face")
    flipped = mask[:, ::-1]
    swapped = flipped.copy()
    for a, b in FACE_MIRROR_PAIRS:
        swapped[flipped == a], swapped[flipped == b] = b, a
    for a, b in FACE_MIRROR_PAIRS:
        left, right = FACE_CLASSES[a], FACE_CLASSES[b]
        assert _centres(swapped)[left][1] < _centres(swapped)[right][1]
        assert _centres(flipped)[left][1] > _centres(flipped)[right][1]


@pytest.mark.parametrize("kind, classes", [("pet", PET_CLASSES), ("face", FACE_CLASSES)])
def test_written_pngs_read_back_equal_and_the_datalist_lists_them(tmp_path, kind, classes):
    path = write_dataset(tmp_path, cases=5, seed=3, size=48, kind=kind, progress=False)
    assert path == tmp_path / "dataset.json"
    datalist = json.loads(path.read_text())
    names = [f"case_{i:04d}.png" for i in range(5)]
    assert datalist["training"] == [{"image": f"images/{n}", "label": f"masks/{n}"} for n in names[:4]]
    assert datalist["validation"] == [{"image": "images/case_0004.png", "label": "masks/case_0004.png"}]
    assert datalist["labels"] == {str(i): name for i, name in enumerate(classes)}
    assert datalist["numTraining"] == 5 and datalist["name"] == f"shapes2d-{kind}" and datalist["description"]
    for index in (0, 4):
        picture, mask = generate_scene(3, index, 48, kind)
        stored_picture, picture_channels = _read_png(tmp_path / f"images/case_{index:04d}.png")
        stored_mask, mask_channels = _read_png(tmp_path / f"masks/case_{index:04d}.png")
        assert (picture_channels, mask_channels) == (3, 1)
        assert stored_picture.dtype == np.uint8 and np.array_equal(stored_picture, picture)
        assert stored_mask.dtype == np.uint8 and np.array_equal(stored_mask, mask)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind
    # The 2D pipeline's own check accepts the set: RGB pictures, single-channel masks, known classes.
    problems, counts = check_data(str(tmp_path), "dataset.json", len(classes), workers=1, expected=Expected(2, 3))
    assert problems == [] and counts["training"] == 4 and counts["validation"] == 1


@pytest.mark.parametrize("cases, fraction, sizes", [(2, 0.2, (1, 1)), (6, 0.5, (3, 3)), (10, 0.2, (8, 2)),
                                                    (3, 0.9, (1, 2))])
def test_validation_split_sizes(tmp_path, cases, fraction, sizes):
    path = write_dataset(tmp_path, cases=cases, seed=0, size=16, validation_fraction=fraction, progress=False)
    datalist = json.loads(path.read_text())
    assert (len(datalist["training"]), len(datalist["validation"])) == sizes


def test_bad_library_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        generate_scene(0, 0, 64, "cat")
    with pytest.raises(ValueError, match="cases"):
        write_dataset(tmp_path, cases=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        write_dataset(tmp_path, cases=4, seed=0, validation_fraction=1.0, progress=False)


def test_cli_writes_a_set_and_refuses_bad_sizes_in_one_line(tmp_path, capsys):
    out = tmp_path / "faces"
    assert cli.main(["shapes2d", "--out", str(out), "--cases", "3", "--seed", "1", "--size", "32",
                     "--kind", "face"]) == 0
    datalist = json.loads((out / "dataset.json").read_text())
    assert len(datalist["labels"]) == 11 and len(datalist["training"]) == 2
    assert _read_png(out / "images/case_0002.png")[0].shape == (32, 32, 3)
    capsys.readouterr()

    assert cli.main(["shapes2d", "--out", str(tmp_path / "bad"), "--cases", "3", "--seed", "1", "--size", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: shapes2d: --size 100 must be a multiple of 16")
    assert cli.main(["shapes2d", "--out", str(tmp_path / "bad"), "--cases", "1", "--seed", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: shapes2d: --cases 1 must be >= 2")
    assert not (tmp_path / "bad").exists()
