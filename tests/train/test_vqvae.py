import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.checkpoint import build_model, load_checkpoint, read_data_reference
from mri_vqvae.config import Config, DataConfig, TrainConfig
from mri_vqvae.data.dataset import SliceSet, load_splits, resolve_split_files
from mri_vqvae.errors import UserError
from mri_vqvae.model import VQVAE
from mri_vqvae.train.schedule import learning_rate
from mri_vqvae.train.vqvae import train_step, train_vqvae
from tests.helpers import TINY_SIZE, fit_vqvae, tiny_config


def splits(root: Path):
    return load_splits(resolve_split_files(root), DataConfig(image_size=TINY_SIZE))


def test_loss_falls_on_one_batch(phantom_root: Path):
    torch.manual_seed(0)
    images = splits(phantom_root)["train"].batch(slice(0, 8))
    config = tiny_config()
    model = VQVAE.from_config(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = [
        train_step(model, optimizer, images, config.train)[0].reconstruction.item()
        for _ in range(40)
    ]
    assert losses[-1] < 0.5 * losses[0]


def run(config: Config, data, out: Path, resume=None):
    torch.manual_seed(config.train.seed)
    model = build_model(resume) if resume else VQVAE.from_config(config.model)
    return fit_vqvae(model, data, config, out, resume=resume)


def test_run_folder_contents(phantom_root: Path, tmp_path: Path):
    result = run(tiny_config(), splits(phantom_root), tmp_path / "run")
    run_dir = result.run_dir
    for name in (
        "best.pt",
        "last.pt",
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "ssim_scores.png",
        "batch_losses.png",
    ):
        assert (run_dir / name).is_file(), name
    for epoch in (1, 2):
        for folder in ("train", "val", "comparison"):
            assert (run_dir / "reconstructions" / folder / f"epoch_{epoch}.png").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert 0 < row["val_codebook_usage"] <= 1 and row["val_perplexity"] >= 1
        assert -1 <= row["val_ssim"] <= 1 and row["train_loss"] > 0
    assert rows[-1]["images_seen"] == 2 * 24
    assert len(load_checkpoint(run_dir / "last.pt").extras["batch_losses"]) == 2 * 3
    # The training slices' geometry and scale travel with the model, for its samples.
    reference = read_data_reference(load_checkpoint(run_dir / "best.pt"), "best.pt")
    assert reference.shape == (64, 32) and reference.num_slices == reference.geometry_count == 24
    np.testing.assert_allclose(reference.geometry.affine, np.diag([1.5625, 1.5625, 3.0, 1.0]))
    assert 0 <= reference.intensity_range[0] < 100 < reference.intensity_range[1]


def test_time_budget_stops_and_still_writes_everything(phantom_root: Path, tmp_path: Path):
    config = tiny_config(epochs=50, max_minutes=1e-6)
    result = run(config, splits(phantom_root), tmp_path / "run")
    assert result.stopped_by_time_budget
    assert len(result.history) == 1 and result.history[0]["images_seen"] == 8
    assert (tmp_path / "run" / "best.pt").is_file() and (
        tmp_path / "run" / "ssim_scores.png"
    ).is_file()


def test_resume_matches_an_uninterrupted_run(phantom_root: Path, tmp_path: Path):
    data = splits(phantom_root)
    straight = run(tiny_config(epochs=3), data, tmp_path / "straight")
    run(tiny_config(epochs=2), data, tmp_path / "resumed")
    checkpoint = load_checkpoint(tmp_path / "resumed" / "last.pt")
    checkpoint.config = replace(checkpoint.config, train=replace(checkpoint.config.train, epochs=3))
    resumed = run(checkpoint.config, data, tmp_path / "resumed", resume=checkpoint)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    final_straight = load_checkpoint(straight.last_checkpoint).model_state
    final_resumed = load_checkpoint(resumed.last_checkpoint).model_state
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=0, atol=0, msg=key)


def test_indivisible_slices_are_refused_before_the_run_folder_exists(tmp_path: Path):
    odd = SliceSet(
        torch.zeros(2, 1, 62, 32, dtype=torch.float16),
        ["a", "b"],
        [(62, 32)] * 2,
        torch.zeros(2, 2, dtype=torch.float64),
    )
    model = VQVAE.from_config(tiny_config().model)
    with pytest.raises(UserError, match=r"divisible by 4.*data\.image_size"):
        train_vqvae(
            model,
            train_set=odd,
            val_set=odd,
            config=tiny_config(),
            run_dir=tmp_path / "run",
            device=torch.device("cpu"),
        )
    assert not (tmp_path / "run").exists()


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    settings = TrainConfig(lr=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    rates = [learning_rate(settings, step, 110) for step in range(110)]
    torch.testing.assert_close(rates[0], 1e-4)
    torch.testing.assert_close(rates[9], 1e-3)  # warm-up ends at the full rate
    torch.testing.assert_close(rates[60], 1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    torch.testing.assert_close(learning_rate(settings, 110, 110), 1e-4)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))


def test_learning_rate_anneals_by_the_time_budget_when_that_comes_first():
    settings = TrainConfig(lr=1e-3, warmup_steps=0, final_lr_fraction=0.0)
    torch.testing.assert_close(learning_rate(settings, 10, 10_000, time_used=0.5), 0.5e-3)
    torch.testing.assert_close(learning_rate(settings, 10, 10_000, time_used=1.0), 0.0)


def test_constant_schedule():
    settings = TrainConfig(lr=3e-4, lr_schedule="constant", warmup_steps=50)
    assert {learning_rate(settings, step, 100, 0.5) for step in range(100)} == {3e-4}


def test_bfloat16_training_step_keeps_float32_weights_and_codebook(phantom_root: Path):
    torch.manual_seed(0)
    images = splits(phantom_root)["train"].batch(slice(0, 8))
    config = tiny_config(precision="bfloat16")
    model = VQVAE.from_config(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss, output, _ = train_step(model, optimizer, images, config.train)
    assert output.reconstruction.dtype == torch.bfloat16 and loss.total.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.quantizer.codebook.dtype == torch.float32 and model.quantizer.initialized
