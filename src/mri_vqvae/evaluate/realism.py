"""How far a split's reconstructions are from passing for its real slices: the two-sample
classifier over random halvings, and the gap between their power spectra."""

from __future__ import annotations

import numpy as np
import torch

from mri_vqvae.evaluate.comparisons import split_in_halves
from mri_vqvae.evaluate.sample_metrics import (
    classifier_two_sample_test,
    clopper_pearson,
    null_verdict,
)
from mri_vqvae.evaluate.split import SplitEvaluation
from mri_vqvae.metrics import spectrum_gap_db
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records.evaluation import (
    PowerSpectra,
    RealismSummary,
    ReconstructionTwoSample,
    SpectrumGaps,
)
from mri_vqvae.records.measures import TwoSampleTest


def realism_summary(
    result: SplitEvaluation, protocol: SampleProtocol, seed: int = 0
) -> RealismSummary:
    """How far reconstructions are from passing for the real slices: the two-sample
    classifier of the sample measures, and the power spectra's gap in dB; the same for the
    textured reconstructions where the evaluation has them.

    The slices are split into two random halves, A and B. The figure tells reconstructions
    of half A from the real slices of half B: unpaired, since a slice and its own
    reconstruction in the classifier's training and held-out folds would leak; the null
    tells real half A from real half B, at the same size. Each figure is the mean over
    ``protocol.realism_halvings`` random halvings (seeds ``seed``, ``seed + 1``, ...), so it
    does not hang on one draw of the halves. Both are left out (with the reason) when a half
    is smaller than the classifier's folds."""
    return RealismSummary(
        two_sample=_two_sample(result, protocol, seed),
        power_spectrum=_power_spectra(result),
    )


def _two_sample(
    result: SplitEvaluation, protocol: SampleProtocol, seed: int
) -> ReconstructionTwoSample:
    halvings = protocol.realism_halvings
    if halvings < 1:
        raise ValueError(f"{protocol.name}: realism_halvings must be at least 1, got {halvings}")
    count = len(result.names)
    half = count // 2
    if half < protocol.classifier_folds:
        return ReconstructionTwoSample(
            features="random_cnn",
            protocol=protocol.name,
            skipped=f"{count} slices: halves of {half} are fewer than the classifier's "
            f"{protocol.classifier_folds} folds",
        )
    # One set of halvings for every figure, so plain, textured and null are comparable.
    halves = [(seed + k, *split_in_halves(count, seed + k)) for k in range(halvings)]

    def over_halvings(features: torch.Tensor | None) -> TwoSampleTest | None:
        if features is None:
            return None
        return _over_halvings(features, result.real_features, halves, protocol)

    null = over_halvings(result.real_features)
    verdict = null_verdict(null, protocol)
    return ReconstructionTwoSample(
        features="random_cnn",
        protocol=protocol.name,
        halvings=halvings,
        reconstructions_vs_real=over_halvings(result.reconstruction_features),
        textured_reconstructions_vs_real=over_halvings(result.textured_features),
        null_real_halves=null,
        trustworthy=verdict.trustworthy,
        untrustworthy_reason=verdict.untrustworthy_reason,
    )


def _power_spectra(result: SplitEvaluation) -> PowerSpectra:
    plain = _spectrum_gaps(result, result.reconstruction_power)
    textured = result.textured_power
    return PowerSpectra(
        frequencies=tuple(result.frequencies.round(6).tolist()),
        real=tuple(result.real_power.tolist()),
        reconstructions=tuple(result.reconstruction_power.tolist()),
        largest_gap_db_up_to_half_nyquist=plain.largest_gap_db_up_to_half_nyquist,
        mean_gap_db_above_half_nyquist=plain.mean_gap_db_above_half_nyquist,
        textured_reconstructions=None if textured is None else tuple(textured.tolist()),
        textured=None if textured is None else _spectrum_gaps(result, textured),
    )


def _over_halvings(
    half_a_features: torch.Tensor,
    real_features: torch.Tensor,
    halves: list[tuple[int, torch.Tensor, torch.Tensor]],
    protocol: SampleProtocol,
) -> TwoSampleTest:
    """The two-sample test of ``half_a_features`` (rows of half A) against ``real_features``
    (rows of half B), averaged over the ``halves``, each ``(seed, half A, half B)``. The 95%
    interval is one halving's Clopper-Pearson interval about the mean (the mean of several
    halvings of the same slices is no less certain than one), and ``accuracy_sd`` the spread
    between halvings (ddof 0), not an uncertainty of the mean."""
    runs = [
        classifier_two_sample_test(half_a_features[first], real_features[second], protocol, seed)
        for seed, first, second in halves
    ]
    accuracies = [run.accuracy for run in runs]
    trials = 2 * runs[0].images_per_set
    mean = float(np.mean(accuracies))
    low, high = clopper_pearson(round(mean * trials), trials)
    return TwoSampleTest(
        accuracy=mean,
        ci95_low=low,
        ci95_high=high,
        images_per_set=runs[0].images_per_set,
        train_accuracy=float(np.mean([run.train_accuracy for run in runs])),
        halvings=len(halves),
        accuracy_sd=float(np.std(accuracies)),
        accuracy_range=(min(accuracies), max(accuracies)),
    )


def _spectrum_gaps(result: SplitEvaluation, power: np.ndarray) -> SpectrumGaps:
    gap = spectrum_gap_db(result.real_power, power)
    # The two lowest rings hold a handful of coefficients each, too few for a steady mean.
    steady = np.arange(len(gap)) >= 2
    up_to_half_nyquist = result.frequencies <= 0.25
    above = ~up_to_half_nyquist
    return SpectrumGaps(
        largest_gap_db_up_to_half_nyquist=float(np.abs(gap[steady & up_to_half_nyquist]).max()),
        mean_gap_db_above_half_nyquist=float(gap[above].mean()) if above.any() else None,
    )
