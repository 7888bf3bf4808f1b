import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from btcv_unetr.config.schema import TrainConfig
from btcv_unetr.train.loss import ClassWeightedDiceCELoss, build_loss, class_volumes, inverse_sqrt_volume_weights

CPU = torch.device("cpu")


def _label_file(path, counts: dict[int, int], zooms=(2.0, 2.0, 5.0)):
    """A label volume holding ``counts[c]`` voxels of class ``c`` (the rest background)."""
    flat = np.zeros(10 * 10 * 10, np.uint8)
    start = 0
    for label, count in counts.items():
        flat[start:start + count] = label
        start += count
    image = nib.Nifti1Image(flat.reshape(10, 10, 10), np.diag([*zooms, 1.0]))
    nib.save(image, path)
    return str(path)


def test_class_volumes_are_mean_millilitres_per_case(tmp_path):
    a = _label_file(tmp_path / "a.nii.gz", {1: 100, 2: 10})
    b = _label_file(tmp_path / "b.nii.gz", {1: 300}, zooms=(1.0, 1.0, 1.0))
    volumes = class_volumes([a, b], num_classes=4)
    # a: 20 uL voxels -> class 1 2.0 mL, class 2 0.2 mL; b: 1 uL voxels -> class 1 0.3 mL
    np.testing.assert_allclose(volumes, [(890 * 0.02 + 700 * 0.001) / 2, (2.0 + 0.3) / 2, 0.1, 0.0])


def test_inverse_sqrt_volume_weights():
    volumes = np.array([5000.0, 100.0, 400.0, 25.0, 1.0, 0.0])
    weights = inverse_sqrt_volume_weights(volumes)
    # median organ volume (present organs): 62.5 mL
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0, np.sqrt(62.5 / 25.0), 5.0, 5.0])


def test_weighted_loss_with_unit_weights_is_monai_dice_ce():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 6, 6, 6), torch.randint(0, 5, (2, 1, 6, 6, 6)).float()
    reference = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    weighted = ClassWeightedDiceCELoss(torch.ones(5), smooth_nr=0.0, smooth_dr=1e-6)
    torch.testing.assert_close(weighted(logits, target), reference(logits, target))


def test_weights_scale_the_dice_term_only(tmp_path):
    torch.manual_seed(0)
    logits, target = torch.randn(1, 3, 6, 6, 6), torch.randint(0, 3, (1, 1, 6, 6, 6)).float()
    weights = torch.tensor([1.0, 2.0, 4.0])
    loss = ClassWeightedDiceCELoss(weights, smooth_nr=0.0, smooth_dr=1e-6)(logits, target)
    dice = DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6,
                    reduction="none")(logits, target).flatten()
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    torch.testing.assert_close(loss, (dice * weights).mean() + ce)


def test_build_loss_reads_the_labels_only_when_weighted(tmp_path):
    loss, weights = build_loss(TrainConfig(), 14, [str(tmp_path / "missing.nii.gz")], CPU)
    assert isinstance(loss, DiceCELoss) and weights is None
    labels = [_label_file(tmp_path / "a.nii.gz", {1: 400, 2: 100, 3: 4})]
    loss, weights = build_loss(TrainConfig(class_weights="inverse_sqrt_volume"), 4, labels, CPU)
    assert isinstance(loss, ClassWeightedDiceCELoss)
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0, 5.0])
    torch.testing.assert_close(loss.dice.class_weight, torch.tensor([1.0, 1.0, 1.0, 5.0]))


def test_unknown_weighting_is_refused_with_the_choices():
    from btcv_unetr.config.load import build_config
    from btcv_unetr.config.validation import ConfigError
    with pytest.raises(ConfigError, match="'class_weights': 'inverse' is not one of none, inverse_sqrt_volume"):
        build_config([{"train": {"class_weights": "inverse"}}])


def _four_voxels(shape):
    """Two classes, four voxels: class-1 probabilities 3/4, 3/4, 1/4, 1/4 (logits 0 and +-ln 3), target 1, 0, 0, 0."""
    ln3 = float(np.log(3.0))
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [ln3, ln3, -ln3, -ln3]]).reshape(1, 2, *shape)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, *shape)
    return logits.requires_grad_(), target


@pytest.mark.parametrize("shape", [(2, 2, 1), (2, 2)], ids=["3d", "2d"])
def test_ce_jaccard_is_cross_entropy_plus_soft_jaccard_by_hand(shape):
    logits, target = _four_voxels(shape)
    p = torch.softmax(logits.detach().reshape(2, 4), 0)
    g = torch.stack([target.reshape(4) == 0, target.reshape(4) == 1]).float()
    ce = -(torch.log(p) * g).sum(0).mean()
    intersection = (p * g).sum(1)
    jaccard = 1 - intersection / (p.sum(1) + g.sum(1) - intersection)
    # By hand: CE = (3 ln 4/3 + ln 4) / 4; class 0: I 1.75, union 2 + 3 - 1.75 -> 6/13; class 1: I 0.75, union 2.25 -> 2/3
    assert float(ce) == pytest.approx((3 * np.log(4 / 3) + np.log(4)) / 4, rel=1e-6)
    torch.testing.assert_close(jaccard, torch.tensor([6 / 13, 2 / 3]))
    config = TrainConfig(loss="ce_jaccard")
    loss, weights = build_loss(config, 2, [], CPU)
    assert weights is None
    value = loss(logits, target)
    assert type(loss).__name__ == "CEJaccardLoss"
    assert float(value.detach()) == pytest.approx(float(ce + jaccard.mean()), rel=1e-5)
    assert float(value.detach()) == pytest.approx((3 * np.log(4 / 3) + np.log(4)) / 4 + (6 / 13 + 2 / 3) / 2, rel=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_ce_jaccard_weights_its_jaccard_terms_only(tmp_path):
    from btcv_unetr.train.loss import CEJaccardLoss
    logits, target = _four_voxels((2, 2, 1))
    weighted = CEJaccardLoss(torch.tensor([1.0, 3.0]), smooth_nr=0.0, smooth_dr=1e-6)(logits, target)
    ce = (3 * np.log(4 / 3) + np.log(4)) / 4
    assert float(weighted.detach()) == pytest.approx(ce + (1 * 6 / 13 + 3 * 2 / 3) / 2, rel=1e-5)
    labels = [_label_file(tmp_path / "a.nii.gz", {1: 400, 2: 100, 3: 4})]
    loss, weights = build_loss(TrainConfig(loss="ce_jaccard", class_weights="inverse_sqrt_volume"), 4, labels, CPU)
    assert isinstance(loss, CEJaccardLoss) and loss.jaccard.jaccard
    torch.testing.assert_close(loss.jaccard.class_weight, torch.tensor([1.0, 1.0, 1.0, 5.0]))
    np.testing.assert_allclose(weights, [1.0, 1.0, 1.0, 5.0])


# Partial annotation: the marginal loss (unannotated classes' probabilities merged into background).

@pytest.mark.parametrize("settings", [{}, {"class_weights": "inverse_sqrt_volume"}, {"loss": "ce_jaccard"}],
                         ids=["dice_ce", "weighted", "ce_jaccard"])
def test_marginal_loss_with_every_class_annotated_is_the_plain_loss(tmp_path, settings):
    from btcv_unetr.train.loss import MarginalLoss
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 6, 6), torch.randint(0, 4, (2, 1, 6, 6, 6)).float()
    labels = [_label_file(tmp_path / "a.nii.gz", {1: 400, 2: 100, 3: 4})]
    plain, plain_weights = build_loss(TrainConfig(**settings), 4, labels, CPU)
    marginal, weights = build_loss(TrainConfig(**settings), 4, labels, CPU, annotated=[np.ones(4, bool)])
    assert isinstance(marginal, MarginalLoss)
    np.testing.assert_array_equal(weights, plain_weights)
    torch.testing.assert_close(marginal(logits, target, torch.ones(2, 4, dtype=torch.bool)), plain(logits, target))
    torch.testing.assert_close(marginal(logits, target), plain(logits, target))


def _three_class_case(predicted_at_background: int):
    """Four voxels, classes 0 (background), 1, 2: the label is 1, 0, 0, 0; the logits are confident and right
    (5 for the label's class) except that voxels 2 and 3 predict ``predicted_at_background``."""
    logits = torch.zeros(1, 3, 4, 1, 1)
    for voxel, klass in enumerate((1, 0, predicted_at_background, predicted_at_background)):
        logits[0, klass, voxel] = 5.0
    return logits.requires_grad_(), torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 4, 1, 1)


def test_an_unannotated_organ_predicted_in_background_costs_nothing_an_annotated_one_does():
    loss = build_loss(TrainConfig(), 3, [], CPU, annotated=[np.ones(3, bool)])[0]
    only_organ_1 = torch.tensor([[True, True, False]])
    right, target = _three_class_case(0)
    unannotated, _ = _three_class_case(2)
    annotated, _ = _three_class_case(1)
    baseline = loss(right, target, only_organ_1).detach()
    # organ 2 is not annotated in this case: where the label says background it may well be there
    torch.testing.assert_close(loss(unannotated, target, only_organ_1).detach(), baseline)
    assert float(loss(annotated, target, only_organ_1).detach()) > float(baseline) + 1.0
    # annotated everywhere, predicting organ 2 in the background is an error like any other
    assert float(loss(unannotated, target, torch.ones(1, 3, dtype=torch.bool)).detach()) > float(baseline) + 1.0
    value = loss(annotated, target, only_organ_1)
    value.backward()
    assert torch.isfinite(annotated.grad).all() and annotated.grad[0, 1, 2:].sum() > 0  # pushes organ 1 down there


def test_label_voxels_of_an_unannotated_class_count_as_background():
    loss = build_loss(TrainConfig(), 3, [], CPU, annotated=[np.ones(3, bool)])[0]
    logits, target = _three_class_case(2)
    labelled = target.clone()
    labelled[0, 0, 3] = 2
    only_organ_1 = torch.tensor([[True, True, False]])
    torch.testing.assert_close(loss(logits, labelled, only_organ_1), loss(logits, target, only_organ_1))


def test_class_volumes_average_each_class_over_the_files_that_annotate_it(tmp_path):
    a = _label_file(tmp_path / "a.nii.gz", {1: 100, 2: 10})
    b = _label_file(tmp_path / "b.nii.gz", {1: 300})  # annotates class 1 only: its class 2 is unknown, not 0
    volumes = class_volumes([a, b], 3, annotated=[np.ones(3, bool), np.array([True, True, False])])
    np.testing.assert_allclose(volumes[1:], [(2.0 + 6.0) / 2, 0.2])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".png"])
def test_class_volumes_read_every_label_format(tmp_path, suffix):
    """--class_weights inverse_sqrt_volume on NRRD, MHA and PNG masks: the one image reader, the file's own
    voxel size (pictures: pixels / 1000)."""
    import SimpleITK as sitk
    picture = suffix == ".png"
    labels = np.zeros((20, 10) if picture else (20, 10, 5), np.uint8)
    labels[:4] = 1  # 40 pixels, or 200 voxels
    labels[4:5] = 2
    path = tmp_path / f"label{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    else:
        image = sitk.GetImageFromArray(labels.T)  # SimpleITK's arrays are (z, y, x)
        if not picture:
            image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(path))
    volumes = class_volumes([str(path)], 3)
    voxel_ml = 0.001 if picture else 8.0 / 1000
    per_class = np.bincount(labels.ravel(), minlength=3) * voxel_ml
    assert volumes == pytest.approx(per_class)
