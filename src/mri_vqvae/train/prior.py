"""Stage 2: an autoregressive prior over a frozen VQ-VAE's code maps, as a task of the one
training loop (:mod:`mri_vqvae.train.loop`)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mri_vqvae import plots
from mri_vqvae.checkpoint import Checkpoint, load_weights
from mri_vqvae.code_maps import CodeMaps
from mri_vqvae.config import Config
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.files import RunFolder, epoch_picture
from mri_vqvae.generate.sampling import generate_samples
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import Prior
from mri_vqvae.runtime import autocast, resolve_precision
from mri_vqvae.train.loop import FitResult, TrainingTask, fit
from mri_vqvae.train.tensorboard import TensorBoardLog

logger = logging.getLogger(__name__)

# The prior's columns of metrics.csv, in order.
PRIOR_METRIC_COLUMNS = (
    "epoch",
    "global_step",
    "train_nll_bits",
    "train_accuracy",
    "val_nll_bits",
    "val_accuracy",
    "val_unigram_bits",
    "train_skipped_steps",
    "lr",
    "epoch_seconds",
    "elapsed_seconds",
    "stopped_by_time_budget",
)


def _conditions(prior: Prior, codes: CodeMaps, rows: torch.Tensor, device: torch.device):
    if not prior.conditional:
        return None
    return codes.slice_positions[rows].to(device)


def prior_loss(
    prior: torch.nn.Module,
    indices: torch.Tensor,
    slice_position: torch.Tensor | None,
    conditional: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy in nats per code and the number of codes predicted exactly.
    ``prior`` may be wrapped (DDP); ``conditional`` says whether it takes positions."""
    logits = prior(indices, slice_position) if conditional else prior(indices)  # (B, K, h, w)
    loss = F.cross_entropy(logits.float(), indices)
    correct = (logits.argmax(dim=1) == indices).sum()
    return loss, correct


@torch.no_grad()
def evaluate_prior(
    prior: Prior,
    codes: CodeMaps,
    device: torch.device,
    batch_size: int = 64,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> dict[str, float]:
    """Negative log-likelihood in bits per code and next-code accuracy over a whole split (in
    a distributed run each process scores its share and all return the whole split's)."""
    prior.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, codes right
    mine = processes.shard(torch.arange(len(codes)))
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        indices = codes.indices[rows].to(device)
        conditions = _conditions(prior, codes, rows, device)
        loss, hits = prior_loss(prior, indices, conditions, prior.conditional)
        totals += torch.stack([loss.double() * indices.numel(), hits.double()])
    processes.sum(totals)
    count = codes.indices.numel()
    nats, correct = totals.tolist()
    return {"nll_bits": nats / count / math.log(2), "accuracy": correct / count}


class PriorTask(TrainingTask):
    """The prior stage: next-code cross-entropy on code maps, validation bits per code beside
    the unigram baseline, and sample grids decoded through the frozen VQ-VAE."""

    kind = "prior"
    metric_columns = PRIOR_METRIC_COLUMNS
    score_column = "val_nll_bits"
    epoch_name = "prior epoch"
    sum_width = 3  # nats summed over the step's codes, codes predicted exactly, codes

    def __init__(
        self,
        prior: Prior,
        train_codes: CodeMaps,
        val_codes: CodeMaps,
        config: Config,
        run: RunFolder,
        device: torch.device,
        vqvae: VQVAE,
        vqvae_path: str | Path,
        vqvae_sha256: str,
        processes: ProcessGroup = SINGLE_PROCESS,
    ) -> None:
        self.config, self.settings, self.run = config, config.prior_train, run
        self.model, self.device, self.processes = prior.to(device), device, processes
        self.train_codes, self.val_codes = train_codes, val_codes
        self.vqvae = vqvae.to(device).eval()
        self.vqvae_path, self.vqvae_sha256 = str(vqvae_path), vqvae_sha256
        self.trainer = (
            DistributedDataParallel(
                prior, device_ids=[device.index] if device.type == "cuda" else None
            )
            if processes.enabled
            else prior
        )
        self.optimizer = torch.optim.AdamW(
            prior.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )
        self.unigram_bits = val_codes.unigram_bits()

    def __len__(self) -> int:
        return len(self.train_codes)

    def begin_epoch(self, restored: dict[str, Any] | None) -> None:
        self.model.train()

    def loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        indices = self.train_codes.indices[rows].to(self.device)
        conditions = _conditions(self.model, self.train_codes, rows, self.device)
        with autocast(self.device, self.settings.precision):
            loss, hits = prior_loss(self.trainer, indices, conditions, self.model.conditional)
        return loss, (indices.numel(), hits, loss)

    def step_sums(self, rows: torch.Tensor, output: Any) -> torch.Tensor:
        count, hits, loss = output
        return torch.stack(
            [
                loss.detach().double() * count,
                hits.double(),
                torch.full((), count, dtype=torch.float64, device=self.device),
            ]
        )

    def train_metrics(
        self, sums: torch.Tensor, history: list[dict[str, Any]], processes: ProcessGroup
    ) -> dict[str, Any]:
        nats, correct, predicted = sums.sum(0).tolist()
        per_code = 1 / predicted if predicted else math.nan
        return {
            "train_nll_bits": nats * per_code / math.log(2),
            "train_accuracy": correct * per_code,
        }

    def validate(self, processes: ProcessGroup) -> dict[str, Any]:
        val = evaluate_prior(
            self.model, self.val_codes, self.device, self.settings.batch_size, processes
        )
        return {
            "val_nll_bits": val["nll_bits"],
            "val_accuracy": val["accuracy"],
            "val_unigram_bits": self.unigram_bits,
        }

    def describe(self, row: dict[str, Any]) -> str:
        return (
            f"train {row['train_nll_bits']:.3f} bits/code | val {row['val_nll_bits']:.3f} "
            f"bits/code (unigram {row['val_unigram_bits']:.3f}), next-code accuracy "
            f"{100 * row['val_accuracy']:.1f}%"
        )

    def after_epoch(
        self, epoch: int, global_step: int, last: bool, board: TensorBoardLog | None
    ) -> None:
        every = self.settings.sample_every
        if not every or (epoch % every and not last):
            return
        count = self.settings.num_preview_samples
        position = 0.5 if self.model.conditional else None
        run = generate_samples(
            self.vqvae, self.model, count, self.config.sample, position, self.settings.seed
        )
        where = " at slice position 0.5" if position is not None else ""
        plots.image_grid(
            run.images.numpy(),
            self.run.prior_samples / epoch_picture(epoch),
            title=f"prior samples, epoch {epoch}{where}",
        )
        if board is not None:
            board.image_rows("samples", list(run.images.split(8)), global_step)

    def extras(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.model.num_embeddings,
            "grid_shape": list(self.model.grid_shape),
            "vqvae_sha256": self.vqvae_sha256,
            "vqvae_path": self.vqvae_path,
        }

    def finish(self, history: list[dict[str, Any]]) -> None:
        plots.nll_curves(history, self.run.nll_curves)


def train_prior(
    prior: Prior,
    train_codes: CodeMaps,
    val_codes: CodeMaps,
    config: Config,
    run_dir: str | Path,
    device: torch.device,
    vqvae: VQVAE,
    vqvae_path: str | Path,
    vqvae_sha256: str,
    resume: Checkpoint | None = None,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> FitResult:
    """Fit ``prior`` to ``train_codes`` by next-code cross-entropy through
    :func:`~mri_vqvae.train.loop.fit`, writing a run folder.

    Each epoch logs train and validation negative log-likelihood in bits per code and
    next-code accuracy beside the validation codes' unigram entropy, saves ``last.pt`` and,
    when validation NLL improves, ``best.pt``; every ``prior_train.sample_every`` epochs (and
    after the last) it decodes samples to ``samples/epoch_<N>.png`` through ``vqvae``.
    """
    precision = resolve_precision(config.prior_train.precision, device)
    # The run records what "auto" became here, as the VQ-VAE's does.
    config = replace(config, prior_train=replace(config.prior_train, precision=precision))
    if resume is not None:
        load_weights(prior, resume, run_dir)
    task = PriorTask(
        prior,
        train_codes,
        val_codes,
        config,
        RunFolder(Path(run_dir)),
        device,
        vqvae,
        vqvae_path,
        vqvae_sha256,
        processes,
    )
    return fit(task, run_dir, processes, resume)
