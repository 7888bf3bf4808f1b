"""The time budget (``--time_budget_min``): how many epochs fit, planned from the first epochs' measured times and
re-planned as the run goes (:class:`TimeBudget`, a hook of the epoch loop)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config.schema import Config
from ..distributed import Context, broadcast_object
from .optim import build_scheduler


def plan_epochs(budget_s: float, elapsed_s: float, epochs_done: int, epoch_s: float, validation_s: float,
                val_every: int, at_least: int = 1) -> int:
    """Total epochs that end within ``budget_s`` seconds: ``epochs_done`` took ``elapsed_s``; each further
    epoch takes ``epoch_s`` plus its share of a validation every ``val_every`` epochs. At least ``at_least``
    more.
    """
    per_epoch = epoch_s + validation_s / val_every
    return epochs_done + max(at_least, int((budget_s - elapsed_s) // per_epoch))


@dataclass
class BudgetPlanner:
    """The epoch count that fills ``budget_s`` seconds, planned as the run learns its speed.

    The first epoch pays the start-up (kernel selection, first allocations, the cache filling), so its
    time would plan too few epochs: it gives a first plan, the second epoch's the steady-state one, and
    each later validation re-plans from the median epoch time since, against the time left. The run
    then ends within about one epoch of its budget, whatever drifted.
    """

    budget_s: float
    val_every: int
    epoch_times: list[float] = field(default_factory=list)
    validation_s: float = 0.0

    def plans_after(self, epoch: int, validated: bool) -> bool:
        """Whether a plan is made after ``epoch`` (1-based): the first two, then each validated one."""
        return epoch <= 2 or validated

    def plan(self, epoch: int, epoch_s: float, validation_s: float | None, elapsed_s: float) -> int:
        """Total epochs after ``epoch`` took ``epoch_s`` (and a validation ``validation_s``, None: none),
        ``elapsed_s`` into the budget."""
        self.epoch_times.append(epoch_s)
        if validation_s is not None:
            self.validation_s = validation_s
        # None more once the budget is spent: a re-plan may end the run where it is.
        return plan_epochs(self.budget_s, elapsed_s, epoch, self.steady_epoch_s(), self.validation_s, self.val_every,
                           at_least=0)

    def steady_epoch_s(self) -> float:
        """The median epoch time, the first epoch left out once there is another."""
        return statistics.median(self.epoch_times[1:] or self.epoch_times)


def budgeted_epochs(state: dict[str, Any] | None, config: Config) -> int | None:
    """The epoch count a time budget fixed in the run being resumed (so the schedule stays the same), if any."""
    if state is None or config.train.time_budget_min is None:
        return None
    stored = state.get("config", {}).get("train", {})
    return int(stored["max_epochs"]) if stored.get("time_budget_min") is not None else None


class BudgetedRun(Protocol):
    """What the time budget reads and changes of a run (``train.loop.Run``)."""

    epoch: int
    config: Config
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass
class TimeBudget:
    """``--time_budget_min`` as a hook of ``train.loop.fit``: after the epochs its planner plans after, it fits the
    epoch count to the budget, and a new count gets a learning-rate schedule that spans it. Without this hook the
    loop runs ``max_epochs``.

    ``started``: when the budget's clock started (the epoch loop's start).
    """

    planner: BudgetPlanner
    started: float = field(default_factory=time.time)

    @classmethod
    def of(cls, config: Config) -> TimeBudget:
        return cls(BudgetPlanner(60 * config.train.time_budget_min, config.train.val_every))

    def validation_wanted(self, epoch: int) -> bool:
        """A budget's first plan needs the time of one validation: the first epoch is validated."""
        return epoch == 1

    def after_epoch(self, run: BudgetedRun, context: Context, epoch_s: float, validation_s: float | None,
                    stop: bool) -> None:
        """Re-plan after ``run.epoch`` took ``epoch_s`` (and a validation ``validation_s``, None: none)."""
        if stop or not self.planner.plans_after(run.epoch, validation_s is not None):
            return
        elapsed_s = time.time() - self.started
        # Rank 0's clock decides, so that every rank plans the same schedule.
        planned = broadcast_object(self.planner.plan(run.epoch, epoch_s, validation_s, elapsed_s), context)
        t = run.config.train
        if planned == t.max_epochs:
            return
        if context.is_main:
            print(f"time budget {t.time_budget_min:g} min: {elapsed_s:.0f} s used after epoch {run.epoch}, epochs "
                  f"take {self.planner.steady_epoch_s():.1f} s and a validation {self.planner.validation_s:.1f} s, "
                  f"so {planned} epochs in all (the learning-rate schedule spans them)")
        run.config = dataclasses.replace(run.config, train=dataclasses.replace(t, max_epochs=planned))
        run.scheduler = build_scheduler(run.optimizer, run.config.train, epochs_done=run.epoch)
