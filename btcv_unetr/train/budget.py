"""The time budget (``--time_budget_min``): how many epochs fit, planned from the first epochs' measured times and
re-planned as the run goes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ..config.schema import Config


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
