"""Cross-validation: each fold of a datalist with ``"fold"`` keys trained into ``runs/NAME/fold_K``, its
validation cases segmented and scored, and a report over the folds.

    btcv-unetr crossval --config FILE.yaml --data_dir DIR --json_list btcv_folds_5fold.json --logdir NAME
                        [--folds 0,1,2,3,4] [--report_only]

    train_fold       fold K through training's own entry (train.train_worker, with ``--fold K``): a finished
                     fold is skipped, a half-done one resumed from its checkpoint
    score_fold       the fold's validation cases segmented by its best model (infer.run_inference), per-case
                     Dice in ``fold_K/validation/metrics.csv``; skipped when that is complete and newer
    crossval_report  per organ: Dice per fold, mean and standard deviation over folds, mean over all cases
    write_report     ``crossval.csv`` and the printed table

Why score with inference rather than read what training records: training keeps per-organ means over
a fold's cases (its ``metrics.csv``, the model card), not per-case values, and the mean over all cases
pooled needs those. Inference also scores in each scan's own geometry, as ``test.py`` reports, where
training validates on the resampled grid.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.flags import CommandFlags, add_config_arguments, config_from_args
from ..config.schema import Config
from ..data.datalist import case_name, datalist_folds, load_config_split, read_datalist, resolve_datalist
from ..distributed import launch, under_torchrun
from ..errors import UserError
from ..files import atomic_write
from ..inference.batch import run_inference
from ..inference.evaluate import CaseMetrics, format_summary, summarise
from ..metrics import nan_mean
from .budget import budgeted_epochs
from .command import TRAIN_FLAGS, train_worker
from .loop import load_training_state
from .run_folder import BEST_CHECKPOINTS, resolve_logdir

SCORES_DIR = "validation"  # fold_K/validation: the fold's masks, metrics.csv and summary.json (infer's reports)
REPORT_FILE = "crossval.csv"

# The config flags of ``crossval``: training's for every fold, and inference's for scoring each fold's validation cases.
CROSSVAL_FLAGS: CommandFlags = {**TRAIN_FLAGS, "infer": tuple(dict.fromkeys(
    (*(TRAIN_FLAGS["infer"] or ()), "tta", "hd95", "overlay", "largest_component")))}


def fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold_{fold}"


def parse_folds(text: str | None, available: list[int], datalist: Path) -> list[int]:
    """``--folds 0,2`` -> ``[0, 2]``; None -> every fold of the datalist. A fold it lacks is one line."""
    if text is None:
        return list(available)
    try:
        folds = list(dict.fromkeys(int(item) for item in text.split(",") if item.strip()))
    except ValueError:
        raise UserError(f"--folds {text}: expected fold numbers separated by commas, such as 0,1,2") from None
    missing = [fold for fold in folds if fold not in available]
    if missing or not folds:
        raise UserError(f"--folds {text}: {datalist} has folds {', '.join(map(str, available))}: choose among them")
    return folds


def check_crossval_config(config: Config) -> None:
    """Settings crossval decides itself, or cannot work without, are refused in one line."""
    if config.train.checkpoint:
        raise UserError("crossval resumes each fold from its own folder (runs/NAME/fold_K): drop --checkpoint")
    if config.data.fold not in (None, -1):
        raise UserError(f"crossval runs the folds itself: use --folds {config.data.fold} instead of --fold "
                        f"{config.data.fold}")
    if not config.train.save_checkpoint:
        raise UserError("crossval scores each fold's saved model: drop --no-save_checkpoint")


def fold_config(config: Config, fold: int, run_dir: Path, checkpoint: Path | None = None) -> Config:
    """The config of fold ``fold``: its split (``--fold``), its run folder, the checkpoint it resumes."""
    train = dataclasses.replace(config.train, logdir=str(fold_dir(run_dir, fold)),
                                checkpoint=str(checkpoint) if checkpoint else None)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, fold=fold), train=train)


def resume_checkpoint(folder: Path) -> Path | None:
    """The training state a half-done fold resumes from, as training itself suggests: ``model_final.pt``,
    else ``model.pt`` (written at a validation just before a kill), else the latest ``--keep_best`` file."""
    for candidate in (folder / "model_final.pt", folder / "model.pt",
                      *sorted(folder.glob(BEST_CHECKPOINTS), reverse=True)):  # names sort by epoch
        if candidate.is_file():
            return candidate
    return None


def training_finished(checkpoint: Path, config: Config) -> bool:
    """Whether the state in ``checkpoint`` has trained all the epochs this run asks for (or those a time
    budget fixed, which a resumed run keeps), or reached ``--max_steps``."""
    state = load_training_state(str(checkpoint), config)
    epochs = budgeted_epochs(state, config) or config.train.max_epochs
    steps = config.train.max_steps
    return int(state["epoch"]) >= epochs or (steps is not None and int(state.get("global_step", 0)) >= steps)


def train_fold(config: Config, fold: int, run_dir: Path) -> bool:
    """Train fold ``fold`` into ``run_dir/fold_K`` with training's own entry; a fold already trained is
    skipped, a half-done one resumed (``--overwrite``: started over). Returns whether it trained."""
    checkpoint = None if config.general.overwrite else resume_checkpoint(fold_dir(run_dir, fold))
    trained_config = fold_config(config, fold, run_dir, checkpoint)
    if checkpoint is not None and training_finished(checkpoint, trained_config):
        print(f"fold {fold}: trained already ({checkpoint}), skipped")
        return False
    print(f"fold {fold}: {f'resuming {checkpoint}' if checkpoint else 'training'} into {fold_dir(run_dir, fold)}")
    launch(train_worker, trained_config)
    return True


def best_weights(folder: Path, fold: int) -> Path:
    """The model a fold is scored with: ``model.pt`` (best validation), else ``model_final.pt`` (no
    validation improved: a NaN Dice)."""
    for candidate in (folder / "model.pt", folder / "model_final.pt"):
        if candidate.is_file():
            return candidate
    raise UserError(f"fold {fold}: no model.pt or model_final.pt in {folder}: train it first (btcv-unetr crossval "
                    f"without --report_only, --folds {fold})")


def read_case_metrics(path: Path) -> tuple[list[str], list[CaseMetrics]]:
    """Organ names and per-case Dice (and HD95/NSD where computed) from a ``metrics.csv`` of
    :func:`btcv_unetr.inference.evaluate.write_reports` (a row per case and organ)."""
    organs: list[str] = []
    cases: dict[str, CaseMetrics] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["organ"] not in organs:
                organs.append(row["organ"])
            case = cases.setdefault(row["case"], CaseMetrics(row["case"], []))
            case.dice.append(float(row["dice"]))
            case.hd95.append(float(row["hd95_mm"]))
            case.nsd.append(float(row["nsd"]))
    results = list(cases.values())
    if all(math.isnan(value) for case in results for value in case.hd95):  # scored with --no_hd95
        for case in results:
            case.hd95, case.nsd = [], []
    return organs, results


def validation_cases(config: Config, fold: int) -> list[str]:
    """The case names fold ``fold`` validates."""
    return [case_name(entry["image"]) for entry in
            load_config_split(dataclasses.replace(config.data, fold=fold), "validation")]


def fold_scores(config: Config, run_dir: Path, fold: int) -> tuple[list[str], list[CaseMetrics]] | None:
    """The fold's per-case scores, or None where they are missing or lack one of its validation cases."""
    path = fold_dir(run_dir, fold) / SCORES_DIR / "metrics.csv"
    if not path.is_file():
        return None
    organs, results = read_case_metrics(path)
    return (organs, results) if {r.case for r in results} == set(validation_cases(config, fold)) else None


def score_fold(config: Config, fold: int, run_dir: Path, trained_now: bool) -> None:
    """Segment fold ``fold``'s validation cases with its best model into ``fold_K/validation`` (masks,
    per-case ``metrics.csv``, ``summary.json``); skipped when those scores are complete and newer than
    the model. All cases are segmented again otherwise: infer's report covers the cases of one call."""
    folder = fold_dir(run_dir, fold)
    weights = best_weights(folder, fold)
    scores = folder / SCORES_DIR / "metrics.csv"
    if not trained_now and fold_scores(config, run_dir, fold) is not None \
            and scores.stat().st_mtime >= weights.stat().st_mtime:
        print(f"fold {fold}: validation cases scored already ({scores}), skipped")
        return
    print(f"fold {fold}: segmenting its validation cases with {weights}")
    infer = dataclasses.replace(config.infer, output_dir=str(folder / SCORES_DIR), split="validation", input=None,
                                save_probabilities=False)
    train = dataclasses.replace(config.train, pretrained_dir=str(folder), pretrained_model_name=weights.name)
    general = dataclasses.replace(config.general, overwrite=True)
    run_inference(dataclasses.replace(fold_config(config, fold, run_dir), infer=infer, train=train, general=general))


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the values that are not NaN; the spread is NaN
    below two values."""
    finite = [v for v in values if not math.isnan(v)]
    spread = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return nan_mean(finite), spread


@dataclass
class CrossvalReport:
    """Dice per organ (classes 1..N-1) over the folds: ``per_fold[f][i]`` the mean over fold ``folds[f]``'s
    cases, ``pooled`` :func:`btcv_unetr.inference.evaluate.summarise` over every fold's cases together."""

    folds: list[int]
    organs: list[str]
    per_fold: list[dict]
    pooled: dict
    pooled_cases: list[int]  # per organ: the cases whose label has it (the others do not count)

    def rows(self) -> list[tuple[str, list[float], float, float, float, int]]:
        """Per organ, then ``mean organ Dice``: (name, Dice per fold, mean over folds, std over folds,
        pooled mean over cases, cases)."""
        rows = []
        for index, organ in enumerate(self.organs):
            values = [summary["organs"][organ]["dice"] for summary in self.per_fold]
            rows.append((organ, values, *mean_and_spread(values), self.pooled["organs"][organ]["dice"],
                         self.pooled_cases[index]))
        means = [summary["mean_organ_dice"] for summary in self.per_fold]
        rows.append(("mean organ Dice", means, *mean_and_spread(means), self.pooled["mean_organ_dice"],
                     self.pooled["cases"]))
        return rows


def crossval_report(config: Config, run_dir: Path, folds: list[int]) -> CrossvalReport:
    """The report over ``folds`` from their scores; a fold not scored yet is one line."""
    scored = {fold: fold_scores(config, run_dir, fold) for fold in folds}
    missing = [fold for fold, scores in scored.items() if scores is None]
    if missing:
        raise UserError(f"fold(s) {', '.join(map(str, missing))} not scored yet (no complete "
                        f"{fold_dir(run_dir, missing[0]) / SCORES_DIR / 'metrics.csv'}): run btcv-unetr crossval "
                        f"--folds {','.join(map(str, missing))} with the same flags first")
    organs = scored[folds[0]][0]
    if any(scored[fold][0] != organs for fold in folds):
        raise UserError(f"the folds of {run_dir} were scored with different classes: train them alike")
    classes = len(organs) + 1
    per_fold = [summarise(scored[fold][1], classes, organs) for fold in folds]
    everything = [case for fold in folds for case in scored[fold][1]]
    counts = [sum(not math.isnan(case.dice[index]) for case in everything) for index in range(len(organs))]
    return CrossvalReport(folds, organs, per_fold, summarise(everything, classes, organs), counts)


def write_report(report: CrossvalReport, path: Path) -> None:
    """``crossval.csv``: a row per organ and one for the mean organ Dice; Dice per fold, their mean and
    sample standard deviation, the mean over all cases pooled and the number of those cases."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["organ", *(f"fold_{fold}" for fold in report.folds), "mean_over_folds",
                             "std_over_folds", "pooled_mean", "pooled_cases"])
            for name, values, mean, spread, pooled, cases in report.rows():
                writer.writerow([name, *(f"{v:.5f}" for v in values), f"{mean:.5f}", f"{spread:.5f}", f"{pooled:.5f}",
                                 cases])

    atomic_write(path, write)


def format_report(report: CrossvalReport) -> str:
    """The table of :func:`write_report`, then the pooled cases' own table (with HD95 and NSD when scored)."""
    width = max(len(name) for name, *_ in report.rows()) + 2
    lines = [f"{'organ':<{width}}" + "".join(f"{f'fold {fold}':>8}" for fold in report.folds)
             + f"{'mean':>8}{'std':>8}{'pooled':>8}"]
    for name, values, mean, spread, pooled, _ in report.rows():
        lines.append(f"{name:<{width}}" + "".join(f"{v:>8.4f}" for v in values) + f"{mean:>8.4f}{spread:>8.4f}"
                     f"{pooled:>8.4f}")
    lines.append(f"({len(report.folds)} folds; mean and std (n - 1) over the folds' means; pooled: the mean over "
                 f"all {report.pooled['cases']} validation cases)")
    return "\n".join(lines + ["", "all validation cases pooled:", format_summary(report.pooled)])


def run_folds(config: Config, run_dir: Path, folds: list[int]) -> bool:
    """Train, then score, each of ``folds``; returns False on a torchrun rank other than 0 (rank 0 scores)."""
    trained = {fold: train_fold(config, fold, run_dir) for fold in folds}
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return False
    for fold in folds:
        score_fold(config, fold, run_dir, trained[fold])
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folds", default=None, metavar="K[,K...]",
                        help="the folds to run, e.g. 0,1 (one per process or node: --folds K); default: every fold "
                             "of the datalist")
    parser.add_argument("--report_only", action="store_true",
                        help="only write the report (crossval.csv) from the fold folders, after they are done")
    add_config_arguments(parser, CROSSVAL_FLAGS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_crossval_config(config)
    run_dir = resolve_logdir(config.train.logdir)
    datalist = resolve_datalist(config.data.data_dir, config.data.json_list)
    available = datalist_folds(read_datalist(datalist), datalist)
    folds = parse_folds(args.folds, available, datalist)
    if not args.report_only:
        try:
            if not run_folds(config, run_dir, folds):
                return 0
        except KeyboardInterrupt:
            print("interrupted: run the same command again (finished folds are skipped, the others resumed)")
            return 130
        left = [fold for fold in available if fold_scores(config, run_dir, fold) is None]
        if left:  # one fold per process or node: the last one to finish writes the report
            print(f"the report waits for fold(s) {', '.join(map(str, left))}: it is written when they are done "
                  "(or by --report_only)")
            return 0
        folds = available
    report = crossval_report(config, run_dir, folds)
    write_report(report, run_dir / REPORT_FILE)
    print(format_report(report))
    print(f"cross-validation report: {run_dir / REPORT_FILE}")
    return 0
