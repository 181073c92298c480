"""Stage 1: train the VQ-VAE. Plain functions over explicit objects; no framework owns the loop."""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mri_vqvae import plots
from mri_vqvae.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from mri_vqvae.config import Config, TrainConfig, save_config
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.files import write_text_atomic
from mri_vqvae.losses import VQVAELoss, vqvae_loss
from mri_vqvae.metrics import codebook_usage, perplexity, psnr_per_image, ssim_per_image
from mri_vqvae.model import VQVAE, VQVAEOutput
from mri_vqvae.runtime import autocast, resolve_precision
from mri_vqvae.train.tensorboard import TensorBoardLog

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
    "train_skipped_steps",
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
    ``grad_clip_norm`` is set. ``model`` may be wrapped (DDP, ``torch.compile``).

    A non-finite gradient norm (from a non-finite loss, or an overflow) skips the update: the
    parameters and optimiser state stay as they were. ``loss_scale`` multiplies the loss
    before the backward pass: a distributed run passes its shard's share of the batch times
    the number of processes, so that the averaged gradients are the whole batch's even when
    the shards differ in size."""
    with autocast(images.device, settings.precision):
        output = model(images)
    loss = compute_loss(output, images, settings)
    optimizer.zero_grad(set_to_none=True)
    (loss.total * loss_scale if loss_scale != 1.0 else loss.total).backward()
    max_norm = settings.grad_clip_norm if settings.grad_clip_norm is not None else math.inf
    # Gradients are averaged over processes before this, so every process decides alike.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    applied = bool(torch.isfinite(norm))
    if applied:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return TrainStep(loss, output, applied)


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
    return reconstructions


def write_metric_logs(
    history: list[dict], run_dir: Path, columns: tuple[str, ...] = METRIC_COLUMNS
) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` (``columns``) with one row per epoch,
    each replaced whole (a full disk leaves the previous logs, not an empty file)."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "metrics.csv", table.getvalue())


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


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint to resume from was written first."""

    def __init__(self, signal_number: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(
            f"{name} received: stopped before step {step + 1} of epoch {epoch}; {checkpoint} "
            "holds the run so far (resume with --resume)"
        )


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the run stopped."""


class StopRequest:
    """Turns SIGINT and SIGTERM into a request the training loop honours at its next step.
    A second signal while one is pending stops at once, as the default would."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        logger.warning(
            "%s received: stopping after this step and writing a checkpoint (send it again to "
            "stop at once)",
            signal.Signals(signal_number).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only there can it listen
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# best.pt, last.pt and the temporary file of the one being replaced.
_CHECKPOINTS_KEPT = 3


def check_run_folder(run_dir: Path, model: VQVAE) -> None:
    """Refuse a run folder that cannot be written or lacks room for the checkpoints a run
    keeps, before any training."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
    except OSError as err:
        raise ValueError(
            f"{run_dir}: cannot write to the run folder ({err.strerror or err})"
        ) from err
    finally:
        with contextlib.suppress(OSError):  # the folder itself may not exist
            probe.unlink(missing_ok=True)
    # Weights plus Adam's two moments, float32, and a margin for the rest of a checkpoint.
    tensors = sum(t.numel() for t in model.parameters()) * 3 + sum(
        b.numel() for b in model.buffers()
    )
    checkpoint_bytes = tensors * 4 * 1.1 + (1 << 20)
    needed = checkpoint_bytes * _CHECKPOINTS_KEPT + (16 << 20)  # and pictures and logs
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ValueError(
            f"{run_dir}: only {free / 2**20:.0f} MiB free; a run needs about "
            f"{needed / 2**20:.0f} MiB ({_CHECKPOINTS_KEPT} checkpoints of "
            f"{checkpoint_bytes / 2**20:.0f} MiB, pictures and logs); free some space or "
            "choose another --out"
        )


def _stacked(step_sums: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The per-step sums as a new ``(steps, 4)`` tensor (``(0, 4)`` before any step)."""
    return torch.stack(step_sums) if step_sums else torch.zeros(0, 4, device=device)


def _partial_epoch(
    step_sums: list[torch.Tensor],
    counts: torch.Tensor,
    processes: ProcessGroup,
    restarts_before: int,
    seconds: float,
    skipped: int,
) -> dict[str, Any]:
    """An epoch so far, summed over processes, as a mid-epoch checkpoint stores it. Every
    process must call it (it sums across them)."""
    return {
        "step_sums": processes.sum(_stacked(step_sums, counts.device)).cpu(),
        "counts": processes.sum(counts.clone()).cpu(),
        "restarts_before": restarts_before,
        "seconds": seconds,
        "skipped_steps": skipped,
    }


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
    ``train.checkpoint_every`` also writes ``last.pt`` inside epochs; ``resume`` continues
    from any checkpoint, mid-epoch ones included, exactly where it was written.

    SIGINT and SIGTERM stop training at the next step after writing ``last.pt``
    (:class:`TrainingInterrupted`). A step whose loss or gradient is not finite is skipped;
    ``train.max_nonfinite_steps`` of them in a row raise :class:`NonFiniteTraining`, leaving
    the last checkpoint as it was.

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
        check_run_folder(run_dir, model)
        save_config(config, run_dir / "config.yaml")
    trainer = _prepare_model(model, settings, device, processes)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history: list[dict] = []
    batch_losses: list[float] = []
    start_epoch, global_step, best_val_loss = 0, 0, math.inf
    progress_restored: dict | None = None  # a mid-epoch checkpoint's partial epoch
    resume_step = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer_state)
        start_epoch, global_step = resume.epoch, resume.global_step
        best_val_loss, history = resume.best_val_loss, list(resume.history)
        batch_losses = list(resume.batch_losses)
        if resume.rng_state is not None:
            restore_rng_state(resume.rng_state)
        if resume.mid_epoch:
            resume_step, progress_restored = resume.step_in_epoch, resume.epoch_progress
    board = (
        TensorBoardLog(run_dir, resume_step=global_step) if main and settings.tensorboard else None
    )

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
    if progress_restored is not None:
        elapsed_before += progress_restored["seconds"]
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    if main:
        logger.info(
            "training in %s%s%s on %d process(es)%s",
            precision,
            ", channels-last" if uses_channels_last(settings.memory_format, model, device) else "",
            ", compiled" if settings.compile else "",
            processes.world_size,
            f", resuming at step {resume_step + 1} of epoch {start_epoch + 1}"
            if resume_step
            else "",
        )

    def write_checkpoint(path: Path, epoch_done: int, step_in_epoch: int = 0, partial=None):
        if main:
            save_checkpoint(
                Checkpoint(
                    config=config,
                    model_state=model.state_dict(),
                    epoch=epoch_done,
                    global_step=global_step,
                    optimizer_state=optimizer.state_dict(),
                    best_val_loss=best_val_loss,
                    history=history,
                    batch_losses=batch_losses,
                    rng_state=capture_rng_state(),
                    step_in_epoch=step_in_epoch,
                    epoch_progress=partial,
                ),
                path,
            )

    closing_board = contextlib.closing(board) if board is not None else contextlib.nullcontext()
    with StopRequest() as stop, closing_board:
        for epoch in range(start_epoch + 1, settings.epochs + 1):
            epoch_start = time.monotonic()
            model.train()
            # A generator per epoch makes the order depend on (seed, epoch) only, so a run
            # resumed anywhere sees the same batches as one that never stopped, whatever the
            # number of processes.
            order = torch.randperm(
                len(train_set),
                generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch),
            ).to(device)
            # Per step: loss, reconstruction loss and SSIM summed over the images, and the
            # image count; kept on the device and read once per epoch, so a GPU never waits.
            step_sums: list[torch.Tensor] = []
            counts = torch.zeros(model.num_embeddings, dtype=torch.long, device=device)
            restarts_before = int(model.quantizer.restart_count)
            skipped, skipped_in_a_row, seconds_before = 0, 0, 0.0
            first_step = 0
            if progress_restored is not None:
                first_step, seconds_before = resume_step, progress_restored["seconds"]
                restarts_before = progress_restored["restarts_before"]
                skipped = progress_restored["skipped_steps"]
                if main:  # the saved sums are every process's; the others add theirs to them
                    step_sums = list(progress_restored["step_sums"].to(device).unbind(0))
                    counts = progress_restored["counts"].to(device)
                progress_restored = None

            progress = tqdm(
                range(first_step, steps_per_epoch),
                initial=first_step,
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{settings.epochs}",
                unit="batch",
                leave=False,
                disable=None if main else True,
            )
            for step in progress:
                time_used = (time.monotonic() - started) / budget_seconds if budget_seconds else 0.0
                stop_signal = float(stop.signal_number or 0)
                if processes.enabled:  # every process follows the slowest clock and any stop
                    agreed = processes.max(
                        torch.tensor([time_used, stop_signal], device=device)
                    ).tolist()
                    time_used, stop_signal = agreed
                if stop_signal:
                    partial = _partial_epoch(
                        step_sums,
                        counts,
                        processes,
                        restarts_before,
                        seconds_before + time.monotonic() - epoch_start,
                        skipped,
                    )
                    write_checkpoint(last_path, epoch - 1, step, partial)
                    progress.close()
                    raise TrainingInterrupted(int(stop_signal), last_path, epoch, step)
                batch = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                if len(batch) < processes.world_size:
                    continue  # a last batch too small to give every process an image
                mine = processes.shard(batch)
                images = train_images[mine].float()
                lr = learning_rate(settings, global_step, total_steps, time_used)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_scale = len(mine) * processes.world_size / len(batch)
                loss, output, applied = train_step(trainer, optimizer, images, settings, loss_scale)
                global_step += 1
                if not applied:
                    skipped += 1
                    skipped_in_a_row += 1
                    logger.warning(
                        "epoch %d step %d (global step %d): loss or gradient not finite; "
                        "step skipped (%d in a row)",
                        epoch,
                        step + 1,
                        global_step,
                        skipped_in_a_row,
                    )
                    if skipped_in_a_row >= settings.max_nonfinite_steps:
                        progress.close()
                        kept = (
                            f"{last_path} is the last checkpoint"
                            if last_path.exists()
                            else ("no checkpoint had been written yet")
                        )
                        raise NonFiniteTraining(
                            f"{skipped_in_a_row} steps in a row had a non-finite loss or "
                            f"gradient, the last at epoch {epoch} step {step + 1} (global step "
                            f"{global_step}); training stopped and {kept}. Lower train.lr, "
                            "check the data for corrupt slices, or use train.precision=float32"
                        )
                else:
                    skipped_in_a_row = 0
                    size = images.shape[0]
                    if loss.ssim is not None and model.bounded_output:
                        # The loss's SSIM is the logged one: a tanh output lies in the image
                        # range, so the metric's clamping would change nothing. Computing it
                        # again cost about a seventh of a CPU training step.
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
                    counts += torch.bincount(
                        output.indices.flatten(), minlength=model.num_embeddings
                    )
                if main and step % 10 == 0:
                    progress.set_postfix(loss=f"{loss.total.item():.4f}")
                if time_used >= 1:
                    out_of_time = True
                    break
                if (
                    settings.checkpoint_every
                    and global_step % settings.checkpoint_every == 0
                    and step + 1 < steps_per_epoch
                ):
                    partial = _partial_epoch(
                        step_sums,
                        counts,
                        processes,
                        restarts_before,
                        seconds_before + time.monotonic() - epoch_start,
                        skipped,
                    )
                    write_checkpoint(last_path, epoch - 1, step + 1, partial)
            progress.close()

            sums = processes.sum(_stacked(step_sums, device))  # (steps, 4), whole batches
            processes.sum(counts)
            epoch_batch_losses = (sums[:, 1] / sums[:, 3]).tolist()
            batch_losses.extend(epoch_batch_losses)
            loss_sum, reconstruction_sum, ssim_sum, seen = sums.sum(0).tolist()
            val = validate(model, val_set, settings, device, processes)
            seen = int(seen)
            images_seen = (history[-1]["images_seen"] if history else 0) + seen
            per_image = 1 / seen if seen else math.nan
            row = {
                "epoch": epoch,
                "global_step": global_step,
                "images_seen": images_seen,
                "train_loss": loss_sum * per_image,
                "train_reconstruction_loss": reconstruction_sum * per_image,
                "train_ssim": ssim_sum * per_image,
                "train_codebook_usage": codebook_usage(counts),
                "train_perplexity": float(perplexity(counts)),
                "train_dead_code_restarts": int(model.quantizer.restart_count) - restarts_before,
                "train_skipped_steps": skipped,
                "lr": lr,
                **{f"val_{key}": value for key, value in val.items()},
                "epoch_seconds": seconds_before + time.monotonic() - epoch_start,
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
                    "%.1f%% perplexity %.1f | %.1f s%s",
                    epoch,
                    row["train_loss"],
                    row["train_ssim"],
                    row["val_loss"],
                    row["val_ssim"],
                    100 * row["val_codebook_usage"],
                    row["val_perplexity"],
                    row["epoch_seconds"],
                    f" | {skipped} step(s) skipped as non-finite" if skipped else "",
                )
                shown = save_previews(model, previews, run_dir, epoch)
                if board is not None:
                    board.epoch(row)
                    board.step_values(
                        "train/batch_reconstruction_loss", epoch_batch_losses, global_step
                    )
                    for split, reconstructions in shown.items():
                        board.image_rows(
                            f"reconstructions/{split}",
                            [previews[split], reconstructions],
                            global_step,
                        )
                    board.flush()
            write_checkpoint(last_path, epoch)
            if improved:
                write_checkpoint(best_path, epoch)
            if out_of_time:
                if main:
                    logger.info(
                        "time budget of %s minutes reached in epoch %d",
                        settings.max_minutes,
                        epoch,
                    )
                break

    if main and history:
        plots.ssim_curves(history, run_dir / "ssim_scores.png")
        plots.batch_losses(batch_losses, run_dir / "batch_losses.png")
        if settings.report:
            write_validation_report(run_dir, best_path, val_set, device, settings)
    processes.barrier()  # no process leaves before the main one has written everything
    return TrainingResult(run_dir, history, best_path, last_path, out_of_time)


def write_validation_report(
    run_dir: Path,
    best_checkpoint: Path,
    val_set: SliceSet,
    device: torch.device,
    settings: TrainConfig,
) -> Path | None:
    """Evaluate ``best_checkpoint`` on the validation split into ``RUN_DIR/validation`` and
    write ``RUN_DIR/report.html``; returns the report's path.

    The run itself is finished and saved by then, so a failure to write these (a full disk,
    say) is logged and the run still ends as done: ``mri-vqvae report`` writes the page later.
    """
    from mri_vqvae.evaluate.reconstruction import write_evaluation
    from mri_vqvae.report.page import write_report

    try:
        model, _ = load_model(best_checkpoint, device)
        write_evaluation(
            model,
            val_set,
            run_dir / "validation",
            device,
            settings.batch_size,
            settings.seed,
            split="val",
        )
        report = write_report(run_dir)
    except OSError as err:
        logger.warning(
            "could not write the run's report (%s); the run is saved: write the report with "
            "`mri-vqvae report %s`",
            err,
            run_dir,
        )
        return None
    logger.info("report: %s", report)
    return report
