"""Cross-validation: fold selection (``--fold K``), the crossval command (folds trained, resumed, skipped,
scored) and its report's numbers."""

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.config.validation import ConfigError
from btcv_unetr.data.datalist import case_name, load_config_split, load_split
from btcv_unetr.errors import UserError
from btcv_unetr.inference.evaluate import CaseMetrics, write_reports
from btcv_unetr.train.crossval import crossval_report, format_report, read_case_metrics, write_report

# The shipped folds (reference/README.md): fold 0 is dataset_0's validation set.
FOLD_CASES = {0: [*range(35, 41)], 1: [*range(29, 35)], 2: [*range(23, 29)], 3: [*range(7, 11), 21, 22],
              4: [*range(1, 7)]}


def numbers(entries):
    return sorted(int(case_name(entry["image"])[3:]) for entry in entries)


@pytest.mark.parametrize("fold", range(5))
def test_shipped_folds_validate_one_fifth_and_train_on_the_rest(tmp_path, fold):
    config = tiny_config(tmp_path, data={"json_list": "btcv_folds_5fold.json", "fold": fold})
    validation, training = (load_config_split(config.data, split) for split in ("validation", "training"))
    assert numbers(validation) == FOLD_CASES[fold]
    assert numbers(training) == sorted((set(range(1, 11)) | set(range(21, 41))) - set(FOLD_CASES[fold]))
    assert validation[0]["image"] == str(tmp_path / "imagesTr" / f"img{FOLD_CASES[fold][0]:04d}.nii.gz")
    assert validation[0]["label"] == str(tmp_path / "labelsTr" / f"label{FOLD_CASES[fold][0]:04d}.nii.gz")
    assert len(load_config_split(config.data, "test")) == 20  # the test list is not a fold's


@pytest.mark.parametrize("fold", [None, -1])
def test_no_fold_keeps_the_datalists_own_split(tmp_path, fold):
    config = tiny_config(tmp_path, data={"json_list": "dataset_0.json", "fold": fold})
    assert numbers(load_config_split(config.data, "validation")) == [*range(35, 41)]
    assert len(load_config_split(config.data, "training")) == 24


def folds_datalist(path: Path, folds) -> Path:
    entries = [{"image": f"imagesTr/img{i:04d}.nii.gz", "label": f"labelsTr/label{i:04d}.nii.gz"}
               for i in range(1, len(folds) + 1)]
    for entry, fold in zip(entries, folds):
        if fold is not None:
            entry["fold"] = fold
    path.write_text(json.dumps({"training": entries}))
    return path


@pytest.mark.parametrize("folds, fold, message", [
    ([None, None], 0, r'no \'training\' entry carries a "fold": cross-validation \(--fold, crossval\) needs a'),
    ([0, None, 1], 0, r'training\[1\] needs a "fold" number >= 0 like the other entries, got None'),
    ([0, "1"], 0, r"training\[1\] needs a \"fold\" number >= 0 like the other entries, got '1'"),
    ([0, True], 0, r'training\[1\] needs a "fold" number'),
    ([0, 1, 1], 2, "--fold 2: .*d.json has folds 0, 1: choose one of them"),
])
def test_wrong_folds_are_one_line(tmp_path, folds, fold, message):
    datalist = folds_datalist(tmp_path / "d.json", folds)
    with pytest.raises(UserError, match=message) as caught:
        load_split(datalist, "validation", tmp_path, fold)
    assert "\n" not in str(caught.value)


def test_shipped_datalist_without_folds_refuses_a_fold(tmp_path):
    config = tiny_config(tmp_path, data={"json_list": "dataset_0.json", "fold": 1})
    with pytest.raises(UserError, match='dataset_0.json: no \'training\' entry carries a "fold"'):
        load_config_split(config.data, "training")
    with pytest.raises(ConfigError, match="config key 'fold': -2 must be a fold number >= 0, or -1"):
        tiny_config(tmp_path, data={"fold": -2})


def crossval(*flags) -> int:
    return cli.main(["crossval", "--config", "tiny.yaml", "--device", "cpu", "--precision", "fp32", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--json_list", "dataset_0.json"], "dataset_0.json: no 'training' entry carries a \"fold\""),
    (["--folds", "5"], "--folds 5: .*btcv_folds_5fold.json has folds 0, 1, 2, 3, 4: choose among them"),
    (["--folds", "a,b"], "--folds a,b: expected fold numbers separated by commas"),
    (["--fold", "1"], "crossval runs the folds itself: use --folds 1 instead of --fold 1"),
    (["--checkpoint", "x.pt"], "crossval resumes each fold from its own folder"),
    (["--no-save_checkpoint"], "crossval scores each fold's saved model: drop --no-save_checkpoint"),
    (["--report_only"], r"fold\(s\) 0, 1, 2, 3, 4 not scored yet"),
])
def test_crossval_refusals_are_one_line(tmp_path, capsys, flags, message):
    argv = ["--data_dir", str(tmp_path), "--json_list", "btcv_folds_5fold.json", "--logdir", str(tmp_path / "cv")]
    assert crossval(*argv, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "cv" / "fold_0").exists()  # refused before any training


def scored_fold(run_dir: Path, fold: int, cases: list[CaseMetrics]) -> None:
    """A fold folder as crossval leaves it: infer's per-case report in fold_K/validation."""
    folder = run_dir / f"fold_{fold}" / "validation"
    folder.mkdir(parents=True)
    write_reports(folder, cases, 3, ["liver", "spleen"])


def test_report_means_spreads_and_pools_the_fold_scores(tmp_path):
    """Fold 0 validates cases 1 and 2 (spleen absent from case 2), fold 1 case 3: the mean over folds weighs
    folds equally, the pooled mean weighs cases equally and leaves out a case without the organ."""
    datalist = folds_datalist(tmp_path / "folds.json", [0, 0, 1])
    config = tiny_config(tmp_path, data={"json_list": str(datalist)})
    run_dir = tmp_path / "cv"
    scored_fold(run_dir, 0, [CaseMetrics("img0001", [0.8, 0.9]), CaseMetrics("img0002", [0.6, math.nan])])
    scored_fold(run_dir, 1, [CaseMetrics("img0003", [0.1, 0.5])])
    report = crossval_report(config, run_dir, [0, 1])
    write_report(report, run_dir / "crossval.csv")
    rows = list(csv.reader((run_dir / "crossval.csv").open()))
    assert rows[0] == ["organ", "fold_0", "fold_1", "mean_over_folds", "std_over_folds", "pooled_mean", "pooled_cases"]
    values = {row[0]: [float(v) for v in row[1:]] for row in rows[1:]}
    # liver: folds 0.7 and 0.1; std (n - 1) of two values a, b is |a - b| / sqrt 2; pooled (0.8 + 0.6 + 0.1) / 3
    assert values["liver"] == pytest.approx([0.7, 0.1, 0.4, 0.6 / math.sqrt(2), 0.5, 3], abs=1e-5)
    # spleen: folds 0.9 and 0.5; pooled over the 2 cases that have it
    assert values["spleen"] == pytest.approx([0.9, 0.5, 0.7, 0.4 / math.sqrt(2), 0.7, 2], abs=1e-5)
    # mean organ Dice: fold 0 (0.7 + 0.9) / 2, fold 1 (0.1 + 0.5) / 2; pooled (0.5 + 0.7) / 2 over 3 cases
    assert values["mean organ Dice"] == pytest.approx([0.8, 0.3, 0.55, 0.5 / math.sqrt(2), 0.6, 3], abs=1e-5)
    table = format_report(report)
    assert "liver" in table.splitlines()[1] and "0.7000  0.1000  0.4000  0.4243  0.5000" in table
    assert "all validation cases pooled:" in table and "(3 cases)" in table


def test_report_refuses_a_fold_not_scored_or_scored_in_part(tmp_path):
    datalist = folds_datalist(tmp_path / "folds.json", [0, 0, 1])
    config = tiny_config(tmp_path, data={"json_list": str(datalist)})
    run_dir = tmp_path / "cv"
    scored_fold(run_dir, 0, [CaseMetrics("img0001", [0.8, 0.9])])  # img0002 missing: an interrupted scoring
    with pytest.raises(UserError, match=r"fold\(s\) 0, 1 not scored yet .*--folds 0,1 with the same flags"):
        crossval_report(config, run_dir, [0, 1])


def read_csv(path: Path) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in csv.reader(path.open())}


def test_crossval_trains_scores_resumes_and_skips_folds(phantom_dir, tmp_path, capsys):
    """Two folds of the 4 phantoms (fold 0 validates 3, fold 1 one): one fold per process, then the other,
    the report; fold 0 continued for a second epoch; a rerun that finds everything done."""
    fold_of = [0, 1, 0, 0]
    content = json.loads((phantom_dir / "dataset.json").read_text())
    entries = [{**entry, "fold": fold} for entry, fold in zip(content["training"] + content["validation"], fold_of)]
    datalist = tmp_path / "folds.json"
    datalist.write_text(json.dumps({**content, "training": entries, "validation": []}))
    run_dir = tmp_path / "cv"
    flags = ["--data_dir", str(phantom_dir), "--json_list", str(datalist), "--logdir", str(run_dir),
             "--max_epochs", "1", "--no_hd95", "--no-overlay", "--infer_overlap", "0"]

    assert crossval(*flags, "--folds", "0") == 0  # one fold per process or node
    assert "the report waits for fold(s) 1" in capsys.readouterr().out
    assert not (run_dir / "crossval.csv").exists()
    cases = {fold: sorted(case_name(e["image"]) for e in entries if e["fold"] == fold) for fold in (0, 1)}
    assert sorted(p.name for p in (run_dir / "fold_0" / "validation").glob("*_seg.nii.gz")) == \
        [f"{case}_seg.nii.gz" for case in cases[0]]

    assert crossval(*flags) == 0
    out = capsys.readouterr().out
    assert "fold 0: trained already" in out and "fold 1: training into" in out
    assert "fold 0: validation cases scored already" in out and "fold 1: segmenting its validation cases" in out
    card = torch.load(run_dir / "fold_1" / "model.pt", weights_only=True)["model_card"]
    assert card["cases"] == {"training": 3, "validation": 1} and card["fold"] == 1
    report = read_csv(run_dir / "crossval.csv")
    summaries = [json.loads((run_dir / f"fold_{k}" / "validation" / "summary.json").read_text()) for k in (0, 1)]
    rows = {k: list(csv.DictReader((run_dir / f"fold_{k}" / "validation" / "metrics.csv").open())) for k in (0, 1)}
    for organ in summaries[0]["organs"]:
        folds = [s["organs"][organ]["dice"] for s in summaries]
        pooled = [float(r["dice"]) for k in (0, 1) for r in rows[k] if r["organ"] == organ]
        expected = [*folds, statistics.mean(folds), statistics.stdev(folds), statistics.mean(pooled), len(pooled)]
        assert [float(v) for v in report[organ]] == pytest.approx(expected, abs=2e-5), organ

    assert crossval(*flags, "--folds", "0", "--max_epochs", "2") == 0  # a fold continued, then re-scored
    out = capsys.readouterr().out
    assert f"fold 0: resuming {run_dir / 'fold_0' / 'model_final.pt'}" in out and "fold 1:" not in out
    assert torch.load(run_dir / "fold_0" / "model_final.pt", weights_only=True)["epoch"] == 2
    assert "fold 0: segmenting its validation cases" in out and "cross-validation report" in out

    done = [run_dir / f"fold_{k}" / name for k in (0, 1) for name in ("model_final.pt", "validation/metrics.csv")]
    before, report = [path.stat().st_mtime_ns for path in done], read_csv(run_dir / "crossval.csv")
    assert crossval(*flags) == 0  # everything done: nothing trained or segmented again
    out = capsys.readouterr().out
    assert out.count("trained already") == 2 and out.count("scored already") == 2 and "segmenting" not in out
    assert [path.stat().st_mtime_ns for path in done] == before
    assert read_csv(run_dir / "crossval.csv") == report
    assert read_case_metrics(run_dir / "fold_1" / "validation" / "metrics.csv")[1][0].case == cases[1][0]
