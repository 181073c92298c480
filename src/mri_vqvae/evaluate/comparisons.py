"""Samples against reference sets, each figure beside its null and the shift.

The prior learned the code maps of the training slices, so samples are compared first with
reconstructions of training slices (memorisation is measured separately). The reconstructions
are split into two random halves, A and B:

- ``samples_vs_train_reconstructions``: samples against half A, the figure itself;
- ``null_train_halves``: half B against half A. Both are one distribution, so a sound measure
  reports no difference here; a perfect generator's samples would score like half B;
- ``shift_train_vs_held_out_reconstructions``: reconstructions of held-out slices against half
  A, how much of a figure is merely other cases;
- ``samples_vs_held_out_reconstructions`` and ``samples_vs_held_out_real``: read beside the shift.

Samples that carry the VQ-VAE's acquisition texture are compared with reconstructions as the
decoder's mean of their codes (``samples``), since noise on both sides would only blunt the
classifier, and with real slices as written, texture and all (``samples_as_written``).

Each pair is compared by a two-sample classifier, KID and density/coverage, the last two in both
feature spaces of :mod:`mri_vqvae.evaluate.features`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.distances import (
    density_and_coverage,
    kernel_inception_distance,
    median_distance,
    standardiser,
)
from mri_vqvae.evaluate.features import FeatureSpaces
from mri_vqvae.evaluate.sample_metrics import classifier_two_sample_test, null_verdict
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records.samples import (
    COMPARISON_LABELS,
    DensityCoverageFamily,
    KidFamily,
    SampleTwoSample,
)

PRIMARY, NULL, SHIFT = tuple(COMPARISON_LABELS)[:3]
# (compared set, reference set) of every comparison, by the names of ReferenceSets' fields, in
# the order of the records' COMPARISON_LABELS.
COMPARISONS = dict(
    zip(
        COMPARISON_LABELS,
        (
            ("samples", "train_half_a"),
            ("train_half_b", "train_half_a"),
            ("held_out_reconstructions", "train_half_a"),
            ("samples", "held_out_reconstructions"),
            ("samples_as_written", "held_out_real"),
        ),
        strict=True,
    )
)


@dataclass(frozen=True)
class Comparisons:
    """Every comparison by every measure, and how long each measure took."""

    two_sample: SampleTwoSample
    kid: dict[str, KidFamily]
    density_coverage: dict[str, DensityCoverageFamily]
    seconds_by_measure: dict[str, float]

    def figures(self) -> dict[str, object]:
        """The comparisons by the names of :class:`SampleMeasures`' fields."""
        return {
            "two_sample": self.two_sample,
            "kid": self.kid,
            "density_coverage": self.density_coverage,
            "seconds_by_measure": self.seconds_by_measure,
        }


@dataclass
class ReferenceSets:
    """The image sets ``(N, 1, H, W)`` one evaluation compares."""

    samples: torch.Tensor
    samples_as_written: torch.Tensor  # the same samples as their files hold them
    train_half_a: torch.Tensor
    train_half_b: torch.Tensor
    held_out_reconstructions: torch.Tensor
    held_out_real: torch.Tensor
    # Real training slices (those reconstructed): the autoencoder feature space learns them.
    train_real: torch.Tensor


def split_in_halves(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of ``range(count)`` (the odd one out is left unused)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    half = count // 2
    return order[:half], order[half : 2 * half]


def _kid_family(
    features: dict[str, torch.Tensor], protocol: SampleProtocol, seed: int
) -> KidFamily:
    """KID of every comparison, the null's level and the figure's ratio to it."""
    width = None
    if protocol.kid_kernel == "gaussian":
        # One width per feature space, from the whole training reference, so every comparison
        # in the space is measured on one scale.
        width = median_distance(torch.cat([features["train_half_a"], features["train_half_b"]]))
    figures = {
        name: kernel_inception_distance(
            features[compared],
            features[reference],
            subsets=protocol.kid_subsets,
            max_subset_size=protocol.kid_subset_size,
            seed=seed,
            kernel=protocol.kid_kernel,
            width=width,
        )
        for name, (compared, reference) in COMPARISONS.items()
    }
    null = figures[NULL]
    # The null's expectation is 0; the size a KID between two halves of one set reaches at this
    # sample size is its mean's magnitude plus its spread over subsets. "KID at most 2x its
    # null" compares the figure with that level, not with a mean that may be 0 or negative.
    null_level = abs(null.mean) + null.std
    return KidFamily(
        kernel=protocol.kid_kernel,
        kernel_width=width,
        null_level=null_level,
        ratio_to_null=figures[PRIMARY].mean / null_level if null_level > 0 else None,
        **figures,
    )


def _density_coverage_family(
    features: dict[str, torch.Tensor], protocol: SampleProtocol, seed: int
) -> DensityCoverageFamily:
    """Density and coverage of every comparison, both sets cut to the smaller's size, since
    coverage grows with the number of compared vectors."""
    generator = torch.Generator().manual_seed(seed)
    figures = {}
    for name, (compared, reference) in COMPARISONS.items():
        count = min(len(features[compared]), len(features[reference]))
        picked = [
            features[key][torch.randperm(len(features[key]), generator=generator)[:count]]
            for key in (reference, compared)
        ]
        figures[name] = density_and_coverage(*picked, protocol.nearest_neighbours)
    return DensityCoverageFamily(**figures)


def _two_sample_family(
    features: dict[str, torch.Tensor], protocol: SampleProtocol, seed: int
) -> SampleTwoSample:
    figures = {
        name: classifier_two_sample_test(features[compared], features[reference], protocol, seed)
        for name, (compared, reference) in COMPARISONS.items()
    }
    verdict = null_verdict(figures[NULL], protocol)
    return SampleTwoSample(
        features=protocol.classifier_features,
        trustworthy=verdict.trustworthy,
        untrustworthy_reason=verdict.untrustworthy_reason,
        **figures,
    )


def compare_sets(sets: ReferenceSets, protocol: SampleProtocol, seed: int) -> Comparisons:
    """Every comparison of ``sets`` by every measure, under ``protocol``."""
    # Each comparison needs a vector per fold, more than k neighbours and two KID subsets of 2.
    needed = max(protocol.classifier_folds, protocol.nearest_neighbours + 1, 4)
    sizes = {name: len(getattr(sets, name)) for pair in COMPARISONS.values() for name in pair}
    if min(sizes.values()) < needed:
        raise InputError(
            f"the sample measures of protocol {protocol.name} need at least {needed} images "
            f"in every set, got {sizes} (train halves are halves of the reconstructed "
            "training slices, sample_metrics.reference_slices)"
        )
    clock = Stopwatch()
    spaces = FeatureSpaces(sets.train_real, protocol)
    clock.lap("autoencoder_training")
    by_space = _standardised_features(sets, spaces, sorted(sizes))
    clock.lap("features")
    two_sample = _two_sample_family(by_space[protocol.classifier_features], protocol, seed)
    clock.lap("two_sample")
    kid = {space: _kid_family(f, protocol, seed) for space, f in by_space.items()}
    clock.lap("kid")
    density_coverage = {
        space: _density_coverage_family(f, protocol, seed) for space, f in by_space.items()
    }
    clock.lap("density_coverage")
    return Comparisons(two_sample, kid, density_coverage, clock.laps)


def _standardised_features(
    sets: ReferenceSets, spaces: FeatureSpaces, names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{space: {set name: (N, F) features}}``, standardised in each space by the whole
    training reference (both halves), so all comparisons in a space share one scale."""
    by_space: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        for space, vectors in spaces(getattr(sets, name)).items():
            by_space.setdefault(space, {})[name] = vectors
    for space, features in by_space.items():
        standardise = standardiser(torch.cat([features["train_half_a"], features["train_half_b"]]))
        by_space[space] = {name: standardise(vectors) for name, vectors in features.items()}
    return by_space


class Stopwatch:
    """Seconds spent in each named stretch of work, for the summary and the benchmark."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap (or the start) under ``name``."""
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
