"""What the VQ-VAE adds to the one training loop's safety nets (the loop's own, exact resume
after a crash or SIGKILL, stop signals, the non-finite guard, the run folder's checks, are
tested once in tests/train/test_loop.py): a mid-epoch resume restores its codebook counts and
per-step losses, a NaN batch leaves its codebook finite, and the train command refuses to
write over an existing run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.cli.main import main
from mri_vqvae.train import vqvae as training
from tests.helpers import cli_command, tiny_config, tiny_splits, train_tiny_vqvae


class Crash(Exception):
    pass


def test_a_vqvae_resumed_mid_epoch_restores_its_codebook_counts_and_step_losses(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    data = tiny_splits(phantom_root)
    # batch 5 of 24 slices: 5 steps an epoch, the last of 4 images.
    config = tiny_config(epochs=2, batch_size=5, checkpoint_every=1)
    straight = train_tiny_vqvae(config, data, tmp_path / "straight")

    real_loss, calls = training.VQVAETask.loss, []

    def crashing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the 3rd step of epoch 2: after the checkpoint of step 7
            raise Crash
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.VQVAETask, "loss", crashing_loss)
    with pytest.raises(Crash):
        train_tiny_vqvae(config, data, tmp_path / "crashed")
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path / "crashed" / "last.pt")
    progress = checkpoint.progress
    assert (progress.epoch, progress.step_in_epoch, progress.global_step) == (1, 2, 7)
    assert progress.epoch_progress["step_sums"].shape == (2, len(training.STEP_SUMS))
    counts = progress.epoch_progress["task"]["counts"]  # the codes the epoch's 2 steps used
    assert counts.shape == (config.model.num_embeddings,) and counts.sum() > 0

    resumed = train_tiny_vqvae(config, data, tmp_path / "crashed", resume=checkpoint)
    straight_last = load_checkpoint(straight.last_checkpoint)
    resumed_last = load_checkpoint(resumed.last_checkpoint)
    for name, value in straight_last.model_state.items():  # the codebook's EMA state too
        assert torch.equal(resumed_last.model_state[name], value), name
    a, b = straight.history[-1], resumed.history[-1]
    # The epoch's codebook use counts the steps before the crash, as do its means.
    for column in ("train_codebook_usage", "train_perplexity", "train_dead_code_restarts"):
        assert b[column] == a[column], column
    assert b["train_loss"] == pytest.approx(a["train_loss"])
    assert b["images_seen"] == 48
    assert resumed_last.extras["batch_losses"] == straight_last.extras["batch_losses"]
    assert len(resumed_last.extras["batch_losses"]) == 10


def poisoned(data, indices):
    images = data["train"].images.clone()
    images[indices] = float("nan")
    return {**data, "train": replace(data["train"], images=images)}


def test_a_nan_batch_leaves_the_codebook_finite(phantom_root: Path, tmp_path: Path):
    data = tiny_splits(phantom_root)
    config = tiny_config(epochs=2, batch_size=8)  # 3 steps an epoch; one image poisoned
    result = train_tiny_vqvae(config, poisoned(data, [5]), tmp_path / "run")
    assert [row["train_skipped_steps"] for row in result.history] == [1, 1]
    # The skipped batch's images are not counted, and its NaN latents reached neither the
    # weights nor the quantiser's moving-average codebook.
    assert [row["images_seen"] for row in result.history] == [16, 32]
    state = load_checkpoint(tmp_path / "run" / "last.pt").model_state
    assert any("quantizer" in name for name in state)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


def test_train_refuses_an_existing_run_unless_told_to_overwrite(
    phantom_root: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"

    def args(*extra: str) -> list[str]:
        return cli_command(phantom_root, run_dir, "--epochs", "1", *extra)[3:]

    assert main([*args(), "--epochs", "2"]) == 0
    written = sorted((run_dir / "reconstructions").rglob("*.png"))
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "evaluation").mkdir()  # the user's test evaluation stays
    # Named like outputs but made by the user, not the run: never deleted (the marker's
    # manifest lists what the run wrote).
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
    for name in ("validation/old", "tensorboard/old", "report.html"):
        assert (run_dir / name).exists(), name
    # The first run's previews went with it: the second wrote one epoch's.
    assert len(written) > len(list((run_dir / "reconstructions").rglob("*.png"))) > 0
    assert main(args("--overwrite", "--resume")) == 2
