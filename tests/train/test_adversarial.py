"""The VQ-VAE's adversarial term inside the one training loop: off until its start step, the
discriminator trained beside the VQ-VAE and kept in every checkpoint, so resume stays exact,
and best.pt chosen among the epochs it shaped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.data.dataset import load_splits, resolve_split_files
from mri_vqvae.distributed import leave_process_group
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import RunFolder
from mri_vqvae.model import VQVAE
from mri_vqvae.model.discriminator import PatchDiscriminator
from mri_vqvae.train import vqvae as training
from mri_vqvae.train.adversarial import DISCRIMINATOR_STATE, AdversarialTerm
from mri_vqvae.train.vqvae import VQVAETask, compute_loss
from tests.helpers import (
    TINY_SIZE,
    fit_vqvae,
    free_port,
    join_test_group,
    tiny_config,
    tiny_splits,
    train_tiny_vqvae,
)

CPU = torch.device("cpu")


def adversarial_config(**changes):
    settings = dict(adversarial_weight=0.5, adversarial_start_step=4, discriminator_channels=8)
    settings.update(changes)
    return tiny_config(**settings)


def discriminator_weights(task: VQVAETask) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.adversarial.discriminator.state_dict().items()}


def test_the_term_is_exactly_zero_before_its_start_step_and_trains_the_discriminator_after(
    phantom_root: Path, tmp_path: Path
):
    data = tiny_splits(phantom_root)
    config = adversarial_config(precision="float32")
    torch.manual_seed(0)
    model = VQVAE.from_config(config.model)
    task = VQVAETask(
        model,
        train_set=data["train"],
        val_set=data["val"],
        config=config,
        run=RunFolder(tmp_path),
        device=CPU,
    )
    rows = torch.arange(8)

    task.global_step = 3  # the last step before the start
    before = discriminator_weights(task)
    total, (images, loss, output) = task.loss(rows)
    assert loss.adversarial == 0 and loss.adversarial_weight == 0
    torch.testing.assert_close(total, compute_loss(output, images, config.train).total)
    task.after_step()
    for name, weight in discriminator_weights(task).items():
        assert torch.equal(weight, before[name]), name  # not trained before the start

    task.global_step = 4
    total, (images, loss, output) = task.loss(rows)
    plain = compute_loss(output, images, config.train).total
    assert loss.adversarial_weight > 0
    torch.testing.assert_close(total, plain + loss.adversarial_weight * loss.adversarial)
    # The term reaches the decoder through the discriminator, and leaves the
    # discriminator's own weights alone (their update is the discriminator's step).
    (towards_decoder,) = torch.autograd.grad(
        loss.adversarial, model.last_decoder_weight, retain_graph=True
    )
    assert towards_decoder.abs().sum() > 0
    total.backward()
    assert all(p.grad is None for p in task.adversarial.discriminator.parameters())
    task.after_step()
    changed = discriminator_weights(task)
    assert any(not torch.equal(changed[name], before[name]) for name in before)


def test_the_decoders_term_ramps_up_after_the_start_while_the_discriminator_learns():
    settings = adversarial_config(adversarial_warmup_steps=3).train  # start at step 4
    term = AdversarialTerm(settings, (1, *TINY_SIZE), CPU)
    assert [term.ramp(step) for step in range(3, 9)] == [0, 0.25, 0.5, 0.75, 1, 1]
    immediate = AdversarialTerm(adversarial_config(adversarial_warmup_steps=0).train,
                                (1, *TINY_SIZE), CPU)  # fmt: skip
    assert immediate.ramp(4) == 1


def test_a_faint_discriminator_gradient_is_not_scaled_up_past_the_bound():
    # The reconstructions hang on `last` by a thread, so the discriminator's gradient there is
    # faint beside the reconstruction loss's and the unbounded ratio would be huge.
    last = torch.ones(1, 1, *TINY_SIZE, requires_grad=True)
    reconstructions = torch.rand(2, 1, *TINY_SIZE) * 2 - 1 + 1e-6 * last
    reconstruction_loss = 1000 * last.sum()
    weights = []
    for bound in (0.1, 5.0):
        settings = adversarial_config(adaptive_weight_max=bound, adversarial_warmup_steps=0)
        term = AdversarialTerm(settings.train, (1, *TINY_SIZE), CPU)
        _, weight = term.generator_loss(reconstructions, reconstruction_loss, last, 4)
        weights.append(weight.item())
    # adversarial_weight 0.5 times the bound, full ramp at the start without warm-up.
    assert weights == pytest.approx([0.05, 2.5])


def test_a_discriminator_too_deep_for_the_slices_is_refused_before_training():
    with pytest.raises(ConfigError, match="discriminator_layers=5 halves 64x32 slices"):
        AdversarialTerm(adversarial_config(discriminator_layers=5).train, (1, *TINY_SIZE), CPU)


def test_best_checkpoint_follows_the_newest_epoch_once_the_term_has_started(
    phantom_root: Path, tmp_path: Path
):
    data = tiny_splits(phantom_root)
    config = adversarial_config()
    model = VQVAE.from_config(config.model)
    task = VQVAETask(
        model,
        train_set=data["train"],
        val_set=data["val"],
        config=config,
        run=RunFolder(tmp_path),
        device=CPU,
    )
    # An epoch whose last step (global step 3) came before the start ranks behind any after;
    # after it, the newer epoch wins whatever its validation loss.
    before = task.score({"global_step": 4, "val_loss": 0.1})
    after = task.score({"global_step": 5, "val_loss": 0.9})
    newer = task.score({"global_step": 8, "val_loss": 2.0})
    assert newer < after < before
    assert task.score({"global_step": 3, "val_loss": 0.05}) < before  # by val_loss before
    plain = VQVAETask(
        model,
        train_set=data["train"],
        val_set=data["val"],
        config=tiny_config(),
        run=RunFolder(tmp_path),
        device=CPU,
    )
    assert plain.score({"global_step": 4, "val_loss": 0.1}) == 0.1


class Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_across_the_start_step_ends_exactly_as_a_run_that_never_stopped(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    data = tiny_splits(phantom_root)
    # 24 slices in batches of 8: 3 steps an epoch; the term starts at the 2nd step of epoch 2.
    config = adversarial_config(epochs=3, batch_size=8, checkpoint_every=1)
    straight = train_tiny_vqvae(config, data, tmp_path / "straight")
    assert straight.history[0]["train_adversarial_loss"] is None  # epoch 1 ran without it
    assert isinstance(straight.history[-1]["train_discriminator_loss"], float)
    # Once the term is on, best.pt follows the newest epoch.
    assert load_checkpoint(tmp_path / "straight" / "best.pt").progress.global_step == 9

    real_loss, calls = training.VQVAETask.loss, []

    def crash_at(call: int):
        def crashing_loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                raise Crash
            return real_loss(*args, **kwargs)

        calls.clear()
        monkeypatch.setattr(training.VQVAETask, "loss", crashing_loss)

    crash_at(3)  # the 3rd step: the checkpoint holds steps 0-1, before the term starts
    with pytest.raises(Crash):
        train_tiny_vqvae(config, data, tmp_path / "crashed")
    checkpoint = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert checkpoint.progress.global_step == 2
    crash_at(4)  # resumed at step 2: a mid-epoch checkpoint after step 4, the term's first
    with pytest.raises(Crash):
        train_tiny_vqvae(config, data, tmp_path / "crashed", resume=checkpoint)
    checkpoint = load_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (checkpoint.progress.global_step, checkpoint.progress.step_in_epoch) == (5, 2)
    step_sums = checkpoint.progress.epoch_progress["step_sums"]
    assert step_sums.shape == (2, 8) and step_sums[:, -1].tolist() == [0.0, 1.0]
    monkeypatch.setattr(training.VQVAETask, "loss", real_loss)
    train_tiny_vqvae(config, data, tmp_path / "crashed", resume=checkpoint)

    ends = [load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "crashed")]
    for name, weight in ends[0].model_state.items():
        assert torch.equal(weight, ends[1].model_state[name]), name
    discriminators = [end.extras[DISCRIMINATOR_STATE] for end in ends]
    for name, weight in discriminators[0]["weights"].items():
        assert torch.equal(weight, discriminators[1]["weights"][name]), name
    for column in ("train_loss", "val_loss", "train_adversarial_loss", "train_discriminator_loss"):
        figures = [[row[column] for row in end.progress.history] for end in ends]
        for resumed, uninterrupted in zip(figures[1], figures[0], strict=True):
            assert resumed == uninterrupted or resumed == pytest.approx(uninterrupted), column


def train_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ["MRI_VQVAE_CACHE"] = str(Path(out) / f"cache{rank}")
    processes, device = join_test_group(rank, world_size, port)
    tasks = []
    original_init = training.VQVAETask.__init__

    def keep_task(task, *args, **kwargs):
        original_init(task, *args, **kwargs)
        tasks.append(task)

    training.VQVAETask.__init__ = keep_task  # a spawned process of its own: nothing to undo
    try:
        config = adversarial_config(epochs=2, batch_size=9, precision="float32")
        data = load_splits(resolve_split_files(root), config.data, splits=("train", "val"))
        torch.manual_seed(config.train.seed)
        model = VQVAE.from_config(config.model)
        fit_vqvae(model, data, config, Path(out) / "run", device=device, processes=processes)
        discriminator = tasks[0].adversarial.discriminator.state_dict()
        torch.save(
            {"vqvae": model.state_dict(), "discriminator": discriminator},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        leave_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_ranks_keep_identical_vqvaes_and_discriminators(phantom_root: Path, tmp_path: Path):
    mp.start_processes(
        train_rank,
        args=(2, free_port(), str(phantom_root), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for part in ("vqvae", "discriminator"):
        for name, weight in ranks[0][part].items():
            assert torch.equal(weight, ranks[1][part][name]), (part, name)
    # 24 slices in batches of 9: 3 steps an epoch; the term ran from step 4, in epoch 2.
    history = load_checkpoint(tmp_path / "run" / "last.pt").progress.history
    assert history[0]["train_adversarial_loss"] is None
    assert isinstance(history[1]["train_discriminator_loss"], float)
    with torch.random.fork_rng(devices=[]):  # as AdversarialTerm draws it
        torch.manual_seed(adversarial_config().train.seed)
        initial = PatchDiscriminator(1, 8, 3).state_dict()["layers.0.weight"]
    assert not torch.equal(ranks[0]["discriminator"]["layers.0.weight"], initial)  # trained
