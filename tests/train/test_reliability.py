"""Runs that survive: mid-epoch checkpoints and exact resume (after a crash, SIGKILL or
SIGINT), non-finite steps, and run folders that must not be lost or cannot be written."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.cli.main import main
from mri_vqvae.errors import UserError
from mri_vqvae.train import loop
from mri_vqvae.train import vqvae as training
from mri_vqvae.train.loop import NonFiniteTraining
from tests.helpers import (
    cli_command,
    cli_env,
    tiny_config,
    tiny_splits,
    train_tiny_vqvae,
    wait_for,
)

CPU = torch.device("cpu")


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first).model_state, load_checkpoint(second).model_state
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Crash(Exception):
    pass


def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_exactly_as_one_never_stopped(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    data = tiny_splits(phantom_root)
    # batch 5 of 24 slices: 5 steps an epoch, the last of 4 images.
    config = tiny_config(epochs=2, batch_size=5, checkpoint_every=1)
    train_tiny_vqvae(config, data, tmp_path / "straight")

    real_loss, calls = training.VQVAETask.loss, []

    def crashing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the 3rd step of epoch 2: after the checkpoint of step 7
            raise Crash
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.VQVAETask, "loss", crashing_loss)
    with pytest.raises(Crash):
        train_tiny_vqvae(config, data, tmp_path / "crashed")
    monkeypatch.setattr(training.VQVAETask, "loss", real_loss)
    checkpoint = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (
        checkpoint.progress.epoch,
        checkpoint.progress.step_in_epoch,
        checkpoint.progress.global_step,
    ) == (1, 2, 7)
    assert checkpoint.progress.epoch_progress["step_sums"].shape == (2, 8)

    # A crash soon after resuming loses no more than a step: the resumed epoch still writes
    # its mid-epoch checkpoints.
    calls.clear()

    def crash_on_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the 4th step of epoch 2, after the resumed 3rd step's checkpoint
            raise Crash
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.VQVAETask, "loss", crash_on_second_step)
    with pytest.raises(Crash):
        train_tiny_vqvae(config, data, tmp_path / "crashed", resume=checkpoint)
    monkeypatch.setattr(training.VQVAETask, "loss", real_loss)
    checkpoint = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (checkpoint.progress.step_in_epoch, checkpoint.progress.global_step) == (3, 8)

    resumed = train_tiny_vqvae(config, data, tmp_path / "crashed", resume=checkpoint)
    assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "crashed" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    # The resumed epoch's logged means include the steps taken before the crash.
    assert resumed.history[-1]["train_loss"] == pytest.approx(
        straight.progress.history[-1]["train_loss"]
    )
    assert resumed.history[-1]["images_seen"] == 48
    assert len(load_checkpoint(tmp_path / "crashed" / "last.pt").extras["batch_losses"]) == 10


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(
    phantom_root: Path, tmp_path: Path
):
    env = cli_env(tmp_path)
    epochs = ["--epochs", "5"]  # 6 steps an epoch, 30 in all, a checkpoint after each
    straight = subprocess.run(
        cli_command(phantom_root, tmp_path / "straight", *epochs),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        cli_command(phantom_root, killed_dir, *epochs),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(killed_dir / "last.pt", process)
    time.sleep(random.Random().uniform(0.0, 0.8))  # somewhere in the run
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    at_kill = load_checkpoint(killed_dir / "last.pt")  # whole, whenever the kill landed
    assert at_kill.progress.global_step < 30, "the run ended before it could be killed"

    resumed = subprocess.run(
        cli_command(phantom_root, killed_dir, *epochs, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(tmp_path / "straight" / "last.pt", killed_dir / "last.pt")
    assert load_checkpoint(killed_dir / "last.pt").progress.global_step == 30


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_at_the_next_step_with_a_checkpoint_to_resume_from(
    phantom_root: Path, tmp_path: Path, stop: signal.Signals
):
    env = cli_env(tmp_path)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        cli_command(phantom_root, run_dir, "--epochs", "20"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(run_dir / "last.pt", process)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, err[-2000:]
    assert f"{stop.name} received" in err and "--resume" in err
    stopped = load_checkpoint(run_dir / "last.pt")
    assert stopped.progress.global_step < 20 * 6
    # It resumes from there and finishes.
    finish = str(stopped.progress.epoch + 1)  # the epoch it stopped in
    resumed = subprocess.run(
        cli_command(phantom_root, run_dir, "--epochs", finish, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not load_checkpoint(run_dir / "last.pt").progress.mid_epoch


def poisoned(data, indices):
    images = data["train"].images.clone()
    images[indices] = float("nan")
    return {**data, "train": replace(data["train"], images=images)}


def test_a_nan_batch_is_skipped_and_counted(phantom_root: Path, tmp_path: Path):
    data = tiny_splits(phantom_root)
    config = tiny_config(epochs=2, batch_size=8)  # 3 steps an epoch; one image poisoned
    result = train_tiny_vqvae(config, poisoned(data, [5]), tmp_path / "run")
    skipped = [row["train_skipped_steps"] for row in result.history]
    assert skipped == [1, 1]  # the batch holding image 5, once an epoch
    for row in result.history:
        assert torch.isfinite(torch.tensor(row["train_loss"]))
        assert row["images_seen"] in (16, 32)
    state = load_checkpoint(tmp_path / "run" / "last.pt").model_state
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def test_steps_that_stay_non_finite_stop_the_run_and_keep_the_last_checkpoint(
    phantom_root: Path, tmp_path: Path
):
    data = tiny_splits(phantom_root)
    config = tiny_config(epochs=3, batch_size=8, max_nonfinite_steps=2)
    run_dir = tmp_path / "run"
    train_tiny_vqvae(replace(config, train=replace(config.train, epochs=1)), data, run_dir)
    before = (run_dir / "last.pt").read_bytes()
    checkpoint = load_checkpoint(run_dir / "last.pt")
    checkpoint.config = config
    with pytest.raises(NonFiniteTraining, match=r"2 steps in a row.*epoch 2 step 2"):
        train_tiny_vqvae(config, poisoned(data, list(range(24))), run_dir, resume=checkpoint)
    assert (run_dir / "last.pt").read_bytes() == before


def test_train_refuses_an_existing_run_unless_told_to_overwrite(
    phantom_root: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"

    def args(*extra: str) -> list[str]:
        return cli_command(phantom_root, run_dir, "--epochs", "1", *extra)[3:]

    assert main(args()) == 0
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "evaluation").mkdir()  # the user's test evaluation stays
    # What the end of a run (report, validation) and --tensorboard write goes with it.
    for name in ("validation", "tensorboard"):
        (run_dir / name).mkdir()
        (run_dir / name / "old").write_text("")
    (run_dir / "report.html").write_text("old")
    before = (run_dir / "last.pt").read_bytes()
    assert main(args()) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == before
    # A bad setting is refused before the old run is touched, even with --overwrite.
    assert main(args("--overwrite", "train.lr=-1")) == 2
    assert (run_dir / "last.pt").read_bytes() == before
    assert main(args("--overwrite", "--seed", "7")) == 0
    assert (run_dir / "last.pt").read_bytes() != before
    assert (run_dir / "notes.txt").read_text() == "mine"  # only training outputs go
    assert (run_dir / "evaluation").is_dir()
    for name in ("validation", "tensorboard", "report.html"):
        assert not (run_dir / name).exists(), name
    assert main(args("--overwrite", "--resume")) == 2


def test_a_full_disk_or_unwritable_folder_is_refused_before_training(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    data = tiny_splits(phantom_root)
    config = tiny_config(epochs=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to the run folder"):
        train_tiny_vqvae(config, data, blocker / "run")

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UserError, match=r"only 1 MiB free; a run needs about \d+ MiB"):
        train_tiny_vqvae(config, data, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
