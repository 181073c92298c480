"""The one training loop (:mod:`mri_vqvae.train.loop`), tested once against a small stand-in
task (tests/train/standin.py): exact resume after a crash or a SIGKILL, stop signals, the
non-finite guard, the time budget, best.pt, mid-epoch sums restored by name, and the refusals
before training. The stages' own tests keep only what is theirs."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mri_vqvae.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.errors import UserError
from mri_vqvae.train import loop
from mri_vqvae.train.loop import NonFiniteTraining
from tests.helpers import wait_for
from tests.train.standin import MODULE, StandinTask, standin_config, train_standin

ROOT = Path(__file__).resolve().parents[2]
STEPS = 7  # an epoch of the stand-in: 40 examples in batches of 6, the last of 4
TIMING = ("epoch_seconds", "elapsed_seconds")  # what two runs of the same steps differ in


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first).model_state, load_checkpoint(second).model_state
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING} for row in history]


class Crash(Exception):
    pass


def crashing_loss(call: int):
    """The stand-in's loss, raising :class:`Crash` on its ``call``-th training step."""
    real, calls = StandinTask.loss, []

    def loss(self, rows):
        calls.append(1)
        if len(calls) == call:
            raise Crash
        return real(self, rows)

    return loss


def crash(run_dir: Path, monkeypatch, call: int, **settings):
    """Train the stand-in into ``run_dir`` until it crashes on step ``call``; returns the
    last checkpoint it left."""
    monkeypatch.setattr(StandinTask, "loss", crashing_loss(call))
    with pytest.raises(Crash):
        train_standin(run_dir, **settings)
    monkeypatch.undo()
    return load_checkpoint(run_dir / "last.pt")


def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_exactly_as_one_never_stopped(
    tmp_path: Path, monkeypatch
):
    settings = dict(epochs=2, checkpoint_every=3)  # a checkpoint at global steps 3, 6, 9, 12
    straight = train_standin(tmp_path / "straight", **settings)
    run_dir = tmp_path / "crashed"
    checkpoint = crash(run_dir, monkeypatch, 11, **settings)  # the 4th step of epoch 2
    progress = checkpoint.progress
    assert (progress.epoch, progress.step_in_epoch, progress.global_step) == (1, 2, 9)
    assert progress.epoch_progress["step_sums"].shape == (2, 3)
    assert progress.epoch_progress["task"]["prediction_sum"] != 0
    assert len(checkpoint.extras["step_losses"]) == 9

    # A crash soon after resuming loses no more than the steps since the last checkpoint:
    # the resumed epoch writes its own.
    monkeypatch.setattr(StandinTask, "loss", crashing_loss(4))  # the 6th step of epoch 2
    with pytest.raises(Crash):
        train_standin(run_dir, resume=checkpoint, **settings)
    monkeypatch.undo()
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert (checkpoint.progress.step_in_epoch, checkpoint.progress.global_step) == (5, 12)

    resumed = train_standin(run_dir, resume=checkpoint, **settings)
    assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint)
    # The resumed epoch's means include the steps before the crash, the task's epoch state
    # (train_mean_prediction) too, and the task's extras are those of the run never stopped.
    assert without_timing(resumed.history) == without_timing(straight.history)
    assert resumed.history[-1]["examples_seen"] == 80
    last, straight_last = (
        load_checkpoint(resumed.last_checkpoint),
        load_checkpoint(straight.last_checkpoint),
    )
    assert last.extras == straight_last.extras and len(last.extras["step_losses"]) == 14
    assert (last.progress.global_step, last.progress.mid_epoch) == (14, False)
    assert torch.equal(last.progress.rng_state["torch"], straight_last.progress.rng_state["torch"])


def standin_command(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", MODULE, str(run_dir), *args]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path: Path):
    torch.set_num_threads(1)  # as the stand-in's own processes train
    straight = train_standin(tmp_path / "straight", epochs=4)  # 28 steps
    killed_dir = tmp_path / "killed"
    args = ["--epochs", "4", "--checkpoint-every", "1"]
    process = start(standin_command(killed_dir, *args, "--step-seconds", "0.02"))
    target = random.Random().randint(2, 4 * STEPS - 6)
    wait_for(killed_dir / "last.pt", process)
    while load_checkpoint(killed_dir / "last.pt").progress.global_step < target:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    time.sleep(random.Random().uniform(0.0, 0.02))  # anywhere in a step, or a checkpoint's write
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(killed_dir / "last.pt").progress  # whole, wherever the kill landed
    assert target <= at_kill.global_step < 4 * STEPS, "the run ended before it could be killed"

    resumed = finish(standin_command(killed_dir, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_checkpoint(killed_dir / "last.pt")
    assert (final.progress.global_step, final.progress.mid_epoch) == (4 * STEPS, False)
    assert_same_weights(straight.last_checkpoint, killed_dir / "last.pt")
    assert final.extras == load_checkpoint(straight.last_checkpoint).extras
    assert without_timing(final.progress.history) == without_timing(straight.history)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_at_the_next_step_with_a_checkpoint_to_resume_from(
    tmp_path: Path, stop: signal.Signals
):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    # last.pt only at the end of an epoch, so a mid-epoch one is the signal's.
    process = start(standin_command(run_dir, "--epochs", "8", "--step-seconds", "0.03"))
    wait_for(run_dir / "last.pt", process)  # epoch 1 has ended
    time.sleep(0.1)  # a few steps into epoch 2
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + stop, err[-2000:]
    stopped = load_checkpoint(run_dir / "last.pt").progress
    assert stopped.mid_epoch and STEPS < stopped.global_step < 8 * STEPS
    assert stopped.global_step == stopped.epoch * STEPS + stopped.step_in_epoch
    assert (
        f"{stop.name} received: stopped before step {stopped.step_in_epoch + 1} of epoch "
        f"{stopped.epoch + 1}; {run_dir / 'last.pt'} holds the run so far (resume with --resume)"
    ) in err
    assert "Traceback" not in err
    resume_line = next(line for line in err.splitlines() if line.startswith("resume with: "))
    assert resume_line.endswith("--resume")

    # The command it printed continues the run, to the weights of one never stopped.
    resumed = finish([sys.executable, *shlex.split(resume_line.removeprefix("resume with: "))[1:]])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = train_standin(tmp_path / "straight", epochs=8)
    assert_same_weights(straight.last_checkpoint, run_dir / "last.pt")
    assert load_checkpoint(run_dir / "last.pt").progress.global_step == 8 * STEPS


def assert_finite_weights(path: Path) -> None:
    for name, tensor in load_checkpoint(path).model_state.items():
        assert torch.isfinite(tensor).all(), name


def test_a_nan_example_s_batch_is_skipped_and_counted_each_epoch(tmp_path: Path):
    result = train_standin(tmp_path / "run", epochs=2, poison=[5])
    assert [row["train_skipped_steps"] for row in result.history] == [1, 1]
    first, second = (row["examples_seen"] for row in result.history)
    # All but the batch holding example 5 (of 6 examples, or the last batch's 4).
    assert first in (34, 36) and second - first in (34, 36)
    for row in result.history:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    last = load_checkpoint(result.last_checkpoint)
    assert last.progress.global_step == 2 * STEPS  # a skipped step is still a step taken
    assert len(last.extras["step_losses"]) == 2 * STEPS - 2  # after_step only when applied
    assert_finite_weights(result.last_checkpoint)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train_skipped_steps")
    assert [row.split(",")[column] for row in rows[1:]] == ["1", "1"]


def test_non_finite_steps_in_a_row_stop_the_run_and_leave_last_pt_as_it_was(tmp_path: Path):
    run_dir = tmp_path / "run"
    train_standin(run_dir, epochs=1)
    before = (run_dir / "last.pt").read_bytes()
    checkpoint = load_checkpoint(run_dir / "last.pt")
    task = StandinTask(standin_config(epochs=3, max_nonfinite_steps=2), poison=range(40))
    task.model.load_state_dict(checkpoint.model_state)
    with pytest.raises(NonFiniteTraining) as raised:
        loop.fit(task, run_dir, resume=checkpoint)
    assert re.search(
        r"^2 steps in a row had a non-finite loss or gradient, the last at epoch 2 step 2 "
        r"\(global step 9\); training stopped and .*last\.pt is the last checkpoint\. "
        r"Lower train\.lr",
        str(raised.value),
    )
    assert (run_dir / "last.pt").read_bytes() == before
    for name, value in task.model.state_dict().items():  # no update was applied
        assert torch.equal(value, checkpoint.model_state[name]), name
    assert len(task.step_losses) == STEPS


def test_non_finite_steps_in_a_row_are_counted_across_epochs(tmp_path: Path):
    # Two steps an epoch (40 examples in batches of 20), every one non-finite: a count that
    # began again each epoch would never reach 3.
    config = standin_config(epochs=4, batch_size=20, max_nonfinite_steps=3)
    task = StandinTask(config, poison=range(40))
    with pytest.raises(NonFiniteTraining, match=r"^3 steps in a row .* epoch 2 step 1 "):
        loop.fit(task, tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["train_skipped_steps"] for row in rows] == [2]  # epoch 1 only


def test_the_time_budget_stops_mid_epoch_and_still_validates_and_writes_everything(
    tmp_path: Path, monkeypatch
):
    clock = [0.0]  # the loop's clock: 10 s a training step
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    real_loss = StandinTask.loss

    def ten_second_loss(self, rows):
        clock[0] += 10.0
        return real_loss(self, rows)

    monkeypatch.setattr(StandinTask, "loss", ten_second_loss)
    # Batches of 4: 10 steps an epoch. The 7th step starts at 60 s, the whole minute.
    result = train_standin(tmp_path / "run", epochs=50, batch_size=4, max_minutes=1.0)
    assert result.stopped_by_time_budget
    [row] = result.history
    assert row["stopped_by_time_budget"] is True
    assert (row["epoch"], row["global_step"], row["examples_seen"]) == (1, 7, 28)
    assert row["epoch_seconds"] == row["elapsed_seconds"] == 70.0
    assert row["lr"] == pytest.approx(0.03 * 0.02)  # the schedule's floor at the budget
    assert math.isfinite(row["val_loss"])  # validated all the same
    run_dir = tmp_path / "run"
    [logged] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged["stopped_by_time_budget"] is True and logged["global_step"] == 7
    assert (run_dir / "metrics.csv").read_text().splitlines()[1].endswith(",True")
    last = load_checkpoint(run_dir / "last.pt").progress
    assert (last.epoch, last.global_step, last.mid_epoch) == (1, 7, False)
    assert load_checkpoint(run_dir / "best.pt").progress.best_score == row["val_loss"]


def test_wrote_best_says_whether_this_call_wrote_best_pt(tmp_path: Path):
    run_dir = tmp_path / "run"
    fresh = train_standin(run_dir, epochs=2)
    assert fresh.wrote_best
    best_bytes = (run_dir / "best.pt").read_bytes()
    best = load_checkpoint(run_dir / "best.pt").progress
    assert best.best_score == min(row["val_loss"] for row in fresh.history)
    # Every step of the resumed epoch is skipped, so its unchanged weights score no better.
    resumed = train_standin(
        run_dir,
        resume=load_checkpoint(run_dir / "last.pt"),
        epochs=3,
        poison=range(40),
        max_nonfinite_steps=100,
    )
    assert not resumed.wrote_best
    assert resumed.history[-1]["train_skipped_steps"] == STEPS
    assert resumed.history[-1]["val_loss"] == resumed.history[-2]["val_loss"]
    assert (run_dir / "best.pt").read_bytes() == best_bytes
    assert load_checkpoint(run_dir / "last.pt").progress.epoch == 3


def test_a_mid_epoch_checkpoint_lacking_a_newer_sum_resumes_with_that_sum_at_zero(
    tmp_path: Path, monkeypatch
):
    settings = dict(epochs=2, checkpoint_every=3)
    straight = train_standin(tmp_path / "straight", **settings)
    run_dir = tmp_path / "crashed"
    checkpoint = crash(run_dir, monkeypatch, 11, **settings)  # 2 steps into epoch 2
    # As a checkpoint written before the task summed its absolute errors would hold it: the
    # sums it lacks sit between two it has, so only matching by name puts them right.
    partial = checkpoint.progress.epoch_progress
    names = list(partial["sum_names"])
    assert names == ["loss", "abs_error", "examples"]
    lacking = float(partial["step_sums"][:, names.index("abs_error")].sum())
    partial["step_sums"] = partial["step_sums"][:, [names.index("loss"), names.index("examples")]]
    partial["sum_names"] = ["loss", "examples"]
    save_checkpoint(checkpoint, run_dir / "last.pt")

    resumed = train_standin(run_dir, resume=load_checkpoint(run_dir / "last.pt"), **settings)
    a, b = straight.history[-1], resumed.history[-1]
    assert b["train_loss"] == a["train_loss"] and b["examples_seen"] == a["examples_seen"] == 80
    assert lacking > 0
    assert b["train_mean_abs_error"] == pytest.approx(
        a["train_mean_abs_error"] - lacking / 40, rel=1e-12
    )
    assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint)


def test_an_unwritable_run_folder_or_a_full_disk_is_refused_before_training(
    tmp_path: Path, monkeypatch
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"a_file/run: cannot write to the run folder"):
        train_standin(blocker / "run")

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UserError, match=r"only 1 MiB free; a run needs about \d+ MiB") as refused:
        train_standin(tmp_path / "run")
    # Three checkpoints of a little over 1 MiB (the stand-in's weights are tiny) and 16 MiB
    # for pictures and logs.
    needed = int(re.search(r"needs about (\d+) MiB", str(refused.value)).group(1))
    assert needed == 19
    assert list((tmp_path / "run").iterdir()) == []  # no config.yaml, no probe left
    Usage.free = 20 << 20  # enough
    assert train_standin(tmp_path / "run", epochs=1).history[0]["epoch"] == 1


def test_a_task_missing_a_loop_column_is_a_type_error(tmp_path: Path):
    class Careless(StandinTask):
        metric_columns = tuple(c for c in StandinTask.metric_columns if c != "lr")

    with pytest.raises(TypeError, match=r"Careless\.metric_columns lacks \['lr'\]"):
        loop.fit(Careless(standin_config()), tmp_path / "run")
    assert not (tmp_path / "run").exists()
