"""Run logs on rank 0: TensorBoard scalars and a ``metrics.csv`` row per validation."""

from __future__ import annotations

import csv
from pathlib import Path


class RunLog:
    """Writes nothing when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, logdir: Path, enabled: bool, class_names: list[str]):
        """``class_names``: the names of classes 1..N-1 (organs in BTCV), the columns of every table."""
        self.enabled = enabled
        self.csv_path = logdir / "metrics.csv"
        self.organs = list(class_names)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def validation(self, epoch: int, step: int, organ_dice: list[float], mean_dice: float) -> None:
        if not self.enabled:
            return
        self.scalars(epoch, {"val/mean_dice": mean_dice,
                             **{f"val_dice/{name}": value for name, value in zip(self.organs, organ_dice)}})
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["epoch", "step", "mean_dice", *self.organs])
            writer.writerow([epoch, step, f"{mean_dice:.5f}", *(f"{v:.5f}" for v in organ_dice)])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def with_progress(items, enabled: bool, desc: str):
    """``items`` with a tqdm bar of ``desc`` when ``enabled`` (the dataset writers' case loops)."""
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="case")
