"""The workflows are the library's whole commands: a notebook gets what the CLI does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mri_vqvae import workflows
from mri_vqvae.config import DataConfig, load_config
from mri_vqvae.data.dataset import load_split
from mri_vqvae.errors import UserError
from mri_vqvae.train.texture import attach_texture
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import TINY_MODEL

pytestmark = pytest.mark.slow


def test_a_run_and_its_evaluation_from_the_library_with_default_arguments(
    phantom_root: Path, tmp_path: Path
):
    data = workflows.DataSources(root=phantom_root)
    overrides = ["data.image_size=[64, 32]", "train.epochs=1", "train.batch_size=8"]
    overrides += ["train.device=cpu", "train.report=false", "train.seed=7", *TINY_MODEL]
    result = workflows.train_vqvae_run(tmp_path / "run", data, load_config(overrides=overrides))
    assert result is not None and result.best_checkpoint.is_file()
    best = result.best_checkpoint
    assert result.wrote_best
    assert TrainedVQVAE.load(best).texture is not None  # fitted after training
    # A texture already there is not refitted: the file, and so its hash, stays as it is.
    before = TrainedVQVAE.load(best).sha256
    train_set = load_split(data.files()["train"], DataConfig(image_size=(64, 32)))
    config = load_config(overrides=overrides)
    attach_texture(best, train_set=train_set, config=config, device=torch.device("cpu"))
    assert TrainedVQVAE.load(best).sha256 == before
    summary = workflows.evaluate_checkpoint(result.best_checkpoint, data, tmp_path / "eval")
    assert summary.n_images == 8 and summary.split == "test"
    # Scored beside the plain mean (an undertrained decoder's bias the texture's bins correct,
    # so which is higher depends on the model).
    assert math.isfinite(summary.textured_psnr_mean)
    assert summary.textured_psnr_mean != summary.psnr_mean
    with pytest.raises(UserError, match="already holds"):
        workflows.evaluate_checkpoint(result.best_checkpoint, data, tmp_path / "eval")


def test_guidance_needs_a_prior_that_learned_the_unconditional_model(caplog):
    from mri_vqvae.checkpoint import PriorExtras
    from mri_vqvae.config import SampleConfig
    from mri_vqvae.generate.conditions import check_sampler_settings
    from mri_vqvae.model.prior import ConditionSizes

    positioned = PriorExtras(16, (4, 3), "0" * 64, "v.pt", ConditionSizes(position=True))
    plain = PriorExtras(16, (4, 3), "0" * 64, "v.pt")
    guided = SampleConfig(guidance=2.0)
    with pytest.raises(ValueError, match=r"prior_train\.condition_dropout was 0"):
        check_sampler_settings(positioned, guided, condition_dropout=0.0, autoregressive=True)
    # Guidance 1 needs no unconditional model.
    check_sampler_settings(positioned, SampleConfig(), condition_dropout=0.0, autoregressive=True)
    steps = SampleConfig(guidance=2.0, decoding_steps=4)
    check_sampler_settings(positioned, steps, condition_dropout=0.1, autoregressive=True)
    assert "decoding_steps has no effect on an autoregressive prior" in caplog.text
    assert "guidance has no effect" not in caplog.text
    check_sampler_settings(plain, guided, condition_dropout=0.1, autoregressive=False)
    assert "guidance has no effect" in caplog.text


def test_resuming_leaves_a_best_checkpoint_it_did_not_rewrite_alone(
    phantom_root: Path, tmp_path: Path
):
    data = workflows.DataSources(root=phantom_root)
    overrides = ["data.image_size=[64, 32]", "train.epochs=1", "train.batch_size=8"]
    overrides += ["train.device=cpu", "train.report=false", *TINY_MODEL]
    run = tmp_path / "run"
    config = load_config(overrides=[*overrides, "train.texture_slices=0"])
    result = workflows.train_vqvae_run(run, data, config)
    best = result.best_checkpoint
    assert TrainedVQVAE.load(best).texture is None
    before = TrainedVQVAE.load(best).sha256
    # Resumed with the texture on but nothing left to train: best.pt, and so the hash a prior
    # trained on it records, stays as it is.
    resumed = workflows.train_vqvae_run(
        run, data, resume=True, overrides=["train.texture_slices=512"]
    )
    assert not resumed.wrote_best
    assert TrainedVQVAE.load(best).sha256 == before


def test_training_that_would_not_fit_in_memory_is_refused_with_the_estimate(
    phantom_root: Path, tmp_path: Path, monkeypatch, capsys
):
    from mri_vqvae.cli.main import main
    from tests.helpers import train_args

    # A machine of 1 MiB: the tiny model's estimate at the slices' real size exceeds it.
    monkeypatch.setattr(workflows, "physical_memory_bytes", lambda: 2**20)
    assert main(train_args(phantom_root, tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert "would need about" in error and "more than the 1.0 MiB" in error
    assert not (tmp_path / "run" / "last.pt").exists()
