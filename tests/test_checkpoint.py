"""Checkpoints across versions and crashes: migration, unknown keys, reference files, --save_every, SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from btcv_unetr import cli
from btcv_unetr.errors import UserError
from btcv_unetr.io import checkpoint as ckpt
from btcv_unetr.io.checkpoint import (
    CHECKPOINT_VERSION,
    CONTENT_CHECKSUMS,
    load_checkpoint,
    save_checkpoint,
    weights_checksum,
)
from btcv_unetr.model.build import build_model
from btcv_unetr.runtime.precision import Precision
from btcv_unetr.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parent.parent


def _train_argv(phantom_dir, logdir, *flags):
    return ["train", "--config", "tiny.yaml", "--data_dir", str(phantom_dir), "--json_list", "dataset.json",
            "--logdir", str(logdir), "--precision", "fp32", *flags]


@pytest.fixture
def run(trained_run):
    """The session's 2-epoch tiny run (model_final.pt of the current version): read, never changed."""
    return trained_run


def _test_scan(phantom_dir: Path) -> Path:
    return next((phantom_dir / "imagesTs").glob("*.nii.gz"))


def _infer_argv(weights: Path, scan: Path, out: Path):
    return ["infer", "--config", "tiny.yaml", "--pretrained_dir", str(weights.parent), "--pretrained_model_name",
            weights.name, "--input", str(scan), "--output_dir", str(out), "--no-overlay", "--no_hd95"]


def test_checkpoints_carry_the_version_and_checksums_of_everything_they_store(run):
    state = torch.load(run / "model_final.pt", weights_only=True)
    assert state["version"] == CHECKPOINT_VERSION == 2
    assert state["checksum"] == weights_checksum(state["state_dict"])
    covered = set(state) - {"state_dict", CONTENT_CHECKSUMS}
    assert {"config", "optimizer", "scheduler", "scaler", "model_card", "epoch", "checksum", "version"} <= covered
    assert state[CONTENT_CHECKSUMS] == {key: ckpt.value_checksum(state[key]) for key in covered}
    state["state_dict"]["out.conv.conv.bias"][0] += 1e-3
    assert weights_checksum(state["state_dict"]) != state["checksum"]


def test_a_version_0_checkpoint_with_the_old_amp_key_resumes_and_segments(run, phantom_dir, tmp_path, capsys):
    state = torch.load(run / "model_final.pt", weights_only=True)
    old = {key: value for key, value in state.items()
           if key not in ("version", "checksum", CONTENT_CHECKSUMS, "precision")}
    old["config"]["train"].pop("precision")
    old["config"]["train"]["amp"] = False  # as version 0 stored the AMP switch
    old["config"]["train"].pop("save_every")  # did not exist then
    torch.save(old, tmp_path / "v0.pt")
    migrated = load_checkpoint(tmp_path / "v0.pt")
    assert migrated["version"] == CHECKPOINT_VERSION and migrated["epoch"] == 2
    assert cli.main(_infer_argv(tmp_path / "v0.pt", _test_scan(phantom_dir), tmp_path / "o")) == 0
    assert "precision fp32" in capsys.readouterr().out  # amp: false -> fp32, from the stored setting
    assert cli.main(_train_argv(phantom_dir, tmp_path / "resumed", "--max_epochs", "3", "--val_every", "5",
                                "--checkpoint", str(tmp_path / "v0.pt"))) == 0
    assert torch.load(tmp_path / "resumed" / "model_final.pt", weights_only=True)["epoch"] == 3


def test_inference_ignores_config_keys_it_does_not_know_with_one_warning(run, phantom_dir, tmp_path, capsys):
    state = torch.load(run / "model_final.pt", weights_only=True)
    state["config"]["train"]["removed_option"] = 3
    state["config"]["gone_section"] = {"x": 1}
    torch.save(ckpt.seal(state), tmp_path / "model.pt")  # as a version with these keys would have written it
    assert cli.main(_infer_argv(tmp_path / "model.pt", _test_scan(phantom_dir), tmp_path / "o")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'model.pt'}: ignoring config keys this version does not use: "
                        "train.removed_option, gone_section"]


def test_a_checkpoint_saved_by_the_reference_trainer_loads_for_inference_and_finetuning(phantom_dir, tmp_path):
    """The reference saves {"epoch", "best_acc" (a numpy float), "state_dict", "optimizer"}."""
    model = build_model(tiny_config().model)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 7, "best_acc": np.float64(0.61), "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "model.pt")
    assert load_checkpoint(tmp_path / "model.pt")["best_acc"] == pytest.approx(0.61)
    assert cli.main(_infer_argv(tmp_path / "model.pt", _test_scan(phantom_dir), tmp_path / "o")) == 0
    assert cli.main(_train_argv(phantom_dir, tmp_path / "ft", "--max_epochs", "1", "--val_every", "5",
                                "--resume_ckpt", "--pretrained_dir", str(tmp_path),
                                "--pretrained_model_name", "model.pt")) == 0


def test_anything_else_needing_code_is_still_refused(tmp_path):
    torch.save({"state_dict": {}, "extra": torch.optim.AdamW}, tmp_path / "code.pt")
    with pytest.raises(UserError, match="needs arbitrary code to unpickle"):
        load_checkpoint(tmp_path / "code.pt")


def test_save_every_writes_the_resumable_state_every_n_epochs_and_at_the_end(phantom_dir, tmp_path, monkeypatch):
    from btcv_unetr.train import loop as train
    saved = []
    real = train.write_checkpoint

    def record(path, state):
        saved.append((path.name, state["epoch"]))
        real(path, state)

    monkeypatch.setattr(train, "write_checkpoint", record)
    assert cli.main(_train_argv(phantom_dir, tmp_path / "r", "--max_epochs", "5", "--save_every", "2",
                                "--val_every", "10")) == 0
    assert [epoch for name, epoch in saved if name == "model_final.pt"] == [2, 4, 5]


TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from btcv_unetr import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


class Training:
    """A training in a child process whose output lines are collected as they come."""

    def __init__(self, argv, cwd):
        self.process = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, *argv], cwd=cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                                        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 120.0) -> bool:
        """True once a line containing ``text`` was printed; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return True
            if self.process.poll() is not None:
                self.reader.join()
                return any(text in line for line in self.lines)
            time.sleep(0.05)
        raise TimeoutError(f"no '{text}' within {timeout} s")

    def kill(self) -> str:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.reader.join()
        return "".join(self.lines)


def test_sigkill_at_random_moments_then_resume_continues_at_the_right_epoch_and_rate(phantom_dir, tmp_path):
    """Kills at random moments of one training, each after it made progress (an epoch printed: so on any machine);
    each resume loads the last state and goes on from there, with the learning rate the schedule gives."""
    rng = random.Random(0)
    logdir, epochs = tmp_path / "run", 40
    flags = ["--max_epochs", str(epochs), "--val_every", "100", "--warmup_epochs", "3", "--optim_lr", "1e-3",
             "--seed", "0"]
    last_epoch, kills = 0, 0
    # The first kill lands a random moment after the run's second epoch ended (during its checkpoint write or the
    # next epoch): the first epoch's checkpoint is then complete, so the run made progress, however fast the
    # machine. The second lands the same way in the resumed run: the last state is then one a resumed run saved.
    # (That a resume goes on exactly as an uninterrupted run is test_train's
    # test_resume_continues_exactly_as_an_uninterrupted_run.)
    while kills < 2 or last_epoch < 2:
        assert kills < 6, f"no progress after {kills} kills (last saved epoch {last_epoch})"
        resume = ["--checkpoint", str(logdir / "model_final.pt")] if (logdir / "model_final.pt").exists() else []
        training = Training(_train_argv(phantom_dir, logdir, *flags, *resume), tmp_path)
        if not training.wait_for(f"epoch {last_epoch + 2}/{epochs}"):
            pytest.fail("training ended before its kill: " + "".join(training.lines)[-2000:])
        time.sleep(rng.uniform(0.0, 0.3))
        output = training.kill()
        kills += 1
        if resume:
            assert f"resumed {logdir / 'model_final.pt'}: epoch {last_epoch}," in output, output[-2000:]
        if (logdir / "model_final.pt").exists():
            epoch = load_checkpoint(logdir / "model_final.pt")["epoch"]  # loads: never half-written
            assert epoch >= last_epoch
            last_epoch = epoch
    # The learning rate of the last state is the schedule's at its epoch, as in an uninterrupted run.
    state = load_checkpoint(logdir / "model_final.pt")
    config = tiny_config(train={"max_epochs": epochs, "warmup_epochs": 3, "optim_lr": 1e-3})
    optimizer = build_optimizer(torch.nn.Linear(1, 1), config.train)
    scheduler = build_scheduler(optimizer, config.train)
    optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
    for _ in range(state["epoch"]):
        scheduler.step()
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
    assert state["scheduler"]["last_epoch"] == state["epoch"]


def _save_twice_dying_in_the_second_write(path: Path) -> None:
    """A forked child's work: one complete checkpoint at ``path``, then a second save killed (SIGKILL) after
    the first bytes of its temporary file are on disk."""
    torch.set_num_threads(1)  # a forked child gets no OpenMP pool of its own (as in a DataLoader worker)
    config = tiny_config()
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    save_checkpoint(path, model, optimizer, scheduler, Precision("fp32", ""), 1, 3, 0.5, config)

    def dying_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"the first megabyte of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save  # the child's own torch module: the test's process keeps its torch.save
    save_checkpoint(path, model, optimizer, scheduler, Precision("fp32", ""), 2, 6, 0.6, config)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_file_and_the_next_start_cleans_up(tmp_path):
    # fork: the child has torch and the package imported already (a fresh interpreter would spend seconds on that)
    child = multiprocessing.get_context("fork").Process(target=_save_twice_dying_in_the_second_write,
                                                         args=(tmp_path / "model_final.pt",))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "model_final.pt")["epoch"] == 1
    assert len(list(tmp_path.glob(".model_final.pt.*.tmp.pt"))) == 1  # what the kill left
    from btcv_unetr.files import remove_stale_temporaries
    assert [p.name for p in remove_stale_temporaries(tmp_path)][0].startswith(".model_final.pt.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]


# ---- corruption anywhere in a checkpoint is refused (issue 22) ------------------------------------------------


def _flip_first_byte(tensor: torch.Tensor) -> None:
    tensor.view(torch.uint8).view(-1)[0] ^= 0x10  # one bit of the first element, in place


def _alter(state: dict, what: str) -> None:
    """Change one stored value, as a flipped byte would; the checksums saved with the file are kept."""
    if what == "config":
        state["config"]["data"]["space_x"] = 3.0  # 6.0 in tiny.yaml: masks on another voxel grid
    elif what == "optimiser state":
        _flip_first_byte(next(iter(state["optimizer"]["state"].values()))["exp_avg"])
    elif what == "learning-rate schedule state":
        state["scheduler"]["last_epoch"] += 1
    elif what == "model card":
        state["model_card"] = {**state["model_card"], "forged": True}
    elif what == "epoch counter":
        state["epoch"] = 7
    elif what == "gradient-scaler state":
        del state["scaler"]
    elif what == "version":
        state["version"] = 1  # an older layout would skip the checks: the checksums still name it


def _refusal(path: Path, what: str) -> str:
    return (f"{path}: its stored {what} does not match the checksum saved with it: the file is corrupt or was "
            "altered, and is not used; use another copy (model_final.pt / model.pt) or train again")


@pytest.mark.parametrize("what", ["config", "optimiser state", "learning-rate schedule state", "model card",
                                  "epoch counter", "gradient-scaler state", "version"])
def test_a_checkpoint_altered_anywhere_is_refused_by_the_loader_naming_what_changed(what, run, tmp_path):
    """The loader every command reads checkpoints through (inference, resume, export, serve)."""
    state = torch.load(run / "model_final.pt", weights_only=True)
    _alter(state, what)
    altered = tmp_path / "model_final.pt"
    torch.save(state, altered)
    with pytest.raises(UserError) as refused:
        load_checkpoint(altered)
    assert str(refused.value) == _refusal(altered, what)


def test_an_altered_checkpoint_is_refused_in_one_line_for_inference_and_resume(run, phantom_dir, tmp_path, capsys):
    """The commands word the loader's refusal as their one line, and write nothing: no mask, no checkpoint."""
    state = torch.load(run / "model_final.pt", weights_only=True)
    _alter(state, "optimiser state")  # a part inference does not use: refused all the same
    altered = tmp_path / "model_final.pt"
    torch.save(state, altered)
    expected = "error: " + _refusal(altered, "optimiser state")
    capsys.readouterr()
    assert cli.main(_infer_argv(altered, _test_scan(phantom_dir), tmp_path / "masks")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not list(tmp_path.glob("masks/*.nii.gz"))
    assert cli.main(_train_argv(phantom_dir, tmp_path / "resumed", "--max_epochs", "3",
                                "--checkpoint", str(altered))) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not list((tmp_path / "resumed").glob("*.pt"))


def test_two_altered_entries_are_named_together_and_missing_checksums_refused(run, tmp_path):
    state = torch.load(run / "model_final.pt", weights_only=True)
    _alter(state, "config")
    _alter(state, "optimiser state")
    torch.save(state, tmp_path / "two.pt")
    with pytest.raises(UserError, match=r"its stored config and optimiser state do not match the checksums saved "):
        load_checkpoint(tmp_path / "two.pt")
    state = torch.load(run / "model_final.pt", weights_only=True)
    del state[CONTENT_CHECKSUMS]
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="a version-2 checkpoint without the checksums of its contents"):
        load_checkpoint(tmp_path / "bare.pt")


def test_an_intact_copy_written_again_loads_infers_and_resumes(run, phantom_dir, tmp_path):
    """Reading and re-pickling a checkpoint unchanged keeps it valid: the checksums are of the content, not of
    the file's bytes (so the refusals above are of the changed values alone)."""
    state = torch.load(run / "model_final.pt", weights_only=True)
    copy = tmp_path / "copy" / "model_final.pt"
    copy.parent.mkdir()
    torch.save(dict(reversed(list(state.items()))), copy)  # another entry order too
    assert load_checkpoint(copy)["epoch"] == 2
    assert cli.main(_infer_argv(copy, _test_scan(phantom_dir), tmp_path / "masks")) == 0
    assert cli.main(_train_argv(phantom_dir, copy.parent, "--max_epochs", "3", "--val_every", "5",
                                "--checkpoint", str(copy))) == 0
    assert load_checkpoint(copy)["epoch"] == 3


def test_a_version_1_checkpoint_loads_with_its_weights_checked_and_says_the_rest_cannot_be(run, tmp_path, capsys):
    state = torch.load(run / "model_final.pt", weights_only=True)
    old = {key: value for key, value in state.items() if key != CONTENT_CHECKSUMS}
    old["version"] = 1
    old["config"]["data"]["space_x"] = 3.0  # not detectable in version 1: it stored no checksum for it
    torch.save(old, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert loaded["version"] == CHECKPOINT_VERSION and loaded["config"]["data"]["space_x"] == 3.0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: {tmp_path / 'v1.pt'}: a version-1 checkpoint: only its weights carry a checksum; its config, "
        "optimiser state and model card cannot be checked (a run resumed from it saves them with one)"]
    _flip_first_byte(old["state_dict"]["out.conv.conv.bias"])
    torch.save(old, tmp_path / "v1.pt")
    with pytest.raises(UserError, match="the weights do not match the checksum stored with them"):
        load_checkpoint(tmp_path / "v1.pt")


def test_the_content_checksum_is_canonical():
    """Equal content gives equal sums whatever the dict order, list or tuple, numpy or plain scalar; a changed
    value, type, dtype or shape changes them."""
    base = {"a": 1, "b": [1.0, None, "x"], 3: torch.arange(4, dtype=torch.float32)}
    assert ckpt.value_checksum(base) == ckpt.value_checksum({3: torch.arange(4.0), "b": (1.0, None, "x"), "a": 1})
    numpy_scalars = {**base, "a": np.int64(1), "b": [np.float32(1.0), None, "x"]}
    assert ckpt.value_checksum(base) == ckpt.value_checksum(numpy_scalars)
    others = [{**base, "a": 1.0}, {**base, "a": True}, {**base, "a": "1"}, {**base, "b": [1.0, None, "y"]},
              {**base, 3: torch.arange(4, dtype=torch.int32).view(torch.float32)},  # other bytes
              {**base, 3: torch.arange(4, dtype=torch.float32).view(2, 2)},  # same bytes, other shape
              {**base, 3: torch.arange(4, dtype=torch.float32).view(torch.int32)},  # same bytes, other dtype
              {**base, "3": base[3]}]  # a str key is not an int key
    sums = {ckpt.value_checksum(other) for other in others}
    assert len(sums) == len(others) and ckpt.value_checksum(base) not in sums
    with pytest.raises(TypeError, match="no canonical form"):
        ckpt.value_checksum({"a": object()})
