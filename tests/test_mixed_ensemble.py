"""Ensembles of different networks (issue 28, section 3): members that share the preprocessing and the classes, each
with its own network and its own sliding window over the one preprocessed image; and the net's name wherever a result
is described (model card, provenance).

The members are tiny networks of three architectures with seeded random weights: UNETR and DynUNet (ROI 32) and
SegResNet (ROI 40), each one window over the coarse phantom (a window padded to 40 is not one padded to 32: the
norms' statistics differ). Swin UNETR's 64-voxel ROI would fit the tiny phantoms, but one of its windows takes about
4 s on a 2-core CPU; DynUNet stands in for it. The oracle of the ensemble is its members as single predictors, their
probabilities averaged by hand.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_net_config
from serving import run_job

from btcv_unetr.data.images import mask_provenance
from btcv_unetr.errors import UserError
from btcv_unetr.inference.batch import write_case_outputs
from btcv_unetr.inference.cases import Case
from btcv_unetr.inference.ensemble import check_compatible, ensemble_card, with_network
from btcv_unetr.inference.predictor import Predictor
from btcv_unetr.inference.provenance import network_of
from btcv_unetr.io.card import model_card_lines
from btcv_unetr.io.checkpoint import load_checkpoint
from btcv_unetr.model.architectures import describe_network, network_settings
from btcv_unetr.testing.app import in_process_service
from btcv_unetr.testing.checkpoints import seeded_checkpoint

# Coarse preprocessing keeps each member to one window (the phantom is 27 x 21 x 26 voxels at 12 mm).
COARSE = {"space_x": 12.0, "space_y": 12.0, "space_z": 12.0}
# Three networks, three window sizes: each member must run its own.
MEMBERS = (("unetr", {}), ("segresnet", {"roi_x": 40, "roi_y": 40, "roi_z": 40}),
           ("dynunet", {}))
SEGRESNET_TEXT = "SegResNet (init_filters 8, blocks_down 1,1,1, blocks_up 1,1)"


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """A checkpoint of each of :data:`MEMBERS`, as training writes it (config and card inside)."""
    folder = tmp_path_factory.mktemp("mixed")
    return [seeded_checkpoint(folder / name / "model.pt", tiny_net_config(name, data=COARSE, model=roi), seed=seed)
            for seed, (name, roi) in enumerate(MEMBERS, start=1)]


@pytest.fixture(scope="module")
def scan(phantom_dir) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))


def _config(weights: list[Path] | Path, **infer):
    """CPU, float32: one file as --pretrained_dir/--pretrained_model_name, a list as --checkpoints."""
    settings = {"device": "cpu", "overlay": False, "hd95": False, **infer}
    if isinstance(weights, Path):
        return tiny_config(train={"pretrained_dir": str(weights.parent), "pretrained_model_name": weights.name,
                                  "precision": "fp32"}, infer=settings)
    return tiny_config(train={"precision": "fp32"}, infer={**settings, "checkpoints": [str(w) for w in weights]})


def test_a_mixed_ensemble_is_the_mean_of_its_members_own_runs_in_native_geometry(members, scan, tmp_path):
    ensemble = Predictor(_config(members))
    assert [model.roi_size for model in ensemble.member_models] == [(32, 32, 32), (40, 40, 40), (32, 32, 32)]
    image = ensemble.prepare(scan)
    singles = [Predictor(_config(path)) for path in members]
    own = [single.probabilities(single.prepare(scan)) for single in singles]  # each prepares the same image
    expected = sum(own) / len(own)
    probabilities = ensemble.probabilities(image)
    assert probabilities.shape == (14, *image.shape[1:])
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-6)
    assert min((probabilities - p).abs().max() for p in own) > 1e-3  # every member counts
    # Each member's windows at its own size (as MONAI lists them: tests/test_monai_internals.py), over a larger scan.
    assert ensemble.window_count(image) == 3
    assert ensemble.window_count(torch.zeros(1, 96, 96, 96)) == 2 * 125 + 64  # 5^3 windows of 32, 4^3 of 40
    # The mask in the scan's own geometry, written as test.py writes it: its shape and affine, the argmax of the mean.
    labels, _ = ensemble.to_scan(probabilities, image, keep_probabilities=False)
    path = write_case_outputs(ensemble, Case("scan", scan), labels, None, tmp_path, ensemble.config)
    mask, source = nib.load(path), nib.load(scan)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    oracle, _ = singles[0].to_scan(expected, image, keep_probabilities=False)
    assert np.array_equal(np.asarray(mask.dataobj), oracle)
    made_with = mask_provenance(path)
    assert made_with["network"] == "ensemble of 3: UNETR, SegResNet, DynUNet (nnU-Net)"
    assert [net["model_name"] for net in made_with["networks"]] == ["unetr", "segresnet", "dynunet"]
    assert made_with["networks"][2]["network_settings"] == {"norm_name": "instance", "init_filters": 4,
                                                            "deep_supervision": 0}


def test_the_mixed_ensembles_card_lists_each_members_net(members):
    ensemble = Predictor(_config(members))
    card = ensemble.model_card
    assert [(m["model_name"], m["network"], m["roi_size"]) for m in card["ensemble"]] == [
        ("unetr", "UNETR", [32, 32, 32]), ("segresnet", "SegResNet", [40, 40, 40]),
        ("dynunet", "DynUNet (nnU-Net)", [32, 32, 32])]
    assert card["ensemble"][1]["network_settings"] == {"init_filters": 8, "blocks_down": "1,1,1", "blocks_up": "1,1",
                                                       "deep_supervision": 0}
    assert card["ensemble"][1]["weights_sha256"] == load_checkpoint(members[1])["checksum"]
    assert "model_name" not in card and "network" not in card  # no one net speaks for the ensemble
    lines = model_card_lines(card)
    assert lines[2] == "  ensemble of 3 models, softmax probabilities averaged:"
    assert lines[4].startswith(f"    {members[1]}: {SEGRESNET_TEXT}, ROI 40x40x40, weights ")
    assert lines[5].startswith(f"    {members[2]}: DynUNet (nnU-Net) (init_filters 4), ROI 32x32x32, weights ")
    assert ensemble.network == ensemble.provenance()["network"] == "ensemble of 3: UNETR, SegResNet, DynUNet (nnU-Net)"


def test_a_segresnet_checkpoints_card_and_provenance_name_it(members):
    single = Predictor(_config(members[1]))
    card = single.model_card
    assert (card["model_name"], card["network"], card["roi_size"]) == ("segresnet", "SegResNet", [40, 40, 40])
    assert "hidden_size" not in card["network_settings"]  # only SegResNet's own settings
    assert model_card_lines(card)[1] == f"  network: {SEGRESNET_TEXT}, ROI 40x40x40"
    made_with = single.provenance()
    assert made_with["network"] == network_of(made_with) == "SegResNet"
    assert made_with["networks"] == [{"model_name": "segresnet", "network": "SegResNet", "roi_size": [40, 40, 40],
                                      "network_settings": card["network_settings"]}]


@pytest.mark.parametrize("section, key, value", [("model", "in_channels", 2), ("model", "out_channels", 3),
                                                 ("model", "spatial_dims", 2), ("data", "a_max", 300.0),
                                                 ("data", "axcodes", "LPS")])
def test_members_that_read_or_output_otherwise_are_refused_in_one_line(section, key, value):
    first = tiny_net_config("unetr")
    other = tiny_net_config("segresnet", **{section: {key: value}}) if section == "model" else \
        dataclasses.replace(tiny_net_config("segresnet"), data=dataclasses.replace(first.data, **{key: value}))
    with pytest.raises(UserError) as refused:
        check_compatible(Path("a/model.pt"), first, Path("b/model.pt"), other)
    mine = getattr(getattr(first, section), key)
    assert str(refused.value) == (f"b/model.pt cannot join an ensemble with a/model.pt: {key} is {value!r} there and "
                                  f"{mine!r} here; ensemble only models of the same preprocessing and classes (their "
                                  "networks may differ)")


def test_another_net_or_window_joins_but_a_pictures_window_is_preprocessing():
    unetr, dynunet = tiny_net_config("unetr"), tiny_net_config("dynunet", model={"roi_x": 64})
    check_compatible(Path("a.pt"), unetr, Path("b.pt"), dynunet)  # 3D: another net, another window
    # A 2D picture is resized to the model's window before it runs: another window reads another image.
    flat = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3}
    first, other = tiny_net_config("segresnet", model=flat), tiny_net_config("segresnet", model={**flat, "roi_y": 64})
    with pytest.raises(UserError, match=r"^b\.pt cannot join an ensemble with a\.pt: roi_y is 64 there and 32 here;"):
        check_compatible(Path("a.pt"), first, Path("b.pt"), other)


def test_the_net_is_named_and_counted():
    unetr, segresnet = tiny_net_config("unetr").model, tiny_net_config("segresnet").model
    swin = tiny_net_config("swin_unetr").model
    assert describe_network(swin) == describe_network([swin]) == "Swin UNETR"
    assert describe_network([unetr, swin, swin]) == "ensemble of 3: UNETR, Swin UNETR x2"
    assert describe_network([segresnet, unetr, segresnet]) == "ensemble of 3: SegResNet x2, UNETR"
    assert network_settings(segresnet) == {"init_filters": 8, "blocks_down": "1,1,1", "blocks_up": "1,1",
                                           "deep_supervision": 0}
    assert network_settings(segresnet, changed_only=True) == {"init_filters": 8, "blocks_down": "1,1,1",
                                                              "blocks_up": "1,1"}
    assert network_of(None) == network_of({"weights_sha256": "a" * 64}) == "UNETR"  # masks made before issue 28


def test_a_card_written_before_the_net_was_a_choice_takes_it_from_the_config():
    old = {"datalist": "dataset.json", "classes": ["background", "spleen"], "validation": "best"}
    model = tiny_net_config("unetr").model
    assert with_network(old, model) == {**old, "model_name": "unetr", "network": "UNETR", "roi_size": [32, 32, 32],
                                        "network_settings": network_settings(model)}
    named = {**old, "model_name": "segresnet", "network": "SegResNet"}
    assert with_network(named, model) == named and with_network(None, model) is None
    assert ensemble_card([Path("a.pt")], [old], ["a" * 64], [model])["network"] == "UNETR"


def test_the_service_serves_a_mixed_ensemble_and_its_jobs_name_it(members, scan, tmp_path):
    """A cross-validation folder whose folds are three networks: the service's info and job record name them, and
    the job's window count (each member's own) is the windows run."""
    run = tmp_path / "cv"
    for fold, source in enumerate(members):
        (run / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(source, run / f"fold_{fold}" / "model.pt")
    with in_process_service(run, tmp_path / "jobs") as client:
        info = client.get("/info").json()
        assert info["model"] == info["provenance"]["network"] == "ensemble of 3: UNETR, SegResNet, DynUNet (nnU-Net)"
        job = run_job(client, scan)
    assert job["state"] == "done", job
    assert job["windows_done"] == job["windows_total"] == 3  # one window per member over the coarse phantom
    assert [net["network"] for net in job["provenance"]["networks"]] == ["UNETR", "SegResNet", "DynUNet (nnU-Net)"]
