"""Two CPU processes with gloo, launched as ``--distributed --nproc_per_node 2`` would launch them."""

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from monai.losses import DiceCELoss
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from btcv_unetr.distributed import Context, gather_objects, launch
from btcv_unetr.errors import UserError
from btcv_unetr.model.build import build_model
from btcv_unetr.runtime.precision import Precision
from btcv_unetr.testing.server import free_port
from btcv_unetr.train import loop as train
from btcv_unetr.train.optim import build_optimizer


def _batch(rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    return {"image": torch.rand(1, 1, 32, 32, 32, generator=generator),
            "label": torch.randint(0, 14, (1, 1, 32, 32, 32), generator=generator).float()}


def _loss():
    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)


def _worker(context: Context, config, out: str) -> None:
    """One DDP step and a validation on both ranks; rank 0 saves what they gave. Then rank 1 fails and rank 0
    waits at a barrier it would wait at forever if nobody stopped it."""
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train)
    precision = Precision("fp32", "test")
    ddp = DistributedDataParallel(model)
    train.train_one_epoch(ddp, [_batch(context.rank)], _loss(), optimizer, precision, context, 0, None, 0)
    vectors = gather_objects(parameters_to_vector(model.parameters()).detach(), context)
    _, val_loader, _ = train.build_loaders(config, context)
    validation = train.validate(model, val_loader, config, precision, context)
    organ_dice, mean_dice = validation.organ_dice, validation.mean_dice
    if context.is_main:
        torch.save({"vectors": vectors, "organ_dice": organ_dice, "mean_dice": mean_dice,
                    "val_cases": len(val_loader.dataset)}, out)
    dist.barrier()  # the result is saved before rank 1 fails
    if context.rank == 1:
        raise UserError("rank 1 cannot read its data")
    dist.barrier()


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2, which the spawned ranks inherit, written to ``path`` (a module fixture has no capfd)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "w") as file:
            os.dup2(file.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture(scope="module")
def gloo_run(phantom_dir, tmp_path_factory) -> dict:
    """Two ranks spawned once (each imports torch, MONAI and the package: most of the time) for both tests: the
    step and the validation, then the error in rank 1. 3 validation cases: an uneven split."""
    folder = tmp_path_factory.mktemp("gloo")
    content = json.loads((phantom_dir / "dataset.json").read_text())
    content["validation"] = content["validation"] + content["training"][:2]
    (folder / "three_val.json").write_text(json.dumps(content))
    config = tiny_config(phantom_dir, dist={"distributed": True, "nproc_per_node": 2,
                                            "dist_url": f"tcp://127.0.0.1:{free_port()}"},
                         data={"json_list": str(folder / "three_val.json")}, train={"optim_lr": 1e-2},
                         infer={"infer_overlap": 0.0})  # the fewest windows: the Dice is compared, not its quality
    with _stderr_to(folder / "stderr.txt"), pytest.raises(SystemExit) as stopped:
        launch(functools.partial(_worker, out=str(folder / "ddp.pt")), config)
    return {"config": config, "folder": folder, "exit_code": stopped.value.code,
            "stderr": (folder / "stderr.txt").read_text(encoding="utf-8", errors="replace"),
            "result": torch.load(folder / "ddp.pt", weights_only=True)}


@pytest.mark.xdist_group("test_distributed")
def test_two_gloo_processes_average_gradients_and_count_each_case_once(gloo_run, phantom_dir):
    config, result, folder = gloo_run["config"], gloo_run["result"], gloo_run["folder"]
    rank0, rank1 = result["vectors"]
    assert torch.equal(rank0, rank1)  # replicas identical after the step

    # One process doing the same step with the mean of the two ranks' gradients.
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.train)
    grads = []
    for rank in (0, 1):
        model.zero_grad()
        batch = _batch(rank)
        _loss()(model(batch["image"]), batch["label"]).backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = None if g0 is None else (g0 + g1) / 2
    optimizer.step()
    assert torch.allclose(parameters_to_vector(model.parameters()), rank0, atol=1e-6)

    # Validation on one process over the same 3 cases gives the same Dice.
    vector_to_parameters(rank0, model.parameters())
    single = tiny_config(phantom_dir, data={"json_list": str(folder / "three_val.json")},
                         infer={"infer_overlap": 0.0})
    context = Context(0, 1, 0, torch.device("cpu"))
    _, val_loader, _ = train.build_loaders(single, context)
    precision = Precision("fp32", "test")
    validation = train.validate(model, val_loader, single, precision, context)
    organ_dice, mean_dice = validation.organ_dice, validation.mean_dice
    assert len(val_loader.dataset) == 3 and result["val_cases"] == 2  # rank 0 held 2 of the 3
    assert math.isclose(mean_dice, result["mean_dice"], rel_tol=1e-6)
    for ours, theirs in zip(organ_dice, result["organ_dice"]):
        assert (math.isnan(ours) and math.isnan(theirs)) or math.isclose(ours, theirs, rel_tol=1e-6)


@pytest.mark.xdist_group("test_distributed")
def test_an_error_in_one_rank_stops_every_rank(gloo_run):
    """Rank 0 waits at a barrier for a peer that has failed: the launcher stops it, the run ends with the error."""
    assert gloo_run["exit_code"] in (1, 2)  # 2 from rank 1's error, or 1 from rank 0 losing its peer first
    assert "error: [rank 1] rank 1 cannot read its data" in gloo_run["stderr"]


def test_training_under_torchrun_takes_its_ranks_from_the_environment(phantom_dir, tmp_path):
    """``torchrun --nproc_per_node 2 main.py ...``: two ranks from RANK/WORLD_SIZE/LOCAL_RANK (the variables a
    scheduler or a user starting ranks by hand sets too), one run of world size 2: rank 0 alone reports and
    writes the one run folder; its checkpoint counts 2 steps, 3 cases shared between 2 ranks."""
    root = Path(__file__).resolve().parent.parent
    logdir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(root / "main.py"), "--config", "tiny.yaml", "--data_dir",
               str(phantom_dir), "--json_list", "dataset.json", "--logdir", str(logdir), "--max_epochs", "1",
               "--infer_overlap", "0", "--noamp"]
    # Variables a surrounding launcher may have set would change the world this test builds.
    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, encoding="utf-8", errors="replace",
                            timeout=300, env={**inherited, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training on cpu x2" in result.stdout  # the world size came from torchrun's environment
    assert result.stdout.count("training on cpu") == 1  # rank 0 alone reports
    assert result.stdout.count("epoch 1/1") == 1, result.stdout[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # rank 1 made no folder of its own
    assert {"model_final.pt", "config.yaml", "metrics.csv"} <= {p.name for p in logdir.iterdir()}
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    # One process would take 3 steps; DistributedSampler gives each of 2 ranks ceil(3 / 2) = 2 cases.
    assert len(json.loads((phantom_dir / "dataset.json").read_text())["training"]) == 3
    assert state["epoch"] == 1 and state["global_step"] == 2
