"""Stage 2: a prior over a frozen VQ-VAE's code maps, as a task of the one
training loop (:mod:`mri_vqvae.train.loop`)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mri_vqvae import plots
from mri_vqvae.checkpoint import (
    Checkpoint,
    PriorExtras,
    TrainingConditions,
    load_weights,
    read_training_data,
)
from mri_vqvae.code_maps import CodeMaps
from mri_vqvae.config import Config
from mri_vqvae.data.fingerprint import (
    TRAINING_DATA,
    SplitFingerprint,
    check_resumed_data,
    fingerprints_to_plain,
)
from mri_vqvae.data.labels import LabelVocabulary
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.files import RunFolder, epoch_picture
from mri_vqvae.generate.conditions import draw_conditions
from mri_vqvae.generate.samples import generate_samples
from mri_vqvae.model.prior import ConditionSizes, Prior, PriorConditions, random_masks
from mri_vqvae.records.training import PriorEpoch, PriorSummary, columns
from mri_vqvae.runtime import autocast, precision_choice
from mri_vqvae.train.ema import WeightAverage
from mri_vqvae.train.loop import FitResult, StepSums, TrainingTask, fit
from mri_vqvae.train.tensorboard import TensorBoardLog
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE

logger = logging.getLogger(__name__)

# The prior's columns of metrics.csv, in order: the fields of its epoch record.
PRIOR_METRIC_COLUMNS = columns(PriorEpoch)

# What each training step adds up: nats over the step's predicted codes, the codes predicted
# right, and the codes predicted.
STEP_SUMS = ("nats", "correct", "predicted")


def prior_loss(
    prior: torch.nn.Module,
    indices: torch.Tensor,
    conditions: PriorConditions | None,
    masks: torch.Tensor | None = None,
    mask_token: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy in nats per predicted code, the number predicted exactly and the
    number predicted. ``prior`` may be wrapped (DDP). An autoregressive prior predicts every
    code from those before it; a masked one gets ``mask_token`` where ``masks (B, h*w)`` is
    true and predicts those codes only."""
    inputs = indices
    if masks is not None:
        inputs = indices.flatten(1).masked_fill(masks, mask_token).reshape(indices.shape)
    logits = prior(inputs) if conditions is None else prior(inputs, conditions)  # (B, K, h, w)
    if masks is None:
        loss = F.cross_entropy(logits.float(), indices)
        return loss, (logits.argmax(dim=1) == indices).sum(), indices.numel()
    chosen = logits.flatten(2).transpose(1, 2)[masks]  # (M, K) at the masked positions
    targets = indices.flatten(1)[masks]
    loss = F.cross_entropy(chosen.float(), targets)
    return loss, (chosen.argmax(dim=1) == targets).sum(), targets.numel()


def training_masks(prior: Prior, batch: int, device: torch.device, generator=None):
    """Masks for a batch of a masked prior (None for an autoregressive one). With a CPU
    ``generator`` they are drawn on the CPU, so validation masks are the same on any device."""
    if prior.autoregressive:
        return None
    masks = random_masks(batch, prior.sequence_length, generator=generator)
    return masks.to(device)


class PriorScore(NamedTuple):
    """A prior's cross-entropy in bits per predicted code, and how many it predicts exactly."""

    nll_bits: float
    accuracy: float


@torch.no_grad()
def evaluate_prior(
    prior: Prior,
    codes: CodeMaps,
    device: torch.device,
    *,
    batch_size: int = 64,
    processes: ProcessGroup = SINGLE_PROCESS,
    seed: int = 0,
) -> PriorScore:
    """Cross-entropy in bits per predicted code and accuracy over a whole split (in a
    distributed run each process scores its share and all return the whole split's).

    For an autoregressive prior this is the negative log-likelihood of the maps. A masked prior
    has no exact likelihood: it is scored on its masked codes, with masks drawn from ``seed``
    so that every epoch and every run sees the same ones.
    """
    prior.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, right, predicted
    # Every map's mask drawn up front from the seed, so batch size and processes change none.
    all_masks = training_masks(prior, len(codes), device, torch.Generator().manual_seed(seed))
    mine = processes.shard(torch.arange(len(codes)))
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        indices = codes.indices[rows].to(device)
        conditions = codes.conditions(rows, prior.condition_sizes, device)
        masks = None if all_masks is None else all_masks[rows.to(device)]
        mask_token = getattr(prior, "mask_token", None)
        loss, hits, count = prior_loss(prior, indices, conditions, masks, mask_token)
        totals += torch.tensor([float(loss) * count, float(hits), count], device=device)
    processes.sum(totals)
    nats, correct, count = totals.tolist()
    return PriorScore(nll_bits=nats / count / math.log(2), accuracy=correct / count)


def training_conditions(codes: CodeMaps, sizes: ConditionSizes) -> TrainingConditions:
    """The slice positions and labels of the plain training maps, kept in the checkpoint so
    that sampling without a given condition draws them from the training distribution."""
    # The plain maps come first; augmented copies after them repeat their slices' conditions.
    plain = torch.arange(codes.slice_count)
    return TrainingConditions(
        position=codes.slice_positions[plain].float() if sizes.position else None,
        labels=codes.labels[plain] if sizes.labels else None,
    )


class PriorTask(TrainingTask):
    """The prior stage: cross-entropy on code maps (next-code for an autoregressive prior,
    masked codes for a masked one), validation bits per code beside the unigram baseline, a
    moving average of the weights for validation and sampling, and sample grids decoded
    through the frozen VQ-VAE."""

    kind = "prior"
    metric_columns = PRIOR_METRIC_COLUMNS
    score_column = "val_nll_bits"
    epoch_name = "prior epoch"
    sum_names = STEP_SUMS

    def __init__(
        self,
        prior: Prior,
        *,
        train_codes: CodeMaps,
        val_codes: CodeMaps,
        config: Config,
        run: RunFolder,
        vqvae: TrainedVQVAE,
        label_vocabulary: LabelVocabulary = (),
        training_data: dict[str, SplitFingerprint] | None = None,
        processes: ProcessGroup = SINGLE_PROCESS,
    ) -> None:
        self.config, self.settings, self.run = config, config.prior_train, run
        self.training_data = training_data or {}
        device = vqvae.device
        self.model, self.device, self.processes = prior.to(device), device, processes
        self.train_codes, self.val_codes = train_codes, val_codes
        self.vqvae = vqvae
        self.label_vocabulary = label_vocabulary
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
        decay = self.settings.ema_decay
        self.average = WeightAverage(prior, decay) if decay > 0 else None
        self.unigram_bits = self.val_codes.unigram_bits()

    @property
    def evaluated(self) -> Prior:
        """The weights validation and sampling use: the moving average, or the model's."""
        return self.model if self.average is None else self.average.module

    def __len__(self) -> int:
        return len(self.train_codes)

    def begin_epoch(self, restored: dict[str, Any] | None) -> None:
        self.model.train()

    def loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        indices = self.train_codes.indices[rows].to(self.device)
        sizes = self.model.condition_sizes
        conditions = self.train_codes.conditions(rows, sizes, self.device)
        if conditions is not None and self.settings.condition_dropout > 0:
            drop = torch.rand(len(rows), device=self.device) < self.settings.condition_dropout
            conditions = conditions.without_guided(drop)
        masks = training_masks(self.model, len(rows), self.device)
        with autocast(self.device, self.settings.precision):
            loss, hits, count = prior_loss(
                self.trainer, indices, conditions, masks, getattr(self.model, "mask_token", None)
            )
        return loss, (count, hits, loss)

    def after_step(self) -> None:
        if self.average is not None:
            self.average.update(self.model)

    def step_sums(self, rows: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        count, hits, loss = output
        return {
            "nats": loss.detach().double() * count,
            "correct": hits.double(),
            "predicted": torch.full((), count, dtype=torch.float64, device=self.device),
        }

    def train_metrics(
        self, sums: StepSums, history: list[dict[str, Any]], processes: ProcessGroup
    ) -> dict[str, Any]:
        predicted = sums.total("predicted")
        per_code = 1 / predicted if predicted else math.nan
        return {
            "train_nll_bits": sums.total("nats") * per_code / math.log(2),
            "train_accuracy": sums.total("correct") * per_code,
        }

    def validate(self, processes: ProcessGroup) -> dict[str, Any]:
        val = evaluate_prior(
            self.evaluated,
            self.val_codes,
            self.device,
            batch_size=self.settings.batch_size,
            processes=processes,
            seed=self.settings.seed,
        )
        return {
            "val_nll_bits": val.nll_bits,
            "val_accuracy": val.accuracy,
            "val_unigram_bits": self.unigram_bits,
        }

    def describe(self, row: dict[str, Any]) -> str:
        what = "next-code" if self.model.autoregressive else "masked-code"
        return (
            f"train {row['train_nll_bits']:.3f} bits/code | val {row['val_nll_bits']:.3f} "
            f"bits/code (unigram {row['val_unigram_bits']:.3f}), {what} accuracy "
            f"{100 * row['val_accuracy']:.1f}%"
        )

    def after_epoch(
        self, epoch: int, global_step: int, last: bool, board: TensorBoardLog | None
    ) -> None:
        every = self.settings.sample_every
        if not every or (epoch % every and not last):
            return
        count = self.settings.num_preview_samples
        generator = torch.Generator().manual_seed(self.settings.seed)
        conditions = draw_conditions(self.prior_extras(), count, generator)
        run = generate_samples(
            vqvae=self.vqvae,
            prior=self.evaluated,
            settings=replace(self.config.sample, num_samples=count, seed=self.settings.seed),
            conditions=conditions,
        )
        plots.image_grid(
            run.images.numpy(),
            self.run.prior_samples / epoch_picture(epoch),
            title=f"prior samples, epoch {epoch}",
        )
        if board is not None:
            board.image_rows("samples", list(run.images.split(8)), global_step)

    def prior_extras(self) -> PriorExtras:
        """What the prior's checkpoints record beside its weights."""
        sizes = self.model.condition_sizes
        return PriorExtras(
            num_embeddings=self.model.num_embeddings,
            grid_shape=tuple(self.model.grid_shape),
            vqvae_sha256=self.vqvae.sha256,
            vqvae_path=str(self.vqvae.path),
            condition_sizes=sizes,
            label_vocabulary=self.label_vocabulary,
            training_conditions=training_conditions(self.train_codes, sizes),
            ema=None if self.average is None else self.average.state_dict(),
        )

    def extras(self) -> dict[str, Any]:
        extras = self.prior_extras().to_plain()
        if self.training_data:
            extras[TRAINING_DATA] = fingerprints_to_plain(self.training_data)
        return extras

    def restore(self, extras: dict[str, Any]) -> None:
        saved = PriorExtras.from_plain(extras, self.run.last_checkpoint)
        if self.average is not None and saved.ema is not None:
            self.average.load_state_dict(saved.ema)

    def finish(self, history: list[dict[str, Any]]) -> None:
        plots.nll_curves(history, self.run.nll_curves)


def train_prior(
    prior: Prior,
    *,
    train_codes: CodeMaps,
    val_codes: CodeMaps,
    config: Config,
    run_dir: str | Path,
    vqvae: TrainedVQVAE,
    label_vocabulary: LabelVocabulary = (),
    training_data: dict[str, SplitFingerprint] | None = None,
    resume: Checkpoint | None = None,
    processes: ProcessGroup = SINGLE_PROCESS,
) -> FitResult:
    """Fit ``prior`` to ``train_codes`` through :func:`~mri_vqvae.train.loop.fit` on
    ``vqvae``'s device, writing a run folder: next-code cross-entropy for an autoregressive
    prior, masked-code cross-entropy for a masked one.

    Each epoch logs train and validation bits per code and accuracy beside the validation
    codes' unigram entropy, saves ``last.pt`` and, when validation improves, ``best.pt``; every
    ``prior_train.sample_every`` epochs (and after the last) it decodes samples to
    ``samples/epoch_<N>.png`` through ``vqvae``. ``label_vocabulary`` names the labels and
    their values, in the order the maps' label indices count them. ``training_data``, the
    fingerprints of the slice splits the maps were encoded from (``SliceSet.fingerprint`` by
    split name), is kept in the checkpoints, and a resumed run given other slices is refused.
    """
    device = vqvae.device
    precision, why = precision_choice(config.prior_train.precision, device, "prior_train.precision")
    if processes.is_main:
        logger.info("training the prior in %s (%s)", precision, why)
    # The run records what "auto" became here, as the VQ-VAE's does.
    config = replace(config, prior_train=replace(config.prior_train, precision=precision))
    if resume is not None:
        # The maps are the VQ-VAE's codes of these slices (the VQ-VAE file is checked on
        # loading), so the slices' bytes are what must match.
        check_resumed_data(
            read_training_data(resume, RunFolder(Path(run_dir)).last_checkpoint),
            training_data or {},
            run=run_dir,
        )
        load_weights(prior, resume, run_dir)
    task = PriorTask(
        prior,
        train_codes=train_codes,
        val_codes=val_codes,
        config=config,
        run=RunFolder(Path(run_dir)),
        vqvae=vqvae,
        label_vocabulary=label_vocabulary,
        training_data=training_data,
        processes=processes,
    )
    return fit(task, run_dir, processes, resume)


def summarise_prior(
    result: FitResult, *, codes: dict[str, CodeMaps], config: Config, vqvae: TrainedVQVAE
) -> PriorSummary:
    """The best epoch's validation figures and the best checkpoint's score on the test maps,
    with the weights sampling uses, for ``prior_summary.json``."""
    best = TrainedPrior.load(result.best_checkpoint, vqvae=vqvae)
    # best.pt is written when validation improves on every epoch before: the first lowest.
    best_epoch = min(result.history, key=lambda row: row["val_nll_bits"])
    settings = config.prior_train
    test = evaluate_prior(
        best.model, codes["test"], vqvae.device, batch_size=settings.batch_size, seed=settings.seed
    )
    return PriorSummary(
        best_epoch=best_epoch["epoch"],
        val_nll_bits=best_epoch["val_nll_bits"],
        val_unigram_bits=codes["val"].unigram_bits(),
        test_nll_bits=test.nll_bits,
        test_accuracy=test.accuracy,
        test_unigram_bits=codes["test"].unigram_bits(),
        train_maps_per_slice=codes["train"].maps_per_slice,
        train_maps=len(codes["train"]),
        vqvae=str(vqvae.path),
        vqvae_sha256=vqvae.sha256,
    )
