"""What the training runs write: a row of ``metrics.jsonl`` per epoch for each stage, and the
prior's ``prior_summary.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from mri_vqvae.records import Record


def columns(record: type) -> tuple[str, ...]:
    """A row record's field names: the columns of its ``metrics.csv``, in order."""
    return tuple(f.name for f in dataclasses.fields(record))


@dataclass(frozen=True, kw_only=True)
class VQVAEEpoch(Record):
    """One epoch of a VQ-VAE run. The adversarial columns are None in epochs without the term;
    ``val_psnr`` and a few counts are missing from runs older than they are."""

    DESCRIPTION: ClassVar[str] = "a row of a VQ-VAE run's metrics.jsonl"
    VERSION: ClassVar[int] = 0  # rows carry no version of their own

    epoch: int
    global_step: int
    images_seen: int
    train_loss: float
    train_reconstruction_loss: float
    train_ssim: float
    train_codebook_usage: float
    train_perplexity: float
    train_dead_code_restarts: int = 0
    train_adversarial_loss: float | None = None
    train_adversarial_weight: float | None = None
    train_discriminator_loss: float | None = None
    train_skipped_steps: int = 0
    lr: float
    val_loss: float
    val_reconstruction_loss: float
    val_ssim: float
    val_psnr: float = math.nan
    val_codebook_usage: float
    val_perplexity: float
    epoch_seconds: float
    elapsed_seconds: float
    stopped_by_time_budget: bool


@dataclass(frozen=True)
class PriorEpoch(Record):
    """One epoch of a prior's run: bits per code and accuracy, train and validation."""

    DESCRIPTION: ClassVar[str] = "a row of a prior run's metrics.jsonl"
    VERSION: ClassVar[int] = 0

    epoch: int
    global_step: int
    train_nll_bits: float
    train_accuracy: float
    val_nll_bits: float
    val_accuracy: float
    val_unigram_bits: float
    train_skipped_steps: int
    lr: float
    epoch_seconds: float
    elapsed_seconds: float
    stopped_by_time_budget: bool


@dataclass(frozen=True)
class PriorSummary(Record):
    """A prior's best checkpoint scored on the validation and test code maps."""

    DESCRIPTION: ClassVar[str] = "a prior's prior_summary.json"

    best_epoch: int
    val_nll_bits: float
    val_unigram_bits: float
    test_nll_bits: float
    test_accuracy: float
    test_unigram_bits: float
    # 1 + augment.copies: each slice's plain map and its augmented copies.
    train_maps_per_slice: float
    train_maps: int
    vqvae: str
    vqvae_sha256: str

    @property
    def below_unigram(self) -> float:
        """How far the validation NLL lies below the code histogram's entropy, as a share."""
        return 1 - self.val_nll_bits / self.val_unigram_bits
