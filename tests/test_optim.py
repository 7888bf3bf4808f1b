import math

import pytest
import torch

from btcv_unetr.config.load import build_config
from btcv_unetr.train.optim import build_optimizer, build_scheduler, lr_factor


def _train(**values):
    return build_config([{"train": values}]).train


@pytest.mark.parametrize("epoch, expected", [
    (0, 1e-4 / 50), (24, 1e-4 * 25 / 50), (49, 1e-4), (50, 1e-4),
    (2525, 0.5e-4), (4999, 1e-4 * 0.5 * (1 + math.cos(math.pi * 4949 / 4950))),
])
def test_reference_warmup_cosine_without_a_zero_first_epoch(epoch, expected):
    assert 1e-4 * lr_factor(_train())(epoch) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_cosine_anneal_and_constant():
    assert lr_factor(_train(lrschedule="cosine_anneal", max_epochs=100))(50) == pytest.approx(0.5)
    assert lr_factor(_train(lrschedule="none"))(1234) == 1.0
    assert lr_factor(_train(warmup_epochs=10, max_epochs=5))(7) == pytest.approx(0.8)


def test_scheduler_steps_per_epoch_and_resumes_from_its_state():
    config = _train(warmup_epochs=4, max_epochs=10, optim_lr=1.0)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(5):
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    resumed_optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    resumed = build_scheduler(resumed_optimizer, config)
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step()
    scheduler.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimisers(name, cls):
    optimizer = build_optimizer(torch.nn.Linear(2, 2), _train(optim_name=name, reg_weight=0.1))
    assert type(optimizer) is cls and optimizer.param_groups[0]["weight_decay"] == 0.1
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.99 and optimizer.param_groups[0]["nesterov"]


def test_linear_warms_up_then_decays_linearly_to_zero_after_the_last_epoch():
    factor = lr_factor(_train(lrschedule="linear", warmup_epochs=4, max_epochs=10))
    assert [factor(e) for e in range(11)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6,
                                                            1 / 6, 0.0], abs=1e-12)
    assert factor(12) == 0.0
    assert lr_factor(_train(lrschedule="linear", warmup_epochs=0, max_epochs=4))(0) == 1.0
    # As fit (train/loop.py) steps it, once after each epoch: the rate after the last epoch's step is exactly 0.
    config = _train(lrschedule="linear", warmup_epochs=2, max_epochs=5, optim_lr=1.0)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(config.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: no update; the order fit keeps
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3]) and optimizer.param_groups[0]["lr"] == 0.0


def test_warmup_cosine_is_unchanged_by_the_linear_choice():
    cosine = lr_factor(_train(warmup_epochs=4, max_epochs=10))
    expected = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert [cosine(e) for e in range(11)] == pytest.approx(expected, abs=1e-12)
    assert _train().lrschedule == "warmup_cosine"
