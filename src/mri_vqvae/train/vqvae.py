"""Stage 1: the VQ-VAE as a task of the one training loop (:mod:`mri_vqvae.train.loop`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mri_vqvae import plots
from mri_vqvae.checkpoint import (
    BATCH_LOSSES,
    DATA_REFERENCE,
    Checkpoint,
    CheckpointError,
    load_weights,
    read_training_data,
)
from mri_vqvae.config import Config, TrainConfig
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.data.fingerprint import (
    TRAINING_DATA,
    check_resumed_data,
    fingerprints_of,
    fingerprints_to_plain,
)
from mri_vqvae.data.reference import data_reference
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup, data_parallel
from mri_vqvae.files import RunFolder, epoch_picture
from mri_vqvae.losses import VQVAELoss, ms_ssim_window, vqvae_loss
from mri_vqvae.metrics import codebook_usage, perplexity, psnr_per_image, ssim_per_image
from mri_vqvae.model import VQVAE, VQVAEOutput
from mri_vqvae.records.training import VQVAEEpoch, columns
from mri_vqvae.runtime import autocast, precision_choice
from mri_vqvae.train.adversarial import DISCRIMINATOR_STATE, AdversarialTerm
from mri_vqvae.train.loop import FitResult, StepSums, TrainingTask, fit, optimisation_step
from mri_vqvae.train.tensorboard import TensorBoardLog
from mri_vqvae.trained import check_slice_sizes

logger = logging.getLogger(__name__)

# Added to the validation score of epochs that end before the adversarial term starts, so that
# any epoch after it ranks first (validation losses are far below this).
_BEFORE_ADVERSARIAL_PENALTY = 1e6

# The VQ-VAE's columns of metrics.csv, in order: the fields of its epoch record.
METRIC_COLUMNS = columns(VQVAEEpoch)

# What each training step adds up (the loop keeps them by these names): the training loss,
# reconstruction loss and SSIM summed over the step's images, and the image count; with the
# adversarial term on, its loss, its weight and the discriminator's loss, and a 1 that counts
# the steps that had it.
STEP_SUMS = (
    "loss",
    "reconstruction_loss",
    "ssim",
    "images",
    "adversarial_loss",
    "adversarial_weight",
    "discriminator_loss",
    "adversarial_steps",
)


def compute_loss(
    model_output: VQVAEOutput, images: torch.Tensor, settings: TrainConfig
) -> VQVAELoss:
    """The training objective ``settings`` describe, for one forward pass."""
    return vqvae_loss(
        images,
        model_output.reconstruction,
        model_output.quantization_loss,
        pixel_loss=settings.pixel_loss,
        ssim_loss=settings.ssim_loss,
        ssim_weight=settings.ssim_loss_weight,
        spectral_weight=settings.spectral_loss_weight,
    )


class TrainStep(NamedTuple):
    """One optimisation step: the loss, the forward pass, and whether the update was applied
    (False when the loss or gradient was not finite and the step was skipped)."""

    loss: VQVAELoss
    output: VQVAEOutput
    applied: bool


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    settings: TrainConfig,
    loss_scale: float = 1.0,
) -> TrainStep:
    """One optimisation step on a batch, in ``settings.precision``, with gradient clipping if
    ``grad_clip_norm`` is set (:func:`~mri_vqvae.train.loop.optimisation_step`: a non-finite
    gradient skips the update). ``model`` may be wrapped (DDP, ``torch.compile``)."""
    loss, output = forward_loss(model, images, settings)
    applied = optimisation_step(
        model, optimizer, loss.total, grad_clip_norm=settings.grad_clip_norm, loss_scale=loss_scale
    )
    return TrainStep(loss, output, applied)


def forward_loss(
    model: torch.nn.Module, images: torch.Tensor, settings: TrainConfig
) -> tuple[VQVAELoss, VQVAEOutput]:
    """The forward pass in ``settings.precision`` and the objective, in float32."""
    with autocast(images.device, settings.precision):
        output = model(images)
    return compute_loss(output, images, settings), output


@torch.no_grad()
def validate(
    model: VQVAE,
    slices: SliceSet,
    settings: TrainConfig,
    device: torch.device,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> dict:
    """Mean loss, SSIM and PSNR and whole-split codebook usage, in eval mode (no codebook
    update) and float32. In a distributed run each process scores its share of the slices
    and every process returns the whole split's figures."""
    model.eval()
    batch_size = settings.batch_size
    # loss, reconstruction loss, SSIM and PSNR, each summed over images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    counts = torch.zeros(model.num_embeddings, dtype=torch.long, device=device)
    mine = processes.shard(torch.arange(len(slices)))
    for start in range(0, len(mine), batch_size):
        images = slices.batch(mine[start : start + batch_size]).to(device)
        output = model(images)
        loss = compute_loss(output, images, settings)
        weight = images.shape[0]
        reconstruction = output.reconstruction.clamp(-1, 1)
        totals += torch.stack(
            [
                loss.total.double() * weight,
                loss.reconstruction.double() * weight,
                ssim_per_image(images, reconstruction).double().sum(),
                psnr_per_image(images, reconstruction).double().sum(),
            ]
        )
        counts += torch.bincount(output.indices.flatten(), minlength=model.num_embeddings)
    processes.sum(totals)
    processes.sum(counts)
    means = (totals / len(slices)).tolist()
    result = dict(zip(("loss", "reconstruction_loss", "ssim", "psnr"), means, strict=True))
    result["codebook_usage"] = codebook_usage(counts)
    result["perplexity"] = float(perplexity(counts))
    return result


def _preview_indices(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[: min(count, size)]


@torch.no_grad()
def save_previews(
    model: VQVAE, previews: dict[str, torch.Tensor], run: RunFolder, epoch: int
) -> dict[str, torch.Tensor]:
    """The fixed preview batches over their reconstructions, and one input/codes/output view;
    returns each split's reconstructions (clamped to the image range)."""
    model.eval()
    reconstructions = {}
    for split, images in previews.items():
        output = model(images)
        ssim = ssim_per_image(images, output.reconstruction).mean().item()
        reconstructions[split] = output.reconstruction.clamp(-1, 1)
        plots.reconstruction_grid(
            images.cpu().numpy(),
            reconstructions[split].cpu().numpy(),
            run.reconstructions / split / epoch_picture(epoch),
            title=f"{split} epoch {epoch} (SSIM {ssim:.4f})",
        )
        if split == "val":
            plots.comparison(
                images[0].cpu().numpy(),
                output.indices[0].cpu().numpy(),
                output.reconstruction[0].clamp(-1, 1).cpu().numpy(),
                run.reconstructions / "comparison" / epoch_picture(epoch),
                num_embeddings=model.num_embeddings,
                title=f"validation image, epoch {epoch}",
            )
    return reconstructions


def uses_channels_last(memory_format: str, model: VQVAE, device: torch.device) -> bool:
    """Whether ``train.memory_format`` means channels-last activations for this model and
    device (``"auto"``: on GPUs, and for the seed architecture on a CPU)."""
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cuda" or model.architecture == "seed"


def _prepare_model(
    model: VQVAE, settings: TrainConfig, device: torch.device, processes: ProcessGroup
) -> torch.nn.Module:
    """Place ``model`` for training and return what the training step should call: the
    model itself, or it wrapped in DDP and/or ``torch.compile``."""
    model.to(device)
    if uses_channels_last(settings.memory_format, model, device):
        model.to(memory_format=torch.channels_last)
    trainer: torch.nn.Module = model
    if processes.enabled:
        _match_single_channel_weights_to_their_gradients(model)
        trainer = data_parallel(model, device)
    if settings.compile:
        trainer = torch.compile(trainer)
    return trainer


def _match_single_channel_weights_to_their_gradients(model: torch.nn.Module) -> None:
    """A convolution weight with one input channel is contiguous in either memory format,
    and its gradient comes back with channels-last strides whatever the weight's. Autograd
    accepts that; DDP compares strides exactly and warns on every run that its gradient
    buckets mismatch. Such weights are given the strides their gradients have."""
    for parameter in model.parameters():
        if parameter.dim() != 4 or parameter.shape[1] != 1:
            continue
        height, width = parameter.shape[2:]
        strides = (height * width, 1, width, 1)
        if parameter.stride() != strides:
            parameter.data = torch.empty_strided(
                parameter.shape, strides, dtype=parameter.dtype, device=parameter.device
            ).copy_(parameter.data)


class VQVAETask(TrainingTask):
    """The VQ-VAE stage: reconstruction loss on image batches, validation SSIM/PSNR and
    codebook use, preview pictures, and the per-step losses and the training data's
    reference (geometry and intensity scale) kept in the checkpoint."""

    kind = "vqvae"
    metric_columns = METRIC_COLUMNS
    score_column = "val_loss"
    sum_names = STEP_SUMS

    def __init__(
        self,
        model: VQVAE,
        *,
        train_set: SliceSet,
        val_set: SliceSet,
        config: Config,
        run: RunFolder,
        device: torch.device,
        processes: ProcessGroup = SINGLE_PROCESS,
    ) -> None:
        self.config, self.settings, self.run = config, config.train, run
        self.model, self.device, self.val_set = model, device, val_set
        self.is_main = processes.is_main
        self.trainer = _prepare_model(model, self.settings, device, processes)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.settings.lr)
        self.adversarial = (
            AdversarialTerm(
                self.settings,
                (config.model.in_channels, *train_set.image_size),
                device,
                processes,
            )
            if self.settings.adversarial_weight > 0
            else None
        )
        self.discriminator_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batch_losses: list[float] = []
        # Recorded in every checkpoint, so samples drawn from this model later can be written
        # in the training slices' geometry and intensity scale.
        self.data_reference = data_reference(train_set)
        # And the slices by content, so that resuming on other slices is refused.
        self.training_data = fingerprints_of(train=train_set, val=val_set)
        self.train_images = train_set.images.to(device)  # float16: half of float32's memory
        count, seed = self.settings.num_preview_images, self.settings.seed
        self.previews = {
            name: split.batch(_preview_indices(count, len(split), seed)).to(device)
            for name, split in (("train", train_set), ("val", val_set))
        }

    def __len__(self) -> int:
        return self.train_images.shape[0]

    def begin_epoch(self, restored: dict[str, Any] | None) -> None:
        self.model.train()
        self.counts = torch.zeros(self.model.num_embeddings, dtype=torch.long, device=self.device)
        self.restarts_before = int(self.model.quantizer.restart_count)
        if restored is not None:
            self.restarts_before = restored["restarts_before"]
            if self.is_main:  # the saved counts are every process's
                self.counts = restored["counts"].to(self.device)

    def epoch_state(self, processes: ProcessGroup) -> dict[str, Any]:
        counts = processes.sum(self.counts.clone()).cpu()
        return {"counts": counts, "restarts_before": self.restarts_before}

    def loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        images = self.train_images[rows.to(self.device)].float()
        loss, output = forward_loss(self.trainer, images, self.settings)
        self.discriminator_batch = None
        if self.adversarial is not None:
            loss = self.add_adversarial_term(self.adversarial, loss, output, images)
        return loss.total, (images, loss, output)

    def add_adversarial_term(
        self, term: AdversarialTerm, loss: VQVAELoss, output: VQVAEOutput, images: torch.Tensor
    ) -> VQVAELoss:
        """``loss`` with the decoder's weighted adversarial term (exactly zero before
        ``train.adversarial_start_step``); keeps the step's batch for the discriminator."""
        zero = torch.zeros((), device=images.device)
        if not term.active(self.global_step):
            return loss._replace(adversarial=zero, adversarial_weight=zero)
        adversarial, weight = term.generator_loss(
            output.reconstruction, loss.total, self.model.last_decoder_weight, self.global_step
        )
        self.discriminator_batch = (images, output.reconstruction.detach())
        return loss._replace(
            total=loss.total + weight * adversarial,
            adversarial=adversarial,
            adversarial_weight=weight,
        )

    def after_step(self) -> None:
        """With the adversarial term on, the discriminator's step on this step's batch."""
        if self.adversarial is not None and self.discriminator_batch is not None:
            self.discriminator_loss = self.adversarial.discriminator_step(*self.discriminator_batch)
            self.discriminator_batch = None

    def step_sums(self, rows: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        images, loss, forward = output
        size = images.shape[0]
        if loss.ssim is not None and self.model.bounded_output:
            # The loss's SSIM is the logged one: a tanh output lies in the image range, so
            # the metric's clamping would change nothing. Computing it again cost about a
            # seventh of a CPU training step.
            ssim_sum = loss.ssim * size
        else:
            with torch.no_grad():
                ssim_sum = ssim_per_image(images, forward.reconstruction).sum()
        self.counts += torch.bincount(
            forward.indices.flatten(), minlength=self.model.num_embeddings
        )
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        total = loss.total.detach()
        adversarial = dict.fromkeys(STEP_SUMS[4:], zero)
        if self.adversarial is not None and self.adversarial.active(self.global_step):
            # train_loss stays the objective validation measures (the adversarial term is
            # logged on its own), so the two remain comparable and positive.
            total = total - (loss.adversarial_weight * loss.adversarial).detach()
            adversarial = {
                "adversarial_loss": loss.adversarial.detach().double(),
                "adversarial_weight": loss.adversarial_weight.detach().double(),
                "discriminator_loss": self.discriminator_loss.double(),
                "adversarial_steps": torch.ones((), dtype=torch.float64, device=self.device),
            }
        return {
            "loss": total.double() * size,
            "reconstruction_loss": loss.reconstruction.detach().double() * size,
            "ssim": ssim_sum.detach().double(),
            "images": torch.full((), size, dtype=torch.float64, device=self.device),
            **adversarial,
        }

    def train_metrics(
        self, sums: StepSums, history: list[dict[str, Any]], processes: ProcessGroup
    ) -> dict[str, Any]:
        processes.sum(self.counts)
        epoch_losses = (sums.column("reconstruction_loss") / sums.column("images")).tolist()
        self.batch_losses.extend(epoch_losses)
        self.epoch_batch_losses = epoch_losses
        seen = sums.total("images")
        per_image = 1 / seen if seen else float("nan")
        adversarial_steps = sums.total("adversarial_steps")  # summed over processes too

        def adversarial_mean(name: str) -> float | None:
            # None (empty in metrics.csv, null in metrics.jsonl) for an epoch without the term.
            return sums.total(name) / adversarial_steps if adversarial_steps else None

        return {
            "images_seen": (history[-1]["images_seen"] if history else 0) + int(seen),
            "train_loss": sums.total("loss") * per_image,
            "train_reconstruction_loss": sums.total("reconstruction_loss") * per_image,
            "train_ssim": sums.total("ssim") * per_image,
            "train_codebook_usage": codebook_usage(self.counts),
            "train_perplexity": float(perplexity(self.counts)),
            "train_dead_code_restarts": int(self.model.quantizer.restart_count)
            - self.restarts_before,
            "train_adversarial_loss": adversarial_mean("adversarial_loss"),
            "train_adversarial_weight": adversarial_mean("adversarial_weight"),
            "train_discriminator_loss": adversarial_mean("discriminator_loss"),
        }

    def validate(self, processes: ProcessGroup) -> dict[str, Any]:
        val = validate(self.model, self.val_set, self.settings, self.device, processes)
        return {f"val_{key}": value for key, value in val.items()}

    def describe(self, row: dict[str, Any]) -> str:
        adversarial = ""
        if row["train_adversarial_loss"] is not None:
            adversarial = (
                f" | adversarial {row['train_adversarial_loss']:.3f} x "
                f"{row['train_adversarial_weight']:.3f}, discriminator "
                f"{row['train_discriminator_loss']:.3f}"
            )
        return (
            f"train loss {row['train_loss']:.4f} ssim {row['train_ssim']:.4f} | val loss "
            f"{row['val_loss']:.4f} ssim {row['val_ssim']:.4f} | codes used "
            f"{100 * row['val_codebook_usage']:.1f}% perplexity {row['val_perplexity']:.1f}"
            f"{adversarial} | {row['epoch_seconds']:.1f} s"
        )

    def score(self, row: dict[str, Any]) -> float:
        """``val_loss``. With the adversarial term, ``best.pt`` follows the newest epoch once
        the term has started, as VQGAN keeps its last weights: the term trades a little pixel
        loss for texture, so ``val_loss`` would choose the epoch that used it least, and no
        validation figure measures the texture it buys. Epochs before the start rank behind
        every epoch after it."""
        if self.adversarial is None:
            return row["val_loss"]
        if self.adversarial.active(row["global_step"] - 1):
            return -float(row["global_step"])  # newer is better
        return row["val_loss"] + _BEFORE_ADVERSARIAL_PENALTY

    def after_epoch(
        self, epoch: int, global_step: int, last: bool, board: TensorBoardLog | None
    ) -> None:
        shown = save_previews(self.model, self.previews, self.run, epoch)
        if board is not None:
            step = global_step
            board.step_values("train/batch_reconstruction_loss", self.epoch_batch_losses, step)
            for split, reconstructions in shown.items():
                board.image_rows(
                    f"reconstructions/{split}", [self.previews[split], reconstructions], step
                )

    def extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {BATCH_LOSSES: self.batch_losses}
        if self.adversarial is not None:
            extras[DISCRIMINATOR_STATE] = self.adversarial.state_dict()
        if self.data_reference is not None:
            extras[DATA_REFERENCE] = self.data_reference.to_plain()
        if self.training_data:
            extras[TRAINING_DATA] = fingerprints_to_plain(self.training_data)
        return extras

    def restore(self, extras: dict[str, Any]) -> None:
        self.batch_losses = read_batch_losses(extras, self.run.last_checkpoint)
        saved = extras.get(DISCRIMINATOR_STATE)
        if self.adversarial is not None and saved is not None:
            self.adversarial.load_state_dict(saved)
        elif self.adversarial is not None:
            logger.warning(
                "the checkpoint has no discriminator (it was trained without the adversarial "
                "term): a new one trains from train.adversarial_start_step, at once if the run "
                "is past it"
            )
        elif saved is not None:
            logger.warning(
                "the checkpoint's discriminator is dropped: train.adversarial_weight is 0 now"
            )

    def finish(self, history: list[dict[str, Any]]) -> None:
        plots.ssim_curves(history, self.run.ssim_curves)
        plots.batch_losses(self.batch_losses, self.run.batch_losses)


def read_batch_losses(extras: dict[str, Any], source: Path) -> list[float]:
    """The per-batch losses a checkpoint's extras keep, checked: a list of numbers (an edited
    or damaged one is refused by name instead of failing when the curve is drawn)."""
    losses = extras.get(BATCH_LOSSES, [])
    if not isinstance(losses, list | tuple) or not all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in losses
    ):
        raise CheckpointError(
            f"{source}: its {BATCH_LOSSES} is not a list of numbers (damaged or edited)"
        )
    return [float(value) for value in losses]


def train_vqvae(
    model: VQVAE,
    *,
    train_set: SliceSet,
    val_set: SliceSet,
    config: Config,
    run_dir: str | Path,
    device: torch.device,
    resume: Checkpoint | None = None,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> FitResult:
    """Train ``model`` on ``train_set`` through :func:`~mri_vqvae.train.loop.fit`, writing a
    run folder: each epoch logs train/validation loss, SSIM, codebook usage and perplexity
    and saves preview pictures, ``last.pt`` and, when validation loss improves, ``best.pt``.

    The training split is moved to ``device`` once, as float16, and batches are drawn from it
    by index. ``train.precision`` ``"auto"`` is resolved here and the resolved value is what
    the run folder and checkpoints record."""
    # Before anything is written, so bad slices leave no half-made run folder.
    check_slice_sizes(model, {"training": train_set, "validation": val_set})
    if config.train.ssim_loss == "ms-ssim":
        ms_ssim_window(*train_set.image_size)  # refuses slices too small, before any work
    precision, why = precision_choice(config.train.precision, device, "train.precision")
    config = replace(config, train=replace(config.train, precision=precision))
    if resume is not None:
        run = RunFolder(Path(run_dir))
        check_resumed_data(
            read_training_data(resume, run.last_checkpoint),
            fingerprints_of(train=train_set, val=val_set),
            run=run_dir,
        )
        load_weights(model, resume, run_dir)
    task = VQVAETask(
        model,
        train_set=train_set,
        val_set=val_set,
        config=config,
        run=RunFolder(Path(run_dir)),
        device=device,
        processes=processes,
    )
    if processes.is_main:
        channels_last = uses_channels_last(config.train.memory_format, model, device)
        logger.info(
            "training in %s (%s)%s on %d process(es)",
            precision,
            why,
            (", channels-last" if channels_last else "")
            + (", compiled" if config.train.compile else ""),
            processes.world_size,
        )
    return fit(task, run_dir, processes, resume)
