"""torch.distributed helpers: launching, process-group set-up, and small collectives.

Three ways to run ``main.py``:
- plain: one process;
- ``--distributed``: this process spawns one worker per visible GPU (``--nproc_per_node`` to choose,
  e.g. on CPU), ranks ``rank * nproc + local`` of ``world_size * nproc`` as in the reference;
- under ``torchrun``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` come from the environment.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config.schema import Config
from .errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launch(worker: Callable[[Context, Config], Any], config: Config) -> None:
    """Run ``worker(context, config)`` in this process or in spawned processes."""
    if under_torchrun():
        _run(int(os.environ["LOCAL_RANK"]), worker, config, None)
    elif config.dist.distributed:
        gpus = torch.cuda.device_count() if pick_device(config.infer.device).type == "cuda" else 0
        nprocs = config.dist.nproc_per_node or gpus or 1
        try:
            mp.spawn(_run, args=(worker, config, nprocs), nprocs=nprocs, join=True)
        except mp.ProcessExitedException as exc:
            # A worker reported its own error already; stop with its exit code.
            raise SystemExit(exc.exit_code or 1) from None
    else:
        _run(0, worker, config, None)


def _run(local_rank: int, worker: Callable, config: Config, nprocs: int | None) -> None:
    if nprocs is not None and sys.platform.startswith("linux"):
        # Workers spawned by mp.spawn would otherwise start DataLoader workers by pickling the whole
        # cached dataset into each of them, every epoch (60 s instead of 2 s per demo epoch on a GPU).
        mp.set_start_method("fork", force=True)
    context = setup(local_rank, config, nprocs)
    try:
        worker(context, config)
    except UserError as exc:
        if not context.distributed:
            raise
        print(f"error: [rank {context.rank}] {exc}", file=sys.stderr)
        sys.exit(2)  # the launcher then stops every other rank
    except Exception:
        if not context.distributed:
            raise
        # Often the echo of another rank's failure (a collective that lost its peer): report, exit, and
        # let the launcher stop the rest, rather than a traceback racing the first rank's message.
        print(f"[rank {context.rank}] failed:\n{traceback.format_exc()}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    """``--device`` (auto|cpu|cuda) as a device type: auto takes a GPU where one is visible; cuda without one
    is a one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup(local_rank: int, config: Config, nprocs: int | None) -> Context:
    """Initialise the process group when distributed; pick this process's device (``--device``; with CUDA,
    GPU ``local_rank``)."""
    cuda = pick_device(config.infer.device).type == "cuda"
    backend = config.dist.dist_backend if cuda else "gloo"
    timeout = timedelta(minutes=30)
    if under_torchrun():
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    elif nprocs is not None:
        dist.init_process_group(backend=backend, init_method=config.dist.dist_url, timeout=timeout,
                                world_size=config.dist.world_size * nprocs,
                                rank=config.dist.rank * nprocs + local_rank)
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Context(0, 1, 0, device)


def local_world_size(context: Context) -> int:
    """The ranks on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else (ranks given by hand) the world's."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or context.world_size)


def share_cpu_threads(processes: int) -> int:
    """Give this process its share of the cores it may run on: ``cores // processes`` threads (at least 1),
    ``processes`` being the ranks on this machine, so that they do not oversubscribe it. torchrun sets
    ``OMP_NUM_THREADS=1`` for every rank by default (a share, not a choice: it is replaced); any other value
    is the user's and kept. Returns the threads this process uses.

    Inference takes it (``test.py`` under torchrun). Training does not: tests/test_distributed.py compares the
    spawned ranks' gradients with one process's, which agree to 1e-6 only at the same thread count."""
    if os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, processes)))
    return torch.get_num_threads()


def raise_on_every_rank(problem: str | None, context: Context) -> None:
    """Rank 0's one-line ``problem`` (None: none) raised as a :class:`UserError` on every rank, so that all
    ranks stop together instead of waiting for rank 0 at their next collective."""
    problem = broadcast_object(problem, context)
    if problem:
        raise UserError(problem)


def barrier(context: Context) -> None:
    """Every rank waits here for the others (nothing to do in one process)."""
    if context.distributed:
        dist.barrier()


def broadcast_object(obj: Any, context: Context) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, context: Context) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not context.distributed:
        return [obj]
    boxes: list[Any] = [None] * context.world_size
    dist.all_gather_object(boxes, obj)
    return boxes


def all_true(flag: bool, context: Context) -> bool:
    """True when ``flag`` holds on every rank (so that all ranks take the same branch)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)
