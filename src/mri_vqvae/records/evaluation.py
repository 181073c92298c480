"""What ``evaluate`` (and a run's end-of-training validation) writes to ``metrics.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mri_vqvae.records import Record
from mri_vqvae.records.measures import TwoSampleTest


@dataclass(frozen=True)
class SpectrumGaps:
    """How far a set's radially averaged power spectrum lies from the real slices', in dB."""

    largest_gap_db_up_to_half_nyquist: float
    mean_gap_db_above_half_nyquist: float | None = None


@dataclass(frozen=True)
class PowerSpectra:
    """The real slices', the reconstructions' and (with a texture) the textured
    reconstructions' power by frequency (cycles per pixel), and the gaps."""

    frequencies: tuple[float, ...]
    real: tuple[float, ...]
    reconstructions: tuple[float, ...]
    largest_gap_db_up_to_half_nyquist: float
    mean_gap_db_above_half_nyquist: float | None = None
    textured_reconstructions: tuple[float, ...] | None = None
    textured: SpectrumGaps | None = None


@dataclass(frozen=True)
class ReconstructionTwoSample:
    """Reconstructions against real slices, by the two-sample classifier: each figure the
    mean over ``halvings`` random halvings; left out, with the reason, on too few slices."""

    features: str
    protocol: str
    skipped: str | None = None
    halvings: int | None = None
    reconstructions_vs_real: TwoSampleTest | None = None
    textured_reconstructions_vs_real: TwoSampleTest | None = None
    null_real_halves: TwoSampleTest | None = None
    trustworthy: bool | None = None
    untrustworthy_reason: str | None = None


@dataclass(frozen=True)
class RealismSummary:
    """How far reconstructions are from passing for real slices."""

    two_sample: ReconstructionTwoSample
    power_spectrum: PowerSpectra


@dataclass(frozen=True)
class EvaluationSummary(Record):
    """A split's reconstruction figures: means and minima of every per-image score, code use,
    the best and worst slice, and how far reconstructions are from passing for real."""

    DESCRIPTION: ClassVar[str] = "an evaluation's metrics.json"

    split: str
    n_images: int
    ssim_mean: float
    ssim_min: float
    ssim_std: float
    ssim_max: float
    psnr_mean: float
    psnr_min: float
    foreground_ssim_mean: float
    foreground_ssim_min: float
    foreground_psnr_mean: float
    foreground_psnr_min: float
    ssim_seed_protocol_mean: float
    ssim_seed_protocol_min: float
    images_without_foreground: int
    codebook_usage: float
    codes_used: int
    perplexity: float
    best_image: str
    worst_image: str
    # How each SSIM was computed, by the name of its column.
    protocols: dict[str, str] = field(default_factory=dict)
    textured_ssim_mean: float | None = None
    textured_psnr_mean: float | None = None
    # Evaluations written before reconstructions were scored for realism have neither.
    two_sample: ReconstructionTwoSample | None = None
    power_spectrum: PowerSpectra | None = None

    @property
    def textured(self) -> bool:
        """Whether textured reconstructions were scored beside the plain ones."""
        return self.textured_ssim_mean is not None
