"""The 2D mode (``spatial_dims: 2``): pictures in, the same training loop, masks in each picture's own size."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import list_data_collate
from monai.losses import DiceCELoss

from btcv_unetr import cli
from btcv_unetr.config.load import CONFIG_DIR, build_config, read_yaml
from btcv_unetr.config.validation import ConfigError, parse_label_map
from btcv_unetr.data.checks import Expected, check_data
from btcv_unetr.data.datalist import load_config_split
from btcv_unetr.data.transforms import train_transforms, val_transforms
from btcv_unetr.distributed import Context
from btcv_unetr.inference.evaluate import map_values
from btcv_unetr.model.build import build_model
from btcv_unetr.runtime.precision import Precision
from btcv_unetr.train import loop as train
from btcv_unetr.train.optim import build_optimizer

CLASSES = {"0": "background", "1": "animal", "2": "boundary"}


def _scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture (rows, columns, 3) of a disc with a dark rim on noise, and its trimap mask."""
    rows, columns = np.mgrid[:height, :width]
    cy, cx, radius = rng.uniform(22, height - 22), rng.uniform(22, width - 22), rng.uniform(10, 16)
    distance = np.hypot(rows - cy, columns - cx)
    mask = np.where(distance < radius - 2, 1, np.where(distance < radius + 1, 2, 0)).astype(np.uint8)
    picture = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
    picture[mask == 1] = (210, 130, 40)
    picture[mask == 2] = (80, 50, 20)
    return picture, mask


def _write_png(array: np.ndarray, path, rgb: bool) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=rgb), str(path))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Eight pictures of different sizes (6 training, 2 validation) with masks and a datalist with class names."""
    root = tmp_path_factory.mktemp("pictures")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for index in range(8):
        picture, mask = _scene(rng, 64 + 8 * (index % 2), 72 + 8 * (index % 3))
        _write_png(picture, root / f"images/p{index}.png", rgb=True)
        _write_png(mask, root / f"masks/p{index}.png", rgb=False)
        entries.append({"image": f"images/p{index}.png", "label": f"masks/p{index}.png"})
    datalist = {"training": entries[:6], "validation": entries[6:], "labels": CLASSES}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def _config(root, **sections):
    return build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml"),
                         {"data": {"data_dir": str(root), "json_list": "dataset.json"}}, sections])


def test_transforms_give_roi_sized_pictures_and_masks(pictures):
    config = _config(pictures)
    entry = load_config_split(config.data, "training")[0]
    sample = train_transforms(config)(entry)
    assert tuple(sample["image"].shape) == (3, 64, 64) and tuple(sample["label"].shape) == (1, 64, 64)
    assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0, 2.0}  # nearest: no blended class values
    validation = val_transforms(config)(load_config_split(config.data, "validation")[0])
    assert tuple(validation["image"].shape) == (3, 64, 64)
    # ImageNet normalisation: the noise background (0-90 of 255) lies below the channel means.
    assert float(validation["image"][0][validation["label"][0] == 0].mean()) < 0


def test_a_few_2d_steps_lower_the_loss_on_a_fixed_batch(pictures):
    config = _config(pictures)
    torch.manual_seed(0)
    entries = load_config_split(config.data, "training")[:4]
    batch = list_data_collate([train_transforms(config)(entry) for entry in entries])
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)
    context = Context(0, 1, 0, torch.device("cpu"))
    losses = [train.train_one_epoch(model, [batch], loss_fn, optimizer, Precision("fp32", "test"), context, 0, None,
                                    0)[0] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05


def test_training_then_inference_writes_masks_in_each_pictures_size(pictures, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--config", "tiny2d.yaml", "--data_dir", str(pictures), "--json_list", "dataset.json"]
    assert cli.main(["train", *argv, "--logdir", str(run), "--max_epochs", "2", "--noamp"]) == 0
    table = capsys.readouterr().out.split("the validation cases at the last validation:\n")[1].splitlines()
    assert table[0].split() == ["class", "Dice", "IoU"] and [line.split()[0] for line in table[1:3]] == \
        ["animal", "boundary"]
    assert table[4].startswith("mean IoU") and table[5].startswith("pixel accuracy")
    header = next(csv.reader((run / "metrics.csv").open()))
    assert header[-2:] == ["animal", "boundary"]  # the datalist's class names
    out = tmp_path / "masks"
    assert cli.main(["infer", "--data_dir", str(pictures), "--json_list", "dataset.json", "--pretrained_dir", str(run),
                     "--pretrained_model_name", "model_final.pt", "--output_dir", str(out), "--no_hd95",
                     "--tta"]) == 0
    for index in (6, 7):
        picture = sitk.ReadImage(str(pictures / f"images/p{index}.png"))
        mask = sitk.ReadImage(str(out / f"p{index}_seg.png"))
        assert mask.GetSize() == picture.GetSize() and mask.GetNumberOfComponentsPerPixel() == 1
        assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2}
        overlay = sitk.ReadImage(str(out / f"p{index}_overlay.png"))
        assert overlay.GetSize() == picture.GetSize() and overlay.GetNumberOfComponentsPerPixel() == 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["organs"]) == {"animal", "boundary"} and summary["cases"] == 2


def test_check_data_names_each_mismatch_in_one_line(pictures, tmp_path):
    rng = np.random.default_rng(1)
    picture, mask = _scene(rng, 64, 64)
    _write_png(picture[..., 0], tmp_path / "gray.png", rgb=False)
    _write_png(picture, tmp_path / "rgb_mask.png", rgb=True)
    _write_png(mask, tmp_path / "mask.png", rgb=False)
    _write_png(picture, tmp_path / "rgb.png", rgb=True)
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 8), np.int16), np.eye(4)), tmp_path / "volume.nii.gz")
    entries = [{"image": "gray.png", "label": "mask.png"}, {"image": "rgb.png", "label": "rgb_mask.png"},
               {"image": "volume.nii.gz", "label": "mask.png"}]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}))
    problems = [str(p) for p in check_data(str(tmp_path), "list.json", 3, expected=Expected(2, 3))[0]]
    assert problems == [
        f"{tmp_path}/gray.png: 1 colour channel(s); the model takes 3 (in_channels 3): convert the picture or set "
        "--in_channels",
        f"{tmp_path}/rgb_mask.png: 3 colour channel(s); a mask must be single-channel class indices",
        f"{tmp_path}/volume.nii.gz: image has 3 spatial dimensions (shape (64, 64, 8)): a 2D model (spatial_dims 2) "
        "takes pictures",
        f"{tmp_path}/mask.png: label shape (64, 64) differs from image shape (64, 64, 8) ({tmp_path}/volume.nii.gz)",
    ]


def test_label_map_turns_stored_values_into_classes_and_refuses_others(tmp_path):
    """The Oxford pets trimap stores 1 pet, 2 background, 3 border."""
    mapping = parse_label_map("1:1,2:0,3:2")
    assert mapping == {1: 1, 2: 0, 3: 2}
    stored = np.array([[1, 2], [3, 2]], np.uint8)
    assert map_values(stored, mapping).tolist() == [[1, 0], [2, 0]]
    with pytest.raises(ConfigError, match="'label_map'"):
        parse_label_map("pet=1")
    rng = np.random.default_rng(2)
    picture, mask = _scene(rng, 64, 64)
    _write_png(picture, tmp_path / "p.png", rgb=True)
    _write_png((mask + 1).astype(np.uint8), tmp_path / "m.png", rgb=False)  # stored 1, 2, 3
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "p.png", "label": "m.png"}]}))
    assert check_data(str(tmp_path), "list.json", 3, expected=Expected(2, 3, {1: 0, 2: 1, 3: 2}))[0] == []
    problems = check_data(str(tmp_path), "list.json", 3, expected=Expected(2, 3, {1: 0, 2: 1}))[0]
    assert [str(p) for p in problems] == [f"{tmp_path}/m.png: mask values 3 are not in --label_map"]


def test_a_picture_given_to_the_3d_model_is_one_line(tmp_path, capsys):
    picture, _ = _scene(np.random.default_rng(3), 64, 64)
    _write_png(picture, tmp_path / "p.png", rgb=True)
    model = build_model(build_config([read_yaml(CONFIG_DIR / "tiny.yaml")]).model)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    code = cli.main(["infer", "--config", "tiny.yaml", "--input", str(tmp_path / "p.png"), "--pretrained_dir",
                     str(tmp_path), "--pretrained_model_name", "w.pth", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    # The colour channels are not a third axis.
    assert f"{tmp_path}/p.png: image is 2D with shape (64, 64, 3), expected a 3D volume" in err
    assert not list((tmp_path / "out").glob("*_seg*"))


def test_2d_export_equals_the_eager_model(tmp_path):
    config = build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml")])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert cli.main(["export", "--config", "tiny2d.yaml", "--checkpoint", str(tmp_path / "w.pth"), "--out",
                     str(tmp_path / "unetr2d.pt")]) == 0
    scripted = torch.jit.load(str(tmp_path / "unetr2d.pt"))
    pictures = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert scripted(pictures).shape == (2, 3, 64, 64)
        torch.testing.assert_close(scripted(pictures), model(pictures), atol=1e-5, rtol=1e-4)


def test_2d_onnx_export_gives_the_eager_logits_for_any_batch(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    config = build_config([read_yaml(CONFIG_DIR / "tiny2d.yaml")])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "unetr2d.onnx"
    assert cli.main(["export", "--config", "tiny2d.yaml", "--checkpoint", str(tmp_path / "w.pth"), "--format", "onnx",
                     "--out", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pictures = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    (logits,) = session.run(None, {"image": pictures.numpy()})
    with torch.no_grad():
        expected = model(pictures).numpy()
    assert logits.shape == (3, 3, 64, 64) and np.allclose(logits, expected, atol=1e-4)


def test_iou_dice_and_pixel_accuracy_from_a_known_confusion():
    """4 x 4 pixels: class 1 has 4 true pixels, 2 found and 2 false alarms; class 2 has 2, both found."""
    from btcv_unetr.inference.evaluate import case_metrics, summarise
    label = np.zeros((4, 4), np.int16)
    prediction = np.zeros((4, 4), np.int16)
    label[0, :4] = 1
    prediction[0, :2] = 1
    prediction[1, :2] = 1
    label[3, :2] = prediction[3, :2] = 2
    result = case_metrics("c", prediction, label, (1.0, 1.0), 3, distances=False)
    assert result.dice == pytest.approx([2 * 2 / (4 + 4), 1.0])
    assert result.iou == pytest.approx([2 / 6, 1.0])
    assert result.accuracy == pytest.approx(12 / 16)  # 2 missed + 2 false alarms of 16 pixels
    summary = summarise([result], 3, ["animal", "boundary"])
    assert summary["mean_iou"] == pytest.approx((1 / 3 + 1) / 2) and summary["accuracy"] == pytest.approx(0.75)


def test_evaluate_scores_folders_of_png_masks_with_a_label_map(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "label").mkdir()
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    _write_png(truth, tmp_path / "pred/a_seg.png", rgb=False)
    _write_png(np.where(truth == 1, 1, 2).astype(np.uint8), tmp_path / "label/a.png", rgb=False)  # pets: 2 background
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                     "--out_channels", "2", "--label_map", "1:1,2:0", "--no_hd95"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["class", "1", "1.0000", "1.0000"] and lines[-1].split()[:3] == ["pixel", "accuracy", "1.0000"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two synthetic faces of 64 x 64 (btcv-unetr shapes2d --kind face), whose datalist lists the mirror pairs."""
    from btcv_unetr.synthetic.shapes2d import write_dataset
    root = tmp_path_factory.mktemp("faces")
    write_dataset(root, cases=2, seed=3, size=64, kind="face", progress=False)
    return root


def _face_sample(faces, hflip_prob: float) -> torch.Tensor:
    """The first training face's label after the train transforms, with only the flip left random."""
    config = _config(faces, model={"out_channels": 11},
                     data={"hflip_prob": hflip_prob, "rotate_degrees": 0.0, "min_crop_scale": 1.0,
                           "color_jitter": 0.0, "hue_jitter": 0.0})
    return train_transforms(config)(load_config_split(config.data, "training")[0])["label"][0]


def test_a_flipped_face_keeps_the_left_eye_and_brow_on_the_viewers_left(faces):
    """--hflip_prob on faces: the flip swaps the datalist's mirror_pairs (shapes2d.FACE_MIRROR_PAIRS), so the
    class called "left eye" is still the eye on the picture's left (smaller x), never the mirrored right eye."""
    from btcv_unetr.synthetic.shapes2d import FACE_CLASSES, FACE_MIRROR_PAIRS
    datalist = json.loads((faces / "dataset.json").read_text())
    assert datalist["mirror_pairs"] == [list(pair) for pair in FACE_MIRROR_PAIRS] == [[2, 3], [4, 5]]
    kept, flipped = _face_sample(faces, 0.0), _face_sample(faces, 1.0)
    swapped = kept.flip(0).clone()  # axis 0 is x (columns)
    for left, right in FACE_MIRROR_PAIRS:
        swapped[kept.flip(0) == left], swapped[kept.flip(0) == right] = right, left
    assert torch.equal(flipped, swapped) and not torch.equal(flipped, kept.flip(0))
    for left, right in FACE_MIRROR_PAIRS:
        assert FACE_CLASSES[left].startswith("left") and FACE_CLASSES[right].startswith("right")
        x_of = lambda label, value: float(torch.nonzero(label == value)[:, 0].float().mean())  # noqa: E731
        assert x_of(flipped, left) < x_of(flipped, right) and x_of(kept, left) < x_of(kept, right)


def test_a_datalists_mirror_pairs_must_be_pairs_of_classes(tmp_path):
    from btcv_unetr.data.datalist import read_datalist
    from btcv_unetr.errors import UserError
    for pairs in ([[2, 3, 4]], [[2, 2]], [[0, 1]], "2:3", [["2", "3"]]):
        (tmp_path / "d.json").write_text(json.dumps({"training": [], "mirror_pairs": pairs}))
        with pytest.raises(UserError, match=r"'mirror_pairs' must be a list of \[left, right\] pairs"):
            read_datalist(tmp_path / "d.json")
