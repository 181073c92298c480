"""Stage 2: code maps and their cache, the prior's training loop, resume, and the checks that
keep a prior with the VQ-VAE it was trained on."""

import math
import signal
from dataclasses import replace

import pytest
import torch

from mri_vqvae import runtime
from mri_vqvae.checkpoint import (
    Checkpoint,
    CheckpointError,
    PriorExtras,
    load_checkpoint,
    load_prior_checkpoint,
    save_checkpoint,
)
from mri_vqvae.code_maps import CodeMaps, code_maps_for, encode_slices, require_slice_positions
from mri_vqvae.config import Config, DataConfig, PriorConfig, PriorTrainConfig, load_config
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import ConditionSizes, build_prior
from mri_vqvae.train import prior as prior_training
from mri_vqvae.train.loop import TrainingInterrupted
from mri_vqvae.train.prior import evaluate_prior, train_prior
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE
from tests.helpers import TINY_SIZE, tiny_model_config, vqvae_handle

NUM_CODES = 16
GRID = (16, 8)  # a 64x32 image at 4x


def tiny_vqvae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE.from_config(tiny_model_config(num_embeddings=NUM_CODES)).eval()


def saved_vqvae(path, seed: int = 0) -> TrainedVQVAE:
    """An untrained VQ-VAE for 64x32 slices saved at ``path``, loaded into its handle."""
    model = tiny_vqvae(seed)
    config = Config(
        data=DataConfig(image_size=TINY_SIZE), model=tiny_model_config(num_embeddings=NUM_CODES)
    )
    save_checkpoint(Checkpoint("vqvae", config, model.state_dict()), path)
    return TrainedVQVAE.load(path)


def fit_prior(prior, train: CodeMaps, val: CodeMaps, config: Config, out, vqvae, **options):
    """``train_prior`` with the test's usual arguments."""
    return train_prior(
        prior, train_codes=train, val_codes=val, config=config, run_dir=out, vqvae=vqvae, **options
    )


def patterned_codes(count: int, seed: int) -> CodeMaps:
    """Each map is one random code throughout: after the first, every code is predictable."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, NUM_CODES, (count, 1, 1), generator=generator)
    indices = codes.expand(count, *GRID).clone()
    names = [f"case_{i}_slice_{i % 4}.nii.gz" for i in range(count)]
    positions = torch.tensor([(i % 4) / 3 for i in range(count)])
    return CodeMaps(indices, names, positions, NUM_CODES)


def prior_config(**train) -> Config:
    settings = dict(
        epochs=3,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        final_lr_fraction=1.0,
        sample_every=2,
        num_preview_samples=2,
    )
    settings.update(train)
    return Config(
        prior=PriorConfig(width=32, num_layers=2, num_heads=4, dropout=0.0),
        prior_train=PriorTrainConfig(device="cpu", **settings),
    )


def test_unigram_bits_is_the_histogram_entropy():
    codes = CodeMaps(torch.tensor([[[0, 1], [2, 3]]]), ["a"], torch.tensor([0.0]), 8)
    assert codes.unigram_bits() == pytest.approx(2.0)
    assert patterned_codes(4, 0).code_counts().sum() == 4 * GRID[0] * GRID[1]


def test_code_maps_are_cached_per_vqvae(tmp_path):
    model = tiny_vqvae()
    images = torch.rand(5, 1, 64, 32) * 2 - 1
    names = [f"v_slice_{i}.nii.gz" for i in range(5)]
    slices = SliceSet(images.half(), names, [(64, 32)] * 5, torch.zeros(5, 2))
    cache = tmp_path / "codes" / "train.pt"
    first = code_maps_for(slices, vqvae=vqvae_handle(model, "a" * 64), cache_file=cache)
    assert first.indices.shape == (5, *GRID)
    assert first.indices.dtype == torch.int64
    torch.testing.assert_close(first.slice_positions, torch.linspace(0, 1, 5))
    # The cache is used: a different model with the same hash returns the stored codes.
    other = tiny_vqvae(seed=9)
    again = code_maps_for(slices, vqvae=vqvae_handle(other, "a" * 64), cache_file=cache)
    assert torch.equal(again.indices, first.indices)
    # Another VQ-VAE hash is encoded afresh.
    fresh = code_maps_for(slices, vqvae=vqvae_handle(other, "b" * 64), cache_file=cache)
    assert torch.equal(fresh.indices, encode_slices(other, slices, torch.device("cpu")))


def test_code_maps_are_encoded_again_in_another_precision(tmp_path, monkeypatch):
    from mri_vqvae import runtime

    images = torch.rand(3, 1, 64, 32) * 2 - 1
    slices = SliceSet(images.half(), ["a", "b", "c"], [(64, 32)] * 3, torch.zeros(3, 2))
    cache = tmp_path / "train.pt"
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: False)
    code_maps_for(slices, vqvae=vqvae_handle(tiny_vqvae(), "a" * 64), cache_file=cache)
    assert torch.load(cache, weights_only=True)["stamp"]["precision"] == "float32"
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: True)
    other = tiny_vqvae(seed=9)  # same hash: only the precision tells the caches apart
    again = code_maps_for(slices, vqvae=vqvae_handle(other, "a" * 64), cache_file=cache)
    assert torch.load(cache, weights_only=True)["stamp"]["precision"] == "bfloat16"
    assert torch.equal(again.indices, encode_slices(other, slices, torch.device("cpu")))


def test_bfloat16_encoding_mostly_agrees_with_float32():
    torch.manual_seed(0)
    model = tiny_vqvae()
    slices = SliceSet(
        (torch.rand(8, 1, 64, 32) * 2 - 1).half(),
        list("abcdefgh"),
        [(64, 32)] * 8,
        torch.zeros(8, 2),
    )
    exact = encode_slices(model, slices, torch.device("cpu"), precision="float32")
    fast = encode_slices(model, slices, torch.device("cpu"), precision="bfloat16")
    assert exact.shape == fast.shape
    assert (exact == fast).float().mean() > 0.8


def test_conditioning_needs_slice_numbers_in_names():
    codes = CodeMaps(
        torch.zeros(2, 2, 2, dtype=torch.long),
        ["a.nii", "b_slice_1.nii"],
        torch.tensor([math.nan, 0.5]),
        4,
    )
    with pytest.raises(ValueError, match=r"\(a\.nii\)"):
        require_slice_positions(codes, "train split")


def test_prior_learns_patterned_codes_and_writes_its_run(tmp_path, monkeypatch):
    vqvae_path = tmp_path / "vqvae.pt"
    vqvae = saved_vqvae(vqvae_path)
    train, val = patterned_codes(48, 1), patterned_codes(16, 2)
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: False)
    config = prior_config(epochs=10, sample_every=5, precision="auto")
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    run = tmp_path / "prior"
    result = fit_prior(prior, train, val, config, run, vqvae)
    final = result.history[-1]
    assert final["val_nll_bits"] < 0.7 * final["val_unigram_bits"]
    assert final["val_nll_bits"] < result.history[0]["val_nll_bits"]
    for name in ("best.pt", "last.pt", "metrics.csv", "nll_curves.png", "config.yaml"):
        assert (run / name).is_file(), name
    # The run records what "auto" became on this machine.
    assert load_config(run / "config.yaml").prior_train.precision == "float32"
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "epoch_10.png",
        "epoch_5.png",
    ]
    loaded = TrainedPrior.load(run / "best.pt", vqvae=vqvae)
    assert loaded.extras.grid_shape == GRID
    best = evaluate_prior(loaded.model, val, torch.device("cpu"))
    checkpoint = load_prior_checkpoint(run / "best.pt")
    assert best.nll_bits == pytest.approx(checkpoint.progress.best_score, rel=1e-5)


@pytest.mark.parametrize("architecture", ["transformer", "masked"])
def test_resumed_prior_matches_an_uninterrupted_run(tmp_path, architecture):
    vqvae_path = tmp_path / "vqvae.pt"
    vqvae = saved_vqvae(vqvae_path)
    train, val = patterned_codes(24, 1), patterned_codes(8, 2)

    def run(config, out, resume=None):
        torch.manual_seed(0)
        config = replace(config, prior=replace(config.prior, architecture=architecture))
        prior = build_prior(config.prior, NUM_CODES, GRID)
        return fit_prior(prior, train, val, config, out, vqvae, resume=resume)

    straight = run(prior_config(epochs=2, sample_every=0), tmp_path / "straight")
    run(prior_config(epochs=1, sample_every=0), tmp_path / "resumed")
    first_half = load_prior_checkpoint(tmp_path / "resumed" / "last.pt")
    resumed = run(prior_config(epochs=2, sample_every=0), tmp_path / "resumed", first_half)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    a = load_prior_checkpoint(straight.last_checkpoint)
    b = load_prior_checkpoint(resumed.last_checkpoint)
    # The weights, and their moving average, are exactly those of the uninterrupted run.
    for state_a, state_b in (
        (a.model_state, b.model_state),
        (a.extras["ema"]["weights"], b.extras["ema"]["weights"]),
    ):
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)
    assert a.extras["ema"]["updates"] == b.extras["ema"]["updates"] > 0


def test_a_prior_refuses_another_vqvae(tmp_path):
    vqvae_path, other_path = tmp_path / "vqvae.pt", tmp_path / "other.pt"
    vqvae = saved_vqvae(vqvae_path)
    other = saved_vqvae(other_path, seed=5)
    config = prior_config(epochs=1, sample_every=0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    fit_prior(
        prior, patterned_codes(8, 1), patterned_codes(8, 2), config, tmp_path / "prior", vqvae
    )
    with pytest.raises(CheckpointError, match="trained on the codes of the VQ-VAE"):
        TrainedPrior.load(tmp_path / "prior" / "best.pt", vqvae=other)
    # Nor can the two kinds of checkpoint be confused.
    with pytest.raises(CheckpointError, match="is a prior checkpoint"):
        load_checkpoint(tmp_path / "prior" / "best.pt", "vqvae")
    with pytest.raises(CheckpointError, match="is a vqvae checkpoint"):
        load_prior_checkpoint(vqvae_path)


def test_a_prior_stopped_by_a_signal_inside_an_epoch_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch
):
    vqvae_path = tmp_path / "vqvae.pt"
    vqvae = saved_vqvae(vqvae_path)
    train, val = patterned_codes(24, 1), patterned_codes(8, 2)
    base = prior_config(epochs=2, sample_every=0)
    # Dropout on, so the restored random state matters.
    config = replace(base, prior=replace(base.prior, dropout=0.2))

    def run(out, resume=None):
        torch.manual_seed(0)
        prior = build_prior(config.prior, NUM_CODES, GRID)
        return fit_prior(prior, train, val, config, out, vqvae, resume=resume)

    straight = run(tmp_path / "straight")
    real_loss, training_calls = prior_training.prior_loss, []

    def loss_then_signal(prior, *args):
        if prior.training:
            training_calls.append(1)
            if len(training_calls) == 5:  # the 2nd of 3 steps of epoch 2, as Ctrl-C would
                signal.raise_signal(signal.SIGINT)
        return real_loss(prior, *args)

    monkeypatch.setattr(prior_training, "prior_loss", loss_then_signal)
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped before step 3"):
        run(tmp_path / "stopped")
    monkeypatch.setattr(prior_training, "prior_loss", real_loss)
    stopped = load_prior_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (
        stopped.progress.epoch,
        stopped.progress.step_in_epoch,
        stopped.progress.global_step,
    ) == (1, 2, 5)
    resumed = run(tmp_path / "stopped", stopped)
    a = load_prior_checkpoint(straight.last_checkpoint)
    b = load_prior_checkpoint(resumed.last_checkpoint)
    assert not b.progress.mid_epoch and b.progress.global_step == a.progress.global_step == 6
    for key in a.model_state:
        torch.testing.assert_close(a.model_state[key], b.model_state[key], rtol=0, atol=0)
    for column in ("train_nll_bits", "val_nll_bits"):  # the partial epoch's sums carried over
        assert [r[column] for r in resumed.history] == pytest.approx(
            [r[column] for r in straight.history], rel=1e-9
        )


@pytest.mark.slow
def test_a_masked_prior_learns_and_is_sampled_from_its_averaged_weights(tmp_path):
    vqvae_path = tmp_path / "vqvae.pt"
    vqvae = saved_vqvae(vqvae_path)
    train, val = patterned_codes(48, 1), patterned_codes(16, 2)
    config = prior_config(epochs=12, sample_every=0, ema_decay=0.9)
    config = replace(config, prior=replace(config.prior, architecture="masked"))
    torch.manual_seed(0)
    prior = build_prior(config.prior, NUM_CODES, GRID)
    cpu = torch.device("cpu")
    result = fit_prior(prior, train, val, config, tmp_path / "p", vqvae)
    final = result.history[-1]
    # Every masked code of a one-code map follows from any code left visible.
    assert final["val_nll_bits"] < final["val_unigram_bits"]
    assert final["val_nll_bits"] < result.history[0]["val_nll_bits"] - 1
    loaded = TrainedPrior.load(result.best_checkpoint, vqvae=vqvae)
    checkpoint = load_prior_checkpoint(result.best_checkpoint)
    averaged = loaded.extras.ema["weights"]
    assert loaded.extras.ema["updates"] > 0
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, averaged[key])
    assert any(not torch.equal(averaged[k], v) for k, v in checkpoint.model_state.items())
    score = evaluate_prior(loaded.model, val, cpu, seed=config.prior_train.seed)
    assert score.nll_bits == pytest.approx(checkpoint.progress.best_score, rel=1e-5)


def test_a_prior_trains_on_labels_and_augmented_maps(tmp_path):
    vqvae_path = tmp_path / "vqvae.pt"
    vqvae = saved_vqvae(vqvae_path)
    train, val = patterned_codes(16, 1), patterned_codes(8, 2)
    # Two augmented copies of every map, told apart by their parameters.
    copies = CodeMaps(
        train.indices.repeat(3, 1, 1),
        train.names * 3,
        train.slice_positions.repeat(3),
        NUM_CODES,
        augmentation=torch.cat([torch.zeros(16, 2), torch.rand(32, 2)]),
        source=torch.arange(16).repeat(3),
        labels=torch.arange(16).remainder(2).add(1).repeat(3)[:, None],
    )
    val.labels = torch.ones(8, 1, dtype=torch.long)
    config = prior_config(epochs=1, sample_every=1, condition_dropout=0.5)
    config = replace(config, prior=replace(config.prior, condition_on_slice_position=True))
    sizes = ConditionSizes(position=True, labels=(2,), augmentation=2)
    prior = build_prior(config.prior, NUM_CODES, GRID, sizes)
    vocabulary = (("side", ("left", "right")),)
    result = fit_prior(
        prior, copies, val, config, tmp_path / "p", vqvae, label_vocabulary=vocabulary
    )
    checkpoint = load_prior_checkpoint(result.last_checkpoint)
    extras = PriorExtras.from_plain(checkpoint.extras)
    assert extras.condition_sizes == sizes
    assert extras.label_vocabulary == vocabulary
    # The training distribution of conditions counts each slice once, not each copy.
    assert len(extras.training_conditions.position) == 16
    assert extras.training_conditions.labels[:, 0].tolist() == [1, 2] * 8
    assert (tmp_path / "p" / "samples" / "epoch_1.png").is_file()
