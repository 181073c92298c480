"""What ``sample`` writes to ``samples.json`` and ``evaluate-samples`` to
``sample_metrics.json``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from mri_vqvae.config import SampleConfig, SampleMetricsConfig
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records import Record, json_key
from mri_vqvae.records.measures import (
    DensityCoverage,
    Distribution,
    KernelDistance,
    TwoSampleTest,
)

# A sample file's name as ``sample`` writes it: a plain name in the folder, never a path.
SAMPLE_FILE = re.compile(r"sample_[0-9]{4,}\.nii\.gz")


@dataclass(frozen=True, kw_only=True)
class SampleConditions:
    """What the samples were conditioned on: what was given for all of them, and each
    sample's slice position and labels (those not given drawn from the training slices)."""

    conditioned: bool
    guidance: float | None = None
    given_slice_position: float | None = None
    given_labels: dict[str, str] = field(default_factory=dict)
    not_given: str | None = None
    slice_position: tuple[float, ...] | None = None
    # Each label's value per sample (None where the training slice had none).
    labels: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    augmentation: str | None = None


@dataclass(frozen=True, kw_only=True)
class SampleTexture:
    """Whether a draw of the VQ-VAE's acquisition texture was added to the samples, and if
    not why."""

    applied: bool
    reason: str | None = None
    fitted_slices: int | None = None
    intensity_bins: int | None = None
    seed: int | None = None


@dataclass(frozen=True, kw_only=True)
class SampleGeometry:
    """The geometry the sample files carry, and where it came from."""

    source: str
    shape: tuple[int, int]
    affine: tuple[tuple[float, ...], ...]
    zooms: tuple[float, ...]
    stored_shape: tuple[int, ...] | None = None
    decoded_shape: tuple[int, int] | None = None
    resized: bool | None = None
    spatial_unit: str | None = None
    sform_code: int | None = None
    qform_code: int | None = None


@dataclass(frozen=True, kw_only=True)
class SampleIntensities:
    """The intensity range the sample files carry, and where it came from."""

    source: str
    range: tuple[float, float]
    dtype: str


@dataclass(frozen=True, kw_only=True)
class SampleMetadata(Record):
    """A sample folder's record: which models drew the samples with which settings, how long
    it took, and what geometry and intensities the files carry."""

    DESCRIPTION: ClassVar[str] = "a sample folder's samples.json"

    vqvae: str
    vqvae_sha256: str
    prior: str
    prior_sha256: str
    prior_architecture: str
    settings: SampleConfig
    seed: int
    slice_position: float | None = None
    conditions: SampleConditions = field(
        default_factory=lambda: SampleConditions(conditioned=False)
    )
    # Folders drawn before the texture existed record none.
    texture: SampleTexture | None = None
    device: str
    num_samples: int
    grid_shape: tuple[int, int]
    image_size: tuple[int, int]
    sampling_seconds: float
    decoding_seconds: float
    codes_per_second: float
    geometry: SampleGeometry
    intensities: SampleIntensities
    # The sample files, in drawing order: the folder's samples are exactly these (folders
    # drawn before this was recorded list none, and are read as their sample_*.nii.gz).
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.files:
            if not SAMPLE_FILE.fullmatch(name):
                raise ValueError(
                    f"files: {name[:60]!r} is not a sample file's name (sample_0000.nii.gz)"
                )
        if self.files and len(self.files) != self.num_samples:
            raise ValueError(
                f"files: lists {len(self.files)} files for num_samples {self.num_samples}"
            )

    @property
    def textured(self) -> bool:
        """Whether the sample files carry a draw of the acquisition texture."""
        return self.texture is not None and self.texture.applied


# The comparisons of the sample measures, in reading order: the figure, its null, the shift,
# then the samples against held-out sets (read beside the shift); each with its label.
COMPARISON_LABELS = {
    "samples_vs_train_reconstructions": "samples vs training reconstructions",
    "null_train_halves": "null: two halves of training reconstructions",
    "shift_train_vs_held_out_reconstructions": "shift: training vs held-out reconstructions",
    "samples_vs_held_out_reconstructions": "samples vs held-out reconstructions",
    "samples_vs_held_out_real": "samples vs real held-out slices",
}


class _ByComparison:
    """A family of figures with one field per comparison of :data:`COMPARISON_LABELS`."""

    def by_comparison(self) -> list[tuple[str, str, object]]:
        """``(name, label, figure)`` of every comparison, in reading order."""
        return [(name, label, getattr(self, name)) for name, label in COMPARISON_LABELS.items()]


@dataclass(frozen=True, kw_only=True)
class SampleTwoSample(_ByComparison):
    """The two-sample classifier's accuracy for every comparison, and the null's verdict."""

    features: str
    samples_vs_train_reconstructions: TwoSampleTest
    null_train_halves: TwoSampleTest
    shift_train_vs_held_out_reconstructions: TwoSampleTest
    samples_vs_held_out_reconstructions: TwoSampleTest
    samples_vs_held_out_real: TwoSampleTest
    trustworthy: bool
    untrustworthy_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class KidFamily(_ByComparison):
    """KID of every comparison in one feature space, the null's level and the figure's ratio
    to it."""

    kernel: str
    kernel_width: float | None = None
    samples_vs_train_reconstructions: KernelDistance
    null_train_halves: KernelDistance
    shift_train_vs_held_out_reconstructions: KernelDistance
    samples_vs_held_out_reconstructions: KernelDistance
    samples_vs_held_out_real: KernelDistance
    null_level: float
    ratio_to_null: float | None = None


@dataclass(frozen=True, kw_only=True)
class DensityCoverageFamily(_ByComparison):
    """Density and coverage of every comparison in one feature space."""

    samples_vs_train_reconstructions: DensityCoverage
    null_train_halves: DensityCoverage
    shift_train_vs_held_out_reconstructions: DensityCoverage
    samples_vs_held_out_reconstructions: DensityCoverage
    samples_vs_held_out_real: DensityCoverage


@dataclass(frozen=True, kw_only=True)
class MeasuredTexture:
    """How samples carrying the acquisition texture were compared."""

    samples_textured: bool
    against_reconstructions: str | None = None
    against_real_slices: str | None = None
    memorisation_searched_with: str | None = None


# A sample whose highest SSIM to a training slice is above this counts as memorised.
MEMORISATION_SSIM = 0.95


@dataclass(frozen=True, kw_only=True)
class SampleMeasures(Record):
    """What ``evaluate-samples`` measured of a sample folder: every comparison beside its null
    and the shift, memorisation, diversity, code statistics and which targets were met."""

    DESCRIPTION: ClassVar[str] = "a sample evaluation's sample_metrics.json"

    protocol: SampleProtocol
    texture: MeasuredTexture
    num_samples: int
    num_held_out: int
    num_train: int
    num_train_reconstructed: int
    two_sample: SampleTwoSample
    kid: dict[str, KidFamily]
    density_coverage: dict[str, DensityCoverageFamily]
    seconds_by_measure: dict[str, float] = field(default_factory=dict)
    nearest_train_ssim_samples: Distribution
    nearest_train_ssim_held_out: Distribution
    share_samples_memorised: float = field(metadata=json_key("share_samples_above_0.95"))
    share_held_out_memorised: float = field(metadata=json_key("share_held_out_above_0.95"))
    pairwise_ssim_samples: float
    pairwise_ssim_held_out: float
    pairwise_ssim_reconstructions: float
    diversity_ratio: float
    diversity_ratio_vs_reconstructions: float
    code_js_divergence_bits: float
    code_js_divergence_train_vs_held_out_bits: float
    codes_used_by_samples: int
    codes_used_by_held_out: int
    targets: dict[str, bool] = field(default_factory=dict)
    settings: SampleMetricsConfig
    seconds: float
