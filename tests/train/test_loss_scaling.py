"""float16 training's loss scaler in the loop's optimisation step: scaled and unscaled steps
update alike, an overflow skips the update and lowers the scale, and clipping sees the true
gradient. The CUDA tests (tests/test_cuda.py) run the same through whole float16 runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.train import vqvae as training
from mri_vqvae.train.loop import GRADIENT_SCALER_STATE, optimisation_step
from tests.helpers import tiny_config, tiny_splits, train_tiny_vqvae


@pytest.fixture
def float16_on_cpu(monkeypatch):
    """float16 is refused on a CPU (it is for CUDA GPUs); this lets it through, to run the
    loop's scaler on a CPU, where torch's float16 autocast works, slowly."""
    choose = training.precision_choice
    monkeypatch.setattr(
        training,
        "precision_choice",
        lambda precision, *args: (
            (precision, "float16 on a CPU, for the test")
            if precision == "float16"
            else choose(precision, *args)
        ),
    )


def linear_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def step(model, loss_of, clip=None, scaler=None) -> bool:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.arange(8.0).reshape(2, 4)
    return optimisation_step(
        model, optimizer, loss_of(model(inputs)), grad_clip_norm=clip, loss_scale=1.0, scaler=scaler
    )


def test_a_scaled_step_updates_as_an_unscaled_one_and_clips_the_true_gradient():
    for clip in (None, 0.5):
        plain, scaled = linear_model(), linear_model()
        scaler = torch.amp.GradScaler("cpu")
        assert step(plain, lambda out: out.pow(2).mean(), clip)
        assert step(scaled, lambda out: out.pow(2).mean(), clip, scaler)
        # The scale is a power of two, so scaling and unscaling are exact.
        for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
            assert torch.equal(a, b)
        assert scaler.get_scale() == 2.0**16


def test_an_overflow_skips_the_update_and_halves_the_scale():
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    # Finite as it is, but past float32's range once multiplied by the scale of 2**16.
    assert not step(model, lambda out: out.sum() * 1e34, scaler=scaler)
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)
    assert scaler.get_scale() == 2.0**15
    # The next, ordinary step goes through at the lowered scale.
    assert step(model, lambda out: out.pow(2).mean(), scaler=scaler)
    assert not torch.equal(before[0], model.weight)


@pytest.mark.slow
def test_a_float16_run_resumed_keeps_its_loss_scale_and_ends_as_one_never_stopped(
    phantom_root: Path, tmp_path: Path, float16_on_cpu
):
    data = tiny_splits(phantom_root)
    straight = train_tiny_vqvae(tiny_config(precision="float16"), data, tmp_path / "straight")
    assert all(math.isfinite(row["train_loss"]) for row in straight.history)
    train_tiny_vqvae(tiny_config(precision="float16", epochs=1), data, tmp_path / "stopped")
    halfway = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert halfway.extras[GRADIENT_SCALER_STATE]["_growth_tracker"] == 3  # 3 steps an epoch
    train_tiny_vqvae(tiny_config(precision="float16"), data, tmp_path / "stopped", halfway)
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    assert a.extras[GRADIENT_SCALER_STATE] == b.extras[GRADIENT_SCALER_STATE]
    assert b.extras[GRADIENT_SCALER_STATE]["_growth_tracker"] == 6
    for name, weight in a.model_state.items():
        assert torch.equal(weight, b.model_state[name]), name


@pytest.mark.slow
def test_loss_scaler_overflows_are_skipped_without_stopping_the_run(
    phantom_root: Path, tmp_path: Path, float16_on_cpu, monkeypatch
):
    from mri_vqvae.train import loop

    # A scale so large that the first steps' gradients overflow float32 as well.
    monkeypatch.setattr(
        loop,
        "gradient_scaler",
        lambda device, precision: torch.amp.GradScaler("cpu", init_scale=2.0**127),
    )
    config = tiny_config(precision="float16", epochs=2, max_nonfinite_steps=1)
    result = train_tiny_vqvae(config, tiny_splits(phantom_root), tmp_path / "run")
    skipped = sum(row["train_skipped_steps"] for row in result.history)
    # More overflows in a row than max_nonfinite_steps, yet the run ran to its end: an
    # overflow is the scaler's routine, not a fault.
    assert skipped > config.train.max_nonfinite_steps and len(result.history) == 2
    scale = load_checkpoint(tmp_path / "run" / "last.pt").extras[GRADIENT_SCALER_STATE]["scale"]
    assert scale <= 2.0**127 / 2**skipped
