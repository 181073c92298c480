"""The prior trains through the same loop as the VQ-VAE, so it has every safety net: SIGKILL
at any step then --resume gives the uninterrupted weights bit for bit, SIGTERM writes a
checkpoint and says how to resume, non-finite steps are skipped then stop the run, and two
DDP processes follow the run one process makes with the whole batch."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mri_vqvae.checkpoint import Checkpoint, load_prior_checkpoint, save_checkpoint
from mri_vqvae.config import Config, DataConfig
from mri_vqvae.distributed import leave_process_group
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import build_prior
from mri_vqvae.train import prior as prior_training
from mri_vqvae.train.loop import NonFiniteTraining
from mri_vqvae.train.prior import train_prior
from tests.helpers import (
    TINY_SIZE,
    cli_env,
    free_port,
    join_test_group,
    tiny_model_config,
    wait_for,
)
from tests.train.test_prior import GRID, NUM_CODES, patterned_codes, prior_config

pytestmark = pytest.mark.slow


def tiny_vqvae_file(path: Path) -> Path:
    """A VQ-VAE checkpoint for 64x32 slices (untrained: the prior only needs its codes)."""
    torch.manual_seed(0)
    config = Config(
        data=DataConfig(image_size=TINY_SIZE), model=tiny_model_config(num_embeddings=NUM_CODES)
    )
    model = VQVAE.from_config(config.model)
    save_checkpoint(Checkpoint("vqvae", config, model.state_dict()), path)
    return path


def prior_command(vqvae: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny train-prior run in its own process: 4 maps a step, a checkpoint after each,
    dropout on (so the restored random state matters)."""
    return [
        sys.executable,
        "-m",
        "mri_vqvae",
        "-q",
        "train-prior",
        "--vqvae",
        str(vqvae),
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        *extra,
        "prior.width=32",
        "prior.num_layers=2",
        "prior.num_heads=4",
        "prior.dropout=0.2",
        "prior_train.sample_every=0",
    ]


def same_weights(first: Path, second: Path) -> None:
    a, b = load_prior_checkpoint(first).model_state, load_prior_checkpoint(second).model_state
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_prior_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(
    phantom_root: Path, tmp_path: Path
):
    env, vqvae = cli_env(tmp_path), tiny_vqvae_file(tmp_path / "vqvae.pt")
    epochs = ["--epochs", "2"]  # 24 maps: 6 steps an epoch, 12 in all
    straight = subprocess.run(
        prior_command(vqvae, phantom_root, tmp_path / "straight", *epochs),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        prior_command(vqvae, phantom_root, killed_dir, *epochs),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(killed_dir / "last.pt", process)
    wait_for_step = random.Random().randint(2, 9)  # somewhere in the run
    while load_prior_checkpoint(killed_dir / "last.pt").progress.global_step < wait_for_step:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    at_kill = load_prior_checkpoint(killed_dir / "last.pt").progress.global_step
    assert at_kill < 12, "the run ended before it could be killed"

    resumed = subprocess.run(
        prior_command(vqvae, phantom_root, killed_dir, *epochs, "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_prior_checkpoint(killed_dir / "last.pt").progress.global_step == 12
    same_weights(tmp_path / "straight" / "last.pt", killed_dir / "last.pt")


def test_prior_sigterm_writes_a_checkpoint_of_where_it_stopped_and_says_how_to_resume(
    phantom_root: Path, tmp_path: Path
):
    env, vqvae = cli_env(tmp_path), tiny_vqvae_file(tmp_path / "vqvae.pt")
    run_dir = tmp_path / "prior"
    command = prior_command(vqvae, phantom_root, run_dir, "--epochs", "50")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(run_dir / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM received" in stderr and "resume with: mri-vqvae" in stderr
    stopped = load_prior_checkpoint(run_dir / "last.pt").progress
    # Stopped at the next step, with a checkpoint of exactly where (resuming from one is the
    # SIGKILL test's, above).
    assert stopped.global_step < 50 * 6
    assert stopped.global_step == stopped.epoch * 6 + stopped.step_in_epoch


def test_prior_steps_with_a_non_finite_loss_are_skipped_then_stop_the_run(
    tmp_path: Path, monkeypatch
):
    vqvae_path = tiny_vqvae_file(tmp_path / "vqvae.pt")
    vqvae = VQVAE.from_config(tiny_model_config(num_embeddings=NUM_CODES))
    base = prior_config(epochs=2, sample_every=0)
    config = replace(base, prior_train=replace(base.prior_train, max_nonfinite_steps=3))
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    real_loss = prior_training.prior_loss

    def nan_loss(*args):
        loss, hits, count = real_loss(*args)
        return loss * float("nan"), hits, count

    monkeypatch.setattr(prior_training, "prior_loss", nan_loss)
    with pytest.raises(NonFiniteTraining, match=r"3 steps in a row .*prior_train\.lr"):
        train_prior(
            prior,
            patterned_codes(24, 1),
            patterned_codes(8, 2),
            config,
            tmp_path / "prior",
            torch.device("cpu"),
            vqvae,
            vqvae_path,
            "0" * 64,
        )
    for name, value in prior.state_dict().items():  # no update was applied
        assert torch.equal(value, before[name]), name


def _prior_rank(rank: int, world_size: int, port: int, out: str) -> None:
    processes, _ = join_test_group(rank, world_size, port)
    try:
        prior, result = _train_tiny_prior(Path(out) / "run", processes)
        state = {"state": prior.state_dict(), "history": result.history}
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        leave_process_group()


def _train_tiny_prior(out: Path, processes=None):
    # 24 maps in batches of 9: shards of 5 and 4, so the loss scaling is exercised.
    config = prior_config(epochs=2, sample_every=0, batch_size=9)
    vqvae = VQVAE.from_config(tiny_model_config(num_embeddings=NUM_CODES))
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    extra = () if processes is None else (None, processes)
    result = train_prior(
        prior,
        patterned_codes(24, 1),
        patterned_codes(8, 2),
        config,
        out,
        torch.device("cpu"),
        vqvae,
        out / "vqvae.pt",
        "0" * 64,
        *extra,
    )
    return prior, result


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_prior_processes_agree_and_follow_one_process(tmp_path: Path):
    mp.start_processes(
        _prior_rank,
        args=(2, free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in first["state"]:
        assert torch.equal(first["state"][name], second["state"][name]), name
    single, result = _train_tiny_prior(tmp_path / "single")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(first["state"][name], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(first["history"], result.history, strict=True):
        assert a["val_nll_bits"] == pytest.approx(b["val_nll_bits"], rel=1e-4)
        assert a["train_nll_bits"] == pytest.approx(b["train_nll_bits"], rel=1e-4)
