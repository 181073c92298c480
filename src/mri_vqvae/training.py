"""Stage 1: train the VQ-VAE. Plain functions over explicit objects; no framework owns the loop."""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mri_vqvae import plots
from mri_vqvae.checkpoint import Checkpoint, capture_rng_state, restore_rng_state, save_checkpoint
from mri_vqvae.config import Config, TrainConfig, save_config
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.losses import VQVAELoss, vqvae_loss
from mri_vqvae.metrics import codebook_usage, perplexity, psnr_per_image, ssim_per_image
from mri_vqvae.model import VQVAE, VQVAEOutput
from mri_vqvae.runtime import autocast, resolve_precision

logger = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "epoch",
    "global_step",
    "images_seen",
    "train_loss",
    "train_reconstruction_loss",
    "train_ssim",
    "train_codebook_usage",
    "train_perplexity",
    "train_dead_code_restarts",
    "lr",
    "val_loss",
    "val_reconstruction_loss",
    "val_ssim",
    "val_psnr",
    "val_codebook_usage",
    "val_perplexity",
    "epoch_seconds",
    "elapsed_seconds",
    "stopped_by_time_budget",
)


@dataclass
class TrainingResult:
    """Where a training run left its outputs, and what it measured."""

    run_dir: Path
    history: list[dict]
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_by_time_budget: bool


def warmup_cosine(
    lr: float,
    warmup_steps: int,
    final_lr_fraction: float,
    step: int,
    total_steps: int,
    time_used: float = 0.0,
) -> float:
    """Linear warm-up over ``warmup_steps``, then half a cosine from ``lr`` down to
    ``lr * final_lr_fraction``. Progress is the larger of the share of steps done and
    ``time_used``, the share of a time budget spent, so a budgeted run still anneals."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, time_used), 1.0)
    floor = lr * final_lr_fraction
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(
    settings: TrainConfig, step: int, total_steps: int, time_used: float = 0.0
) -> float:
    """The learning rate for optimisation step ``step`` (0-based) of ``total_steps``:
    ``settings.lr`` throughout (``"constant"``) or :func:`warmup_cosine` (``"cosine"``)."""
    if settings.lr_schedule == "constant":
        return settings.lr
    return warmup_cosine(
        settings.lr,
        settings.warmup_steps,
        settings.final_lr_fraction,
        step,
        total_steps,
        time_used,
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
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    settings: TrainConfig,
    loss_scale: float = 1.0,
) -> tuple[VQVAELoss, VQVAEOutput]:
    """One optimisation step on a batch, in ``settings.precision``, with gradient clipping if
    ``grad_clip_norm`` is set. ``model`` may be wrapped (DDP, ``torch.compile``).
    ``loss_scale`` multiplies the loss before the backward pass: a distributed run passes
    its shard's share of the batch times the number of processes, so that the averaged
    gradients are the whole batch's even when the shards differ in size."""
    with autocast(images.device, settings.precision):
        output = model(images)
    loss = compute_loss(output, images, settings)
    optimizer.zero_grad(set_to_none=True)
    (loss.total * loss_scale if loss_scale != 1.0 else loss.total).backward()
    if settings.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
    optimizer.step()
    return loss, output


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
    model: VQVAE, previews: dict[str, torch.Tensor], run_dir: Path, epoch: int
) -> None:
    """The fixed preview batches over their reconstructions, and one input/codes/output view."""
    model.eval()
    for split, images in previews.items():
        output = model(images)
        ssim = ssim_per_image(images, output.reconstruction).mean().item()
        plots.reconstruction_grid(
            images.cpu().numpy(),
            output.reconstruction.clamp(-1, 1).cpu().numpy(),
            run_dir / "reconstructions" / split / f"epoch_{epoch}.png",
            title=f"{split} epoch {epoch} (SSIM {ssim:.4f})",
        )
        if split == "val":
            plots.comparison(
                images[0].cpu().numpy(),
                output.indices[0].cpu().numpy(),
                output.reconstruction[0].clamp(-1, 1).cpu().numpy(),
                run_dir / "reconstructions" / "comparison" / f"epoch_{epoch}.png",
                num_embeddings=model.num_embeddings,
                title=f"validation image, epoch {epoch}",
            )


def write_metric_logs(
    history: list[dict], run_dir: Path, columns: tuple[str, ...] = METRIC_COLUMNS
) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` (``columns``) with one row per epoch."""
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for row in history:
            handle.write(json.dumps(row) + "\n")
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


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
        # Buffers (the EMA codebook statistics) are kept equal by the quantiser's own
        # collectives, so DDP need not broadcast them every step.
        buffer_option = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}  # its name before torch 2.13
        )
        trainer = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **buffer_option
        )
    if settings.compile:
        trainer = torch.compile(trainer)
    return trainer


def train_vqvae(
    model: VQVAE,
    train_set: SliceSet,
    val_set: SliceSet,
    config: Config,
    run_dir: str | Path,
    device: torch.device,
    resume: Checkpoint | None = None,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> TrainingResult:
    """Train for ``config.train.epochs`` (or until ``max_minutes``), writing a run folder.

    Each epoch logs train/validation loss, SSIM, codebook usage and perplexity, saves preview
    pictures, ``last.pt`` and, when validation loss improves, ``best.pt``. A time budget ends
    training mid-epoch, after which that epoch is still validated, logged and checkpointed.

    The training split is moved to ``device`` once, as float16, and batches are drawn from
    it by index. In a distributed run (``processes``, one per ``torchrun`` rank) every
    process runs this function: each takes its contiguous share of every batch of
    ``train.batch_size`` images, so the run follows the same steps as one process would, and
    only the main process writes files. ``train.precision`` ``"auto"`` is resolved here and
    the resolved value is what the run folder and checkpoints record.
    """
    try:  # before anything is written, so a bad size leaves no half-made run folder
        model.check_image_size(*train_set.image_size)
    except ValueError as err:
        raise ValueError(f"training slices: {err}; set data.image_size to a size that is") from err
    if len(train_set) < processes.world_size:
        raise ValueError(
            f"{len(train_set)} training slice(s) cannot be shared by {processes.world_size} "
            "processes; start fewer"
        )
    settings = config.train
    precision = resolve_precision(settings.precision, device)
    if precision != settings.precision:
        settings = replace(settings, precision=precision)
        config = replace(config, train=settings)
    main = processes.is_main
    run_dir = Path(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    trainer = _prepare_model(model, settings, device, processes)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history: list[dict] = []
    batch_losses: list[float] = []
    start_epoch, global_step, best_val_loss = 0, 0, math.inf
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer_state)
        start_epoch, global_step = resume.epoch, resume.global_step
        best_val_loss, history = resume.best_val_loss, list(resume.history)
        batch_losses = list(resume.batch_losses)
        if resume.rng_state is not None:
            restore_rng_state(resume.rng_state)

    train_images = train_set.images.to(device)  # float16: half of float32's memory
    previews = {
        "train": train_set.batch(
            _preview_indices(settings.num_preview_images, len(train_set), settings.seed)
        ).to(device),
        "val": val_set.batch(
            _preview_indices(settings.num_preview_images, len(val_set), settings.seed)
        ).to(device),
    }
    started = time.monotonic()
    budget_seconds = settings.max_minutes * 60 if settings.max_minutes is not None else None
    out_of_time = False
    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    elapsed_before = history[-1].get("elapsed_seconds", 0.0) if history else 0.0
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    if main:
        logger.info(
            "training in %s%s%s on %d process(es)",
            precision,
            ", channels-last" if uses_channels_last(settings.memory_format, model, device) else "",
            ", compiled" if settings.compile else "",
            processes.world_size,
        )

    for epoch in range(start_epoch + 1, settings.epochs + 1):
        epoch_start = time.monotonic()
        model.train()
        # A generator per epoch makes the order depend on (seed, epoch) only, so a run resumed
        # at an epoch boundary sees the same batches as one that never stopped, whatever the
        # number of processes.
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch)
        ).to(device)
        # Per step: loss, reconstruction loss and SSIM summed over the images, and the image
        # count; kept on the device and read once per epoch, so a GPU never waits on a step.
        step_sums: list[torch.Tensor] = []
        counts = torch.zeros(model.num_embeddings, dtype=torch.long, device=device)
        restarts_before = int(model.quantizer.restart_count)
        progress = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{settings.epochs}",
            unit="batch",
            leave=False,
            disable=None if main else True,
        )
        for step in progress:
            batch = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            if len(batch) < processes.world_size:
                continue  # a last batch too small to give every process an image
            mine = processes.shard(batch)
            images = train_images[mine].float()
            time_used = (time.monotonic() - started) / budget_seconds if budget_seconds else 0.0
            if budget_seconds is not None:  # every process follows the slowest one's clock
                time_used = float(processes.max(torch.tensor([time_used], device=device))[0])
            lr = learning_rate(settings, global_step, total_steps, time_used)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_scale = len(mine) * processes.world_size / len(batch)
            loss, output = train_step(trainer, optimizer, images, settings, loss_scale)
            global_step += 1
            size = images.shape[0]
            if loss.ssim is not None and model.bounded_output:
                # The loss's SSIM is the logged one: a tanh output lies in the image range, so
                # the metric's clamping would change nothing. Computing it again cost about a
                # seventh of a CPU training step.
                ssim_sum = loss.ssim * size
            else:
                with torch.no_grad():
                    ssim_sum = ssim_per_image(images, output.reconstruction).sum()
            step_sums.append(
                torch.stack(
                    [
                        loss.total.detach().double() * size,
                        loss.reconstruction.detach().double() * size,
                        ssim_sum.detach().double(),
                        torch.full((), size, dtype=torch.float64, device=device),
                    ]
                )
            )
            counts += torch.bincount(output.indices.flatten(), minlength=model.num_embeddings)
            if main and step % 10 == 0:
                progress.set_postfix(loss=f"{loss.total.item():.4f}")
            if time_used >= 1:
                out_of_time = True
                break
        progress.close()

        sums = processes.sum(torch.stack(step_sums))  # (steps, 4), whole batches
        processes.sum(counts)
        batch_losses.extend((sums[:, 1] / sums[:, 3]).tolist())
        loss_sum, reconstruction_sum, ssim_sum, seen = sums.sum(0).tolist()
        val = validate(model, val_set, settings, device, processes)
        seen = int(seen)
        images_seen = (history[-1]["images_seen"] if history else 0) + seen
        row = {
            "epoch": epoch,
            "global_step": global_step,
            "images_seen": images_seen,
            "train_loss": loss_sum / seen,
            "train_reconstruction_loss": reconstruction_sum / seen,
            "train_ssim": ssim_sum / seen,
            "train_codebook_usage": codebook_usage(counts),
            "train_perplexity": float(perplexity(counts)),
            "train_dead_code_restarts": int(model.quantizer.restart_count) - restarts_before,
            "lr": lr,
            **{f"val_{key}": value for key, value in val.items()},
            "epoch_seconds": time.monotonic() - epoch_start,
            "elapsed_seconds": elapsed_before + time.monotonic() - started,
            "stopped_by_time_budget": out_of_time,
        }
        history.append(row)
        improved = val["loss"] < best_val_loss
        best_val_loss = min(best_val_loss, val["loss"])
        if main:
            write_metric_logs(history, run_dir)
            logger.info(
                "epoch %d: train loss %.4f ssim %.4f | val loss %.4f ssim %.4f | codes used "
                "%.1f%% perplexity %.1f | %.1f s",
                epoch,
                row["train_loss"],
                row["train_ssim"],
                row["val_loss"],
                row["val_ssim"],
                100 * row["val_codebook_usage"],
                row["val_perplexity"],
                row["epoch_seconds"],
            )
            save_previews(model, previews, run_dir, epoch)
            checkpoint = Checkpoint(
                config=config,
                model_state=model.state_dict(),
                epoch=epoch,
                global_step=global_step,
                optimizer_state=optimizer.state_dict(),
                best_val_loss=best_val_loss,
                history=history,
                batch_losses=batch_losses,
                rng_state=capture_rng_state(),
            )
            save_checkpoint(checkpoint, last_path)
            if improved:
                save_checkpoint(checkpoint, best_path)
        if out_of_time:
            if main:
                logger.info(
                    "time budget of %s minutes reached in epoch %d", settings.max_minutes, epoch
                )
            break

    if main and history:
        plots.ssim_curves(history, run_dir / "ssim_scores.png")
        plots.batch_losses(batch_losses, run_dir / "batch_losses.png")
    processes.barrier()  # no process leaves before the main one has written everything
    return TrainingResult(run_dir, history, best_path, last_path, out_of_time)
