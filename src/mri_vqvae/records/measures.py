"""The figures the measures share: a two-sample test, KID, density and coverage, a
distribution. They appear inside the evaluation and sample-measure records."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TwoSampleTest:
    """A classifier two-sample test (Lopez-Paz & Oquab 2017): held-out accuracy telling two
    sets apart (0.5 = indistinguishable) and its 95% Clopper-Pearson interval. A figure
    averaged over random halvings also says how many and how far they spread."""

    accuracy: float
    ci95_low: float
    ci95_high: float
    images_per_set: int
    train_accuracy: float
    halvings: int = 1
    # Between halvings (ddof 0): a spread of the draws, not an uncertainty of the mean.
    accuracy_sd: float | None = None
    accuracy_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class NullVerdict:
    """Whether the figures beside a null can be trusted, and if not why."""

    trustworthy: bool
    untrustworthy_reason: str | None = None


@dataclass(frozen=True)
class KernelDistance:
    """KID's mean and spread over random subsets of each set."""

    mean: float
    std: float
    subset_size: int
    subsets: int


@dataclass(frozen=True)
class DensityCoverage:
    """Density and coverage of a compared set against a reference (Naeem et al. 2020)."""

    density: float
    coverage: float
    neighbours: int


@dataclass(frozen=True)
class Distribution:
    """Mean, spread and quantiles of a set of values."""

    mean: float
    std: float
    min: float
    p05: float
    median: float
    p95: float
    max: float
