"""Inference over many scans in many processes: torchrun ranks, job-array parts, and ``--continue``.

The runs of several processes are compared with one uninterrupted single-process run of the same tiny
checkpoint on the same four phantoms: the same mask files, byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.config.load import build_config
from btcv_unetr.config.validation import ConfigError
from btcv_unetr.distributed import share_cpu_threads
from btcv_unetr.errors import UserError
from btcv_unetr.files import folder_lock, remove_stale_temporaries
from btcv_unetr.inference.batch import run_inference
from btcv_unetr.inference.evaluate import evaluate_folders, summarise
from btcv_unetr.inference.parts import Part, mask_problem
from btcv_unetr.synthetic.phantoms import generate_case
from btcv_unetr.testing.checkpoints import seeded_checkpoint
from btcv_unetr.testing.server import free_port

ROOT = Path(__file__).resolve().parent.parent
CASES = ("scan_a", "scan_b", "scan_c", "scan_d")  # sorted: scan_a and scan_c are part 0/2, the others part 1/2
# The variables a surrounding launcher may have set would change the ranks a test starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "OMP_NUM_THREADS")
pytestmark = pytest.mark.xdist_group("test_infer_parallel")  # the module's world: one checkpoint, one reference

ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny checkpoint, four labelled phantom scans of different sizes (a folder, and a datalist of them), and
    the folder one uninterrupted process makes of the scans (this one: the same command as test.py's)."""
    root = tmp_path_factory.mktemp("parallel")
    checkpoint = seeded_checkpoint(root / "run" / "model.pt", tiny_config())
    (root / "scans").mkdir()
    (root / "labels").mkdir()
    for index, (name, size) in enumerate(zip(CASES, (40, 48, 44, 36)), start=1):
        case = generate_case(seed=5, index=index, size=size)
        nib.save(case.image, root / "scans" / f"{name}.nii.gz")
        nib.save(case.label, root / "labels" / f"{name}.nii.gz")
    entries = [{"image": f"scans/{name}.nii.gz", "label": f"labels/{name}.nii.gz"} for name in CASES]
    (root / "dataset.json").write_text(json.dumps({"validation": entries}))
    made = {"root": root, "checkpoint": checkpoint, "scans": root / "scans"}
    assert _in_process(made, root / "single") == 0
    assert _outputs(root / "single").keys() == {f"{name}_seg.nii.gz" for name in CASES}
    return made


def _argv(world: dict, out: Path, *flags: str, labelled: bool = False) -> list[str]:
    """test.py on the scans folder, or (``labelled``) on the datalist's validation split: the same scans."""
    source = ["--data_dir", str(world["root"]), "--json_list", "dataset.json", "--split", "validation"] if labelled \
        else ["--input", str(world["scans"])]
    return [str(ROOT / "test.py"), "--pretrained_dir", str(world["checkpoint"].parent), "--pretrained_model_name",
            world["checkpoint"].name, *source, "--output_dir", str(out), "--device", "cpu", "--precision", "fp32",
            "--infer_overlap", "0", "--no-overlay", "--no_hd95", *flags]


def _in_process(world: dict, out: Path, *flags: str) -> int:
    """test.py's command line (``_argv``) run by ``btcv-unetr infer`` in this process: its exit status."""
    return cli.main(["infer", *_argv(world, out, *flags)[1:]])


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` but its lock files: name -> bytes (temporaries included, so that none is left)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".lock")}


def _segmented(stdout: str) -> list[str]:
    """The cases a process reports as written ("NAME: (shape) in S s -> PATH")."""
    return re.findall(r"^(\w+): \(.*\) in [\d.]+ s -> ", stdout, flags=re.MULTILINE)



def test_two_processes_under_torchrun_split_the_cases_and_write_the_same_bytes(world):
    """On the labelled split: the masks are one process's, and rank 0's report covers both ranks' cases."""
    out, logs = world["root"] / "torchrun", world["root"] / "torchrun_logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--log_dir", str(logs), "--redirects", "1",
               *_argv(world, out, labelled=True)]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=ENV,
                            cwd=world["root"], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    single = _outputs(world["root"] / "single")
    assert {name: data for name, data in _outputs(out).items() if name.endswith("_seg.nii.gz")} == single
    # Each rank's stdout (torchrun's log folder, LOCAL_RANK/stdout.log): case i went to rank i mod 2, once.
    by_rank = {int(log.parent.name): _segmented(log.read_text(encoding="utf-8", errors="replace"))
               for log in logs.rglob("stdout.log")}
    assert by_rank == {0: ["scan_a", "scan_c"], 1: ["scan_b", "scan_d"]}
    # The report: every case, in one process's order, scored as one process scores the same masks.
    expected = evaluate_folders(world["root"] / "single", world["root"] / "dataset.json", 14, distances=False)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summarise(expected, 14)))
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows[::13]] == list(CASES)
    assert [float(row[2]) for row in rows] == pytest.approx([d for r in expected for d in r.dice], abs=1e-5,
                                                            nan_ok=True)


def test_parts_of_a_job_array_together_equal_the_whole(world, capsys):
    """Parts 0/2 and 1/2 run at the same time into one folder (they share its lock), without torch.distributed:
    part 1 in a child process, part 0 in this one meanwhile."""
    out = world["root"] / "parts"
    child = subprocess.Popen([sys.executable, *_argv(world, out, "--num_parts", "2", "--part_id", "1")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                             env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=world["root"])
    try:
        capsys.readouterr()
        assert _in_process(world, out, "--num_parts", "2", "--part_id", "0") == 0
        mine = capsys.readouterr().out
    finally:
        stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-1500:]
    assert [_segmented(mine), _segmented(stdout)] == [["scan_a", "scan_c"], ["scan_b", "scan_d"]]
    assert _outputs(out) == _outputs(world["root"] / "single")


def test_a_killed_run_continued_gives_the_folder_of_an_uninterrupted_run(world, capsys):
    """test.py killed (SIGKILL) once its first mask is there; the run continued (in this process) ends with the
    folder of the uninterrupted run, byte for byte."""
    out = world["root"] / "killed"
    process = subprocess.Popen([sys.executable, *_argv(world, out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=world["root"])
    try:
        while process.poll() is None and not list(out.glob("*_seg.nii.gz")):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # no clean-up: whatever was being written stays as it was
    finally:
        process.wait(timeout=60)
    assert list(out.glob("*_seg.nii.gz")), "the run ended before it wrote its first mask"
    # What a crash can leave besides: a temporary of a mask, and a truncated mask under its final name (a copy
    # cut short, or a disk that filled up under an older version). The last case gets both.
    single = world["root"] / "single"
    (out / ".scan_d_seg.nii.gz.k1ll3d_.tmp.nii.gz").write_bytes(b"half")
    (out / "scan_d_seg.nii.gz").write_bytes((single / "scan_d_seg.nii.gz").read_bytes()[:300])
    capsys.readouterr()
    assert _in_process(world, out, "--continue") == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^scan_d: .*scan_d_seg.nii.gz is incomplete \(unreadable: .*\): segmenting it again$",
                     stdout, flags=re.MULTILINE)
    assert "scan_d" in _segmented(stdout)
    assert _outputs(out) == _outputs(single)


def test_continue_reports_over_all_cases_and_redoes_what_plain_skipping_keeps(phantom_dir, tmp_path):
    """With labels: a continued run's summary.json equals an uninterrupted run's, its metrics.csv too but for
    the seconds; without --continue a truncated mask is skipped as it is (only its existence is looked at)."""
    checkpoint = seeded_checkpoint(tmp_path / "model.pt", tiny_config())
    layer = {"data": {"data_dir": str(phantom_dir), "json_list": "dataset.json"},
             "train": {"pretrained_dir": str(tmp_path), "pretrained_model_name": checkpoint.name, "precision": "fp32"},
             "infer": {"split": "training", "overlay": False, "hd95": False, "device": "cpu", "infer_overlap": 0.0}}
    whole = run_inference(build_config([layer, {"infer": {"output_dir": str(tmp_path / "whole")}}]))
    masks = sorted((tmp_path / "whole").glob("*_seg.nii.gz"))
    assert len(masks) == 3 and whole["cases"] == 3

    out = tmp_path / "continued"
    out.mkdir()
    (out / masks[0].name).write_bytes(masks[0].read_bytes())  # a complete mask: kept, and scored from its file
    (out / masks[1].name).write_bytes(masks[1].read_bytes()[:200])  # truncated
    plain = run_inference(build_config([layer, {"infer": {"output_dir": str(out)}}]))
    assert plain["cases"] == 1 and (out / masks[1].name).stat().st_size == 200  # skipped as it was

    (out / masks[2].name).unlink()
    continued = run_inference(build_config([layer, {"infer": {"output_dir": str(out), "continue_prediction": True}}]))
    assert continued == whole
    assert (out / "summary.json").read_bytes() == (tmp_path / "whole/summary.json").read_bytes()
    assert _without_seconds(out / "metrics.csv") == _without_seconds(tmp_path / "whole/metrics.csv")
    assert [(out / mask.name).read_bytes() for mask in masks] == [mask.read_bytes() for mask in masks]


def _without_seconds(metrics: Path) -> list[list[str]]:
    return [line.split(",")[:-1] for line in metrics.read_text().splitlines()]


def test_the_split_takes_every_case_once_and_parts_compose_with_ranks():
    cases = list(range(11))
    assert Part(0, 2).cases(cases) + Part(1, 2).cases(cases) == sorted(cases, key=lambda i: (i % 2, i))
    # 3 parts of a job array, each a torchrun world of 2 ranks: 6 disjoint shares covering the cases.
    shares = [Part(part, 3, rank, 2).mine(cases) for part in range(3) for rank in range(2)]
    assert sorted(case for share in shares for case in share) == cases
    assert shares[0] == [0, 6] and shares[1] == [3, 9] and shares[5] == [5]


def test_bad_part_flags_are_one_line(world, capsys):
    capsys.readouterr()
    assert _in_process(world, world["root"] / "bad", "--num_parts", "2", "--part_id", "2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        ("error: config keys 'part_id' and 'num_parts': part 2 of 2 does not exist; give --num_parts K >= 1 and "
         "--part_id 0 .. K-1")]
    assert not (world["root"] / "bad").exists()
    with pytest.raises(ConfigError, match="part 0 of 0 does not exist"):
        build_config([{"infer": {"num_parts": 0}}])
    with pytest.raises(ConfigError, match=r"'continue_prediction' \(--continue\) and 'overwrite' exclude each other"):
        build_config([{"infer": {"continue_prediction": True}, "general": {"overwrite": True}}])


def test_a_whole_run_and_parts_exclude_each_other_and_a_part_runs_once(world, tmp_path):
    base = {"train": {"pretrained_dir": str(world["checkpoint"].parent),
                      "pretrained_model_name": world["checkpoint"].name, "precision": "fp32"},
            "infer": {"input": str(world["scans"]), "output_dir": str(tmp_path), "overlay": False, "device": "cpu"}}
    part = {"infer": {"num_parts": 2, "part_id": 0}}
    with folder_lock(tmp_path, "inference part 1/2", shared=True), \
            pytest.raises(UserError, match=r"is in use by inference part 1/2 \(process \d+\)"):
        run_inference(build_config([base]))  # a whole run beside a part
    with folder_lock(tmp_path, "inference part 0/2", name=".lock.part-0-of-2"), \
            pytest.raises(UserError, match=r"is in use by inference part 0/2 \(process \d+\)"):
        run_inference(build_config([base, part]))  # a part started twice
    with folder_lock(tmp_path, "inference"), pytest.raises(UserError, match=r"is in use by inference \(process \d+\)"):
        run_inference(build_config([base, part]))  # a part beside a whole run
    assert not list(tmp_path.glob("*_seg*"))


def test_a_part_removes_only_its_own_cases_temporaries(tmp_path):
    names = [".scan_a_seg.nii.gz.ab_12cd.tmp.nii.gz", ".scan_ab_seg.nii.gz.xy34z_0.tmp.nii.gz",
             ".metrics.csv.q1w2e3r4.tmp.csv"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, {"scan_a_seg.nii.gz", "scan_a_overlay.png"})
    assert [path.name for path in removed] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_mask_is_complete_only_when_read_whole_on_the_scans_grid(world, tmp_path):
    scan, mask = world["scans"] / "scan_a.nii.gz", world["root"] / "single" / "scan_a_seg.nii.gz"
    assert mask_problem(mask, scan) is None
    truncated = tmp_path / "truncated_seg.nii.gz"
    truncated.write_bytes(mask.read_bytes()[:-40])  # the header reads; the voxels do not
    assert nib.load(truncated).shape == nib.load(mask).shape
    assert mask_problem(truncated, scan).startswith("unreadable: ")
    assert mask_problem(world["root"] / "single" / "scan_b_seg.nii.gz", scan) == \
        f"its shape {nib.load(world['scans'] / 'scan_b.nii.gz').shape} is not the scan's {nib.load(scan).shape}"


@pytest.mark.parametrize("variable, expected", [(None, "share"), ("1", "share"), ("3", "kept")])
def test_cpu_ranks_share_the_cores(monkeypatch, variable, expected):
    """torchrun's default OMP_NUM_THREADS=1 (or none) becomes cores // ranks on this machine; another value is kept."""
    before = torch.get_num_threads()
    if variable is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", variable)
    try:
        torch.set_num_threads(3)
        threads = share_cpu_threads(2)
        cores = len(os.sched_getaffinity(0))
        assert threads == torch.get_num_threads() == (max(1, cores // 2) if expected == "share" else 3)
    finally:
        torch.set_num_threads(before)
