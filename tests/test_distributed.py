"""Two CPU processes with gloo, launched as ``--distributed --nproc_per_node 2`` would launch them."""

import functools
import json
import math
import os

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
from btcv_unetr.model.precision import Precision
from btcv_unetr.train import loop as train
from btcv_unetr.train.optim import build_optimizer
from btcv_unetr.testing.server import free_port


def _batch(rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    return {"image": torch.rand(1, 1, 32, 32, 32, generator=generator),
            "label": torch.randint(0, 14, (1, 1, 32, 32, 32), generator=generator).float()}


def _loss():
    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True)


def _worker(context: Context, config, out: str) -> None:
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



def test_two_gloo_processes_average_gradients_and_count_each_case_once(phantom_dir, tmp_path):
    content = json.loads((phantom_dir / "dataset.json").read_text())
    content["validation"] = content["validation"] + content["training"][:2]  # 3 cases: an uneven split
    (tmp_path / "three_val.json").write_text(json.dumps(content))
    config = tiny_config(phantom_dir, dist={"distributed": True, "nproc_per_node": 2,
                                            "dist_url": f"tcp://127.0.0.1:{free_port()}"},
                         data={"json_list": str(tmp_path / "three_val.json")}, train={"optim_lr": 1e-2})
    launch(functools.partial(_worker, out=str(tmp_path / "ddp.pt")), config)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)

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
    single = tiny_config(phantom_dir, data={"json_list": str(tmp_path / "three_val.json")})
    context = Context(0, 1, 0, torch.device("cpu"))
    _, val_loader, _ = train.build_loaders(single, context)
    precision = Precision("fp32", "test")
    validation = train.validate(model, val_loader, single, precision, context)
    organ_dice, mean_dice = validation.organ_dice, validation.mean_dice
    assert len(val_loader.dataset) == 3 and result["val_cases"] == 2  # rank 0 held 2 of the 3
    assert math.isclose(mean_dice, result["mean_dice"], rel_tol=1e-6)
    for ours, theirs in zip(organ_dice, result["organ_dice"]):
        assert (math.isnan(ours) and math.isnan(theirs)) or math.isclose(ours, theirs, rel_tol=1e-6)


def _failing_worker(context: Context, config) -> None:
    if context.rank == 1:
        raise UserError("rank 1 cannot read its data")
    dist.barrier()  # rank 0 would wait here forever if nobody stopped it


def test_an_error_in_one_rank_stops_every_rank(phantom_dir, capfd):
    config = tiny_config(phantom_dir, dist={"distributed": True, "nproc_per_node": 2,
                                            "dist_url": f"tcp://127.0.0.1:{free_port()}"})
    with pytest.raises(SystemExit) as stopped:
        launch(_failing_worker, config)
    assert stopped.value.code in (1, 2)  # 2 from rank 1's error, or 1 from rank 0 losing its peer first
    assert "error: [rank 1] rank 1 cannot read its data" in capfd.readouterr().err


def test_training_under_torchrun_takes_its_ranks_from_the_environment(phantom_dir, tmp_path):
    """``torchrun --nproc_per_node 2 main.py ...``: two ranks from RANK/WORLD_SIZE/LOCAL_RANK, one run folder."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    logdir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(root / "main.py"), "--config", "tiny.yaml", "--data_dir",
               str(phantom_dir), "--json_list", "dataset.json", "--logdir", str(logdir), "--max_epochs", "1",
               "--noamp"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, encoding="utf-8", errors="replace",
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training on cpu x2" in result.stdout  # the world size came from torchrun's environment
    assert result.stdout.count("training on cpu") == 1  # rank 0 alone reports and writes
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    assert state["epoch"] == 1 and (logdir / "metrics.csv").is_file()


def test_two_processes_given_rank_variables_train_as_one_run_of_world_size_2(phantom_dir, tmp_path):
    """Two ``main.py`` started by hand with RANK/WORLD_SIZE/LOCAL_RANK (no launcher): rank 0 alone reports
    ``x2`` and writes the one run folder; its checkpoint counts 2 steps, 3 cases shared between 2 ranks."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    logdir = tmp_path / "run"
    argv = [sys.executable, str(root / "main.py"), "--config", "tiny.yaml", "--data_dir", str(phantom_dir),
            "--json_list", "dataset.json", "--logdir", str(logdir), "--max_epochs", "1", "--noamp"]
    # Variables a surrounding launcher may have set would change the world this test builds.
    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    shared = {**inherited, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                              errors="replace", env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=120) for process in ranks]
    finally:
        for process in ranks:  # a rank whose peer died would wait for it until the 30-minute timeout
            if process.poll() is None:
                process.kill()
                process.communicate()
    (out0, err0), (out1, err1) = outputs
    assert [process.returncode for process in ranks] == [0, 0], err0[-1500:] + err1[-1500:]
    assert "training on cpu x2" in out0
    assert "training on" not in out1 and "epoch 1/1" not in out1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # rank 1 made no folder of its own
    assert {"model_final.pt", "config.yaml", "metrics.csv"} <= {p.name for p in logdir.iterdir()}
    state = torch.load(logdir / "model_final.pt", weights_only=True)
    # One process would take 3 steps; DistributedSampler gives each of 2 ranks ceil(3 / 2) = 2 cases.
    assert len(json.loads((phantom_dir / "dataset.json").read_text())["training"]) == 3
    assert state["epoch"] == 1 and state["global_step"] == 2
