"""What the prior adds to the one training loop's safety nets (the loop's own, resume after
SIGKILL, stop signals, the non-finite guard, are tested once in tests/train/test_loop.py): its
moving average of the weights survives a mid-epoch resume, its non-finite stop names the
prior's settings, and two DDP processes follow the run one process makes with the whole
batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mri_vqvae.checkpoint import load_prior_checkpoint
from mri_vqvae.distributed import leave_process_group
from mri_vqvae.model.prior import build_prior
from mri_vqvae.train import prior as prior_training
from mri_vqvae.train.loop import NonFiniteTraining
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import free_port, join_test_group
from tests.train.test_prior import (
    GRID,
    NUM_CODES,
    fit_prior,
    patterned_codes,
    prior_config,
    saved_vqvae,
)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_prior_resumed_mid_epoch_restores_its_moving_average(tmp_path: Path, monkeypatch):
    vqvae = saved_vqvae(tmp_path / "vqvae.pt")
    train, val = patterned_codes(24, 1), patterned_codes(8, 2)  # 3 steps an epoch
    base = prior_config(epochs=2, sample_every=0, checkpoint_every=1, ema_decay=0.9)
    config = replace(base, prior=replace(base.prior, dropout=0.2))

    def run(out: Path, resume=None):
        torch.manual_seed(0)
        prior = build_prior(config.prior, NUM_CODES, GRID)
        return fit_prior(prior, train, val, config, out, vqvae, resume=resume)

    straight = run(tmp_path / "straight")
    real_loss, training_calls = prior_training.prior_loss, []

    def crashing_loss(prior, *args):
        if prior.training:
            training_calls.append(1)
            if len(training_calls) == 5:  # the 2nd step of epoch 2
                raise Crash
        return real_loss(prior, *args)

    monkeypatch.setattr(prior_training, "prior_loss", crashing_loss)
    with pytest.raises(Crash):
        run(tmp_path / "crashed")
    monkeypatch.undo()
    crashed = load_prior_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (crashed.progress.step_in_epoch, crashed.progress.global_step) == (1, 4)
    assert crashed.extras["ema"]["updates"] == 4

    resumed = run(tmp_path / "crashed", crashed)
    a = load_prior_checkpoint(straight.last_checkpoint)
    b = load_prior_checkpoint(resumed.last_checkpoint)
    assert a.extras["ema"]["updates"] == b.extras["ema"]["updates"] == 6
    for state_a, state_b in (
        (a.model_state, b.model_state),
        (a.extras["ema"]["weights"], b.extras["ema"]["weights"]),
    ):
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    # Validation scores the moving average, so its figures match only if it was restored.
    assert [row["val_nll_bits"] for row in resumed.history] == [
        row["val_nll_bits"] for row in straight.history
    ]


def test_the_prior_s_non_finite_stop_names_the_prior_s_settings(tmp_path: Path, monkeypatch):
    vqvae = saved_vqvae(tmp_path / "vqvae.pt")
    base = prior_config(epochs=2, sample_every=0)
    config = replace(base, prior_train=replace(base.prior_train, max_nonfinite_steps=3))
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    real_loss = prior_training.prior_loss

    def nan_loss(*args):
        loss, hits, count = real_loss(*args)
        return loss * float("nan"), hits, count

    monkeypatch.setattr(prior_training, "prior_loss", nan_loss)
    with pytest.raises(
        NonFiniteTraining,
        match=r"3 steps in a row .*Lower prior_train\.lr, .* use prior_train\.precision=float32",
    ):
        fit_prior(
            prior, patterned_codes(24, 1), patterned_codes(8, 2), config, tmp_path / "prior", vqvae
        )


def _prior_rank(rank: int, world_size: int, port: int, out: str, vqvae_path: str) -> None:
    processes, _ = join_test_group(rank, world_size, port)
    try:
        prior, result = _train_tiny_prior(Path(out) / "run", Path(vqvae_path), processes)
        state = {"state": prior.state_dict(), "history": result.history}
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        leave_process_group()


def _train_tiny_prior(out: Path, vqvae_path: Path, processes=None):
    # 24 maps in batches of 9: shards of 5 and 4, so the loss scaling is exercised.
    config = prior_config(epochs=2, sample_every=0, batch_size=9)
    vqvae = TrainedVQVAE.load(vqvae_path)
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    options = {} if processes is None else {"processes": processes}
    result = fit_prior(
        prior, patterned_codes(24, 1), patterned_codes(8, 2), config, out, vqvae, **options
    )
    return prior, result


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_prior_processes_agree_and_follow_one_process(tmp_path: Path):
    vqvae_path = tmp_path / "vqvae.pt"
    saved_vqvae(vqvae_path)
    mp.start_processes(
        _prior_rank,
        args=(2, free_port(), str(tmp_path), str(vqvae_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in first["state"]:
        assert torch.equal(first["state"][name], second["state"][name]), name
    single, result = _train_tiny_prior(tmp_path / "single", vqvae_path)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(first["state"][name], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(first["history"], result.history, strict=True):
        assert a["val_nll_bits"] == pytest.approx(b["val_nll_bits"], rel=1e-4)
        assert a["train_nll_bits"] == pytest.approx(b["train_nll_bits"], rel=1e-4)
