"""A training run's folder: where it is, the lock that keeps a second run out, the refusal to mix with an earlier run,
and the keep-best checkpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

from ..config.schema import Config
from ..distributed import Context, raise_on_every_rank
from ..errors import UserError
from ..files import folder_lock, remove_stale_temporaries


def resolve_logdir(logdir: str) -> Path:
    """A bare name goes under ./runs/ as in the reference (``--logdir test`` -> ``runs/test``)."""
    path = Path(logdir)
    return path if path.is_absolute() or len(path.parts) > 1 else Path("runs") / path


# --keep_best K: the K best checkpoints, model_epoch0012_dice0.7345.pt (epoch, validation mean Dice to 4 decimals).
BEST_CHECKPOINTS = "model_epoch*_dice*.pt"


def keep_best_plan(logdir: Path, keep: int, epoch: int, score: float) -> tuple[Path | None, list[Path]]:
    """After the validation of ``epoch`` scoring ``score``: the file to write for it (None: it does not rank
    among the ``keep`` best, or the score is NaN) and the files of ``logdir`` to delete so ``keep`` remain.

    Ranked by the score in the file name (4 decimals: a resumed run, which knows the earlier files only by
    their names, ranks as an uninterrupted one), a tie to the earlier epoch. Files of this epoch or later
    are from a continuation that this run, resumed from an earlier checkpoint, replaces: they are dropped.
    """
    ranked, stale = [], []
    for path in logdir.glob(BEST_CHECKPOINTS):
        epoch_text, _, score_text = path.name[len("model_epoch"):-len(".pt")].partition("_dice")
        try:
            found = (-float(score_text), int(epoch_text), path)
        except ValueError:
            continue  # not a name this function writes
        if math.isfinite(found[0]):
            (stale if found[1] >= epoch else ranked).append(found)
    new = None
    if math.isfinite(score):
        new = logdir / f"model_epoch{epoch:04d}_dice{score:.4f}.pt"
        ranked.append((-float(f"{score:.4f}"), epoch, new))
    ranked.sort(key=lambda item: item[:2])
    kept = [path for _, _, path in ranked[:keep]]
    dropped = [path for _, _, path in stale + ranked[keep:] if path not in kept and path.exists()]
    return (new if new in kept else None), dropped


# What a training run writes into its folder; an earlier run's files are not silently mixed with a new one's.
RUN_FILES = ("model.pt", "model_final.pt", "metrics.csv", "config.yaml")


def resumes_its_own_run(logdir: Path, config: Config) -> bool:
    """True when ``--checkpoint`` lies in ``logdir``: resuming continues the run there (its files are kept).

    A checkpoint from elsewhere starts another run in ``logdir`` (from that run's state), which must not
    replace what ``logdir`` holds without ``--overwrite``."""
    checkpoint = config.train.checkpoint
    return bool(checkpoint) and Path(checkpoint).resolve().parent == logdir.resolve()


def clear_earlier_run(logdir: Path, config: Config) -> None:
    """Refuse a run folder that holds an earlier run's checkpoints, unless resuming that run (``--checkpoint``
    in the folder) or ``--overwrite`` (which deletes its files). Resuming a checkpoint of another folder counts
    as another run. An earlier run that saved no checkpoint (killed in its first epoch) is replaced with a
    note: only its logs are lost."""
    if resumes_its_own_run(logdir, config):
        return
    previous = [logdir / name for name in RUN_FILES if (logdir / name).exists()]
    previous += sorted(logdir.glob("events.out.tfevents.*")) + sorted(logdir.glob(BEST_CHECKPOINTS))
    checkpoints = [path for path in previous if path.suffix == ".pt"]
    if checkpoints and not config.general.overwrite:
        found = f"{', '.join(p.name for p in previous[:3])}{' ...' if len(previous) > 3 else ''}"
        resumable = logdir / "model_final.pt" if (logdir / "model_final.pt").exists() else checkpoints[0]
        if config.train.checkpoint:
            source = Path(config.train.checkpoint)
            raise UserError(f"{logdir} holds another run ({found}) and --checkpoint {source} is not in it: "
                            f"resuming there would replace its files; resume into the checkpoint's own folder "
                            f"(--logdir {source.parent}), replace this one with --overwrite, or choose another "
                            "--logdir")
        raise UserError(f"{logdir} holds an earlier run ({found}): resume it with --checkpoint "
                        f"{resumable}, replace it with --overwrite, or choose another --logdir")
    if previous and not checkpoints:
        print(f"{logdir}: the earlier run there saved no checkpoint; starting over (its logs are replaced)")
    for path in previous:
        path.unlink()


@contextlib.contextmanager
def run_folder(logdir: Path, config: Config, context: Context) -> Iterator[None]:
    """Rank 0 creates the run folder and locks it for the whole run (a second training on it is refused);
    temporary files of a killed run are removed. Every rank stops when the folder cannot be used."""
    with contextlib.ExitStack() as stack:
        problem = None
        if context.is_main:
            try:
                try:
                    logdir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise UserError(f"{logdir}: cannot create the run folder ({exc.strerror or exc}): "
                                    "choose another --logdir") from None
                stack.enter_context(folder_lock(logdir, "a training run"))
                clear_earlier_run(logdir, config)
                remove_stale_temporaries(logdir)
            except UserError as exc:
                problem = str(exc)
        raise_on_every_rank(problem, context)
        yield
