"""Stage 2: train an autoregressive prior on the code maps of a frozen VQ-VAE."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mri_vqvae import plots
from mri_vqvae.checkpoint import (
    PriorCheckpoint,
    capture_rng_state,
    restore_rng_state,
    save_prior_checkpoint,
)
from mri_vqvae.code_maps import CodeMaps
from mri_vqvae.config import PriorRunConfig, save_config
from mri_vqvae.generate.sampling import SamplingSettings, generate_samples
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import Prior
from mri_vqvae.runtime import autocast, resolve_precision
from mri_vqvae.train.tensorboard import TensorBoardLog
from mri_vqvae.train.vqvae import (
    StopRequest,
    TrainingInterrupted,
    warmup_cosine,
    write_metric_logs,
)

logger = logging.getLogger(__name__)

PRIOR_METRIC_COLUMNS = (
    "epoch",
    "global_step",
    "train_nll_bits",
    "train_accuracy",
    "val_nll_bits",
    "val_accuracy",
    "val_unigram_bits",
    "lr",
    "epoch_seconds",
    "elapsed_seconds",
    "stopped_by_time_budget",
)


@dataclass
class PriorTrainingResult:
    """Where a prior's run left its outputs, and what it measured."""

    run_dir: Path
    history: list[dict]
    best_checkpoint: Path
    last_checkpoint: Path


def _conditions(prior: Prior, codes: CodeMaps, rows: torch.Tensor, device: torch.device):
    if not prior.conditional:
        return None
    return codes.slice_positions[rows].to(device)


def prior_loss(
    prior: Prior, indices: torch.Tensor, slice_position: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy in nats per code and the number of codes predicted exactly."""
    logits = prior(indices, slice_position)  # (B, K, h, w)
    loss = F.cross_entropy(logits.float(), indices)
    correct = (logits.argmax(dim=1) == indices).sum()
    return loss, correct


@torch.no_grad()
def evaluate_prior(
    prior: Prior, codes: CodeMaps, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Negative log-likelihood in bits per code and next-code accuracy over a whole split."""
    prior.eval()
    total_nats, correct = 0.0, 0
    for start in range(0, len(codes), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(codes)))
        indices = codes.indices[rows].to(device)
        loss, hits = prior_loss(prior, indices, _conditions(prior, codes, rows, device))
        total_nats += loss.item() * indices.numel()
        correct += int(hits)
    count = codes.indices.numel()
    return {"nll_bits": total_nats / count / math.log(2), "accuracy": correct / count}


def _preview(
    vqvae: VQVAE, prior: Prior, config: PriorRunConfig, path: Path, epoch: int
) -> torch.Tensor:
    """Decode samples to a grid at ``path``; returns them, ``(N, 1, H, W)`` in [-1, 1]."""
    count = config.train.num_preview_samples
    position = 0.5 if prior.conditional else None
    run = generate_samples(vqvae, prior, count, SamplingSettings(), position, config.train.seed)
    where = " at slice position 0.5" if position is not None else ""
    plots.image_grid(run.images.numpy(), path, title=f"prior samples, epoch {epoch}{where}")
    return run.images


def train_prior(
    prior: Prior,
    train_codes: CodeMaps,
    val_codes: CodeMaps,
    config: PriorRunConfig,
    run_dir: str | Path,
    device: torch.device,
    vqvae: VQVAE,
    vqvae_path: str | Path,
    vqvae_sha256: str,
    resume: PriorCheckpoint | None = None,
) -> PriorTrainingResult:
    """Fit ``prior`` to ``train_codes`` by next-code cross-entropy, writing a run folder.

    Each epoch logs train and validation negative log-likelihood in bits per code and
    next-code accuracy beside the validation codes' unigram entropy, saves ``last.pt`` and,
    when validation NLL improves, ``best.pt``; every ``sample_every`` epochs (and after the
    last) it decodes samples to ``samples/epoch_<N>.png`` through ``vqvae``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.train.precision, device)
    # The run records what "auto" became here, as the VQ-VAE's does.
    config = replace(config, train=replace(config.train, precision=precision))
    save_config(config, run_dir / "prior_config.yaml")
    settings = config.train
    prior.to(device)
    vqvae.to(device).eval()
    optimizer = torch.optim.AdamW(
        prior.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    history: list[dict] = []
    start_epoch, global_step, best_val_nll = 0, 0, math.inf
    partial = None  # a mid-epoch checkpoint's partial epoch
    if resume is not None:
        prior.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)
        start_epoch, global_step = resume.epoch, resume.global_step
        best_val_nll, history = resume.best_val_nll, list(resume.history)
        if resume.rng_state is not None:
            restore_rng_state(resume.rng_state)
        if resume.mid_epoch:
            partial = {"step": resume.step_in_epoch, **resume.epoch_progress}
    unigram_bits = val_codes.unigram_bits()
    steps_per_epoch = math.ceil(len(train_codes) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    budget_seconds = settings.max_minutes * 60 if settings.max_minutes is not None else None
    elapsed_before = history[-1]["elapsed_seconds"] if history else 0.0
    if partial is not None:
        elapsed_before += partial["seconds"]
    started = time.monotonic()
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    out_of_time = False
    board = TensorBoardLog(run_dir, resume_step=global_step) if settings.tensorboard else None

    def checkpoint(epoch_done: int, step_in_epoch: int = 0, progress=None) -> PriorCheckpoint:
        return PriorCheckpoint(
            config=config,
            model_state=prior.state_dict(),
            num_embeddings=prior.num_embeddings,
            grid_shape=prior.grid_shape,
            vqvae_sha256=vqvae_sha256,
            vqvae_path=str(vqvae_path),
            epoch=epoch_done,
            global_step=global_step,
            optimizer_state=optimizer.state_dict(),
            best_val_nll=best_val_nll,
            history=history,
            rng_state=capture_rng_state(),
            step_in_epoch=step_in_epoch,
            epoch_progress=progress,
        )

    closing_board = contextlib.closing(board) if board is not None else contextlib.nullcontext()
    with StopRequest() as stop, closing_board:
        for epoch in range(start_epoch + 1, settings.epochs + 1):
            epoch_start = time.monotonic()
            prior.train()
            # The order depends on (seed, epoch) only, so a run resumed inside an epoch sees
            # the batches one that never stopped would.
            order = torch.randperm(
                len(train_codes),
                generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch),
            )
            total_nats, correct, predicted, seconds_before, first_step = 0.0, 0, 0, 0.0, 0
            if partial is not None:
                first_step, seconds_before = partial["step"], partial["seconds"]
                total_nats, correct, predicted = (
                    partial["total_nats"],
                    partial["correct"],
                    partial["predicted"],
                )
                partial = None
            progress = tqdm(
                range(first_step, steps_per_epoch),
                initial=first_step,
                total=steps_per_epoch,
                desc=f"prior epoch {epoch}/{settings.epochs}",
                unit="batch",
                leave=False,
                disable=None,
            )
            for step in progress:
                if stop.signal_number is not None:
                    sums = {"total_nats": total_nats, "correct": correct, "predicted": predicted}
                    seconds = seconds_before + time.monotonic() - epoch_start
                    save_prior_checkpoint(
                        checkpoint(epoch - 1, step, {**sums, "seconds": seconds}), last_path
                    )
                    progress.close()
                    raise TrainingInterrupted(stop.signal_number, last_path, epoch, step)
                rows = order[step * settings.batch_size : (step + 1) * settings.batch_size]
                indices = train_codes.indices[rows].to(device)
                time_used = (time.monotonic() - started) / budget_seconds if budget_seconds else 0.0
                lr = warmup_cosine(
                    settings.lr,
                    settings.warmup_steps,
                    settings.final_lr_fraction,
                    global_step,
                    total_steps,
                    time_used,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, precision):
                    loss, hits = prior_loss(
                        prior, indices, _conditions(prior, train_codes, rows, device)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(prior.parameters(), settings.grad_clip_norm)
                optimizer.step()
                global_step += 1
                total_nats += loss.item() * indices.numel()
                correct += int(hits)
                predicted += indices.numel()
                progress.set_postfix(bits=f"{total_nats / predicted / math.log(2):.3f}")
                if budget_seconds is not None and time.monotonic() - started >= budget_seconds:
                    out_of_time = True
                    break
            progress.close()

            val = evaluate_prior(prior, val_codes, device, settings.batch_size)
            row = {
                "epoch": epoch,
                "global_step": global_step,
                "train_nll_bits": total_nats / predicted / math.log(2),
                "train_accuracy": correct / predicted,
                "val_nll_bits": val["nll_bits"],
                "val_accuracy": val["accuracy"],
                "val_unigram_bits": unigram_bits,
                "lr": lr,
                "epoch_seconds": seconds_before + time.monotonic() - epoch_start,
                "elapsed_seconds": elapsed_before + time.monotonic() - started,
                "stopped_by_time_budget": out_of_time,
            }
            history.append(row)
            write_metric_logs(history, run_dir, PRIOR_METRIC_COLUMNS)
            if board is not None:
                board.epoch(row)
            logger.info(
                "prior epoch %d: train %.3f bits/code | val %.3f bits/code (unigram %.3f), "
                "next-code accuracy %.1f%%",
                epoch,
                row["train_nll_bits"],
                row["val_nll_bits"],
                unigram_bits,
                100 * row["val_accuracy"],
            )
            last_epoch = epoch == settings.epochs or out_of_time
            if settings.sample_every and (epoch % settings.sample_every == 0 or last_epoch):
                preview_path = run_dir / "samples" / f"epoch_{epoch}.png"
                samples = _preview(vqvae, prior, config, preview_path, epoch)
                if board is not None:
                    board.image_rows("samples", list(samples.split(8)), global_step)

            improved = val["nll_bits"] < best_val_nll
            best_val_nll = min(best_val_nll, val["nll_bits"])
            finished = checkpoint(epoch)
            save_prior_checkpoint(finished, last_path)
            if improved:
                save_prior_checkpoint(finished, best_path)
            if out_of_time:
                logger.info(
                    "time budget of %s minutes reached in prior epoch %d",
                    settings.max_minutes,
                    epoch,
                )
                break

    if history:
        plots.nll_curves(history, run_dir / "nll_curves.png")
    return PriorTrainingResult(run_dir, history, best_path, last_path)
