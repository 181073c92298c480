"""Whether reconstructions pass for the real slices: the two-sample figure on unpaired halves
with its null, and the power spectra's gap."""

import numpy as np
import pytest
import torch

from mri_vqvae.evaluate.realism import realism_summary
from mri_vqvae.evaluate.split import SplitEvaluation
from mri_vqvae.protocol import PROTOCOLS
from mri_vqvae.records import to_plain


def evaluation(real: torch.Tensor, reconstructions: torch.Tensor, gap_db: float = 0.0):
    count = len(real)
    frequencies = np.arange(1, 33) / 64
    power = np.full(32, 1e-3)
    weaker = power * 10 ** (np.where(frequencies > 0.2, gap_db, 0.0) / 10)
    empty = np.zeros(count)
    return SplitEvaluation(
        names=[f"s{i}" for i in range(count)],
        ssim=empty, psnr=empty, foreground_ssim=empty, foreground_psnr=empty,
        ssim_seed_protocol=empty, code_counts=torch.zeros(4), code_maps=torch.zeros(count, 2, 2),
        real_features=real, reconstruction_features=reconstructions,
        frequencies=frequencies, real_power=power, reconstruction_power=weaker,
    )  # fmt: skip


def test_reconstructions_like_the_real_slices_score_near_chance_and_shifted_ones_near_one():
    torch.manual_seed(0)
    real = torch.randn(200, 16).double()
    protocol = PROTOCOLS["frozen-v2"]
    alike = realism_summary(evaluation(real, real + 0.01 * torch.randn_like(real)), protocol)
    two_sample = alike.two_sample
    assert two_sample.reconstructions_vs_real.accuracy < 0.62
    assert two_sample.reconstructions_vs_real.images_per_set == 100  # halves
    assert two_sample.null_real_halves.images_per_set == 100
    # Reconstructions that are the real slices score as the null does.
    null = two_sample.null_real_halves.accuracy
    assert abs(two_sample.reconstructions_vs_real.accuracy - null) < 0.05
    assert two_sample.trustworthy is not None
    shifted = real.clone()
    shifted[:, 3] += 2.0
    assert (
        realism_summary(
            evaluation(real, shifted), protocol
        ).two_sample.reconstructions_vs_real.accuracy
        > 0.8
    )


def test_the_spectrum_gap_is_reported_up_to_half_nyquist_and_above():
    real = torch.randn(20, 4).double()
    spectrum = realism_summary(
        evaluation(real, real, gap_db=-6.0), PROTOCOLS["frozen-v2"]
    ).power_spectrum
    # -6 dB from 0.2 cycles per pixel on: up to 0.25 the largest gap is 6 dB; above, all -6.
    assert spectrum.largest_gap_db_up_to_half_nyquist == pytest.approx(6.0)
    assert spectrum.mean_gap_db_above_half_nyquist == pytest.approx(-6.0)
    assert len(spectrum.frequencies) == len(spectrum.reconstructions) == 32


def test_a_split_too_small_for_the_classifiers_folds_skips_the_test_with_its_reason():
    real = torch.randn(9, 4).double()
    two_sample = realism_summary(evaluation(real, real), PROTOCOLS["frozen-v2"]).two_sample
    assert two_sample.reconstructions_vs_real is None
    assert two_sample.skipped.startswith("9 slices: halves of 4")


def test_textured_reconstructions_are_scored_beside_the_plain_ones():
    from dataclasses import replace

    torch.manual_seed(1)
    real = torch.randn(200, 16).double()
    smooth = real.clone()
    smooth[:, 3] += 2.0  # the plain reconstructions miss something the classifier sees
    plain = evaluation(real, smooth, gap_db=-6.0)
    textured = replace(
        plain,
        textured_features=real + 0.01 * torch.randn_like(real),
        textured_power=plain.real_power,
    )
    summary = realism_summary(textured, PROTOCOLS["frozen-v2"])
    two_sample, spectrum = summary.two_sample, summary.power_spectrum
    assert two_sample.reconstructions_vs_real.accuracy > 0.8
    assert two_sample.textured_reconstructions_vs_real.accuracy < 0.62
    assert spectrum.largest_gap_db_up_to_half_nyquist == pytest.approx(6.0)
    assert spectrum.textured.largest_gap_db_up_to_half_nyquist == pytest.approx(0.0)
    assert len(spectrum.textured_reconstructions) == 32
    # Without a texture, neither entry appears.
    bare = realism_summary(plain, PROTOCOLS["frozen-v2"])
    assert bare.two_sample.textured_reconstructions_vs_real is None
    assert bare.power_spectrum.textured is None


def test_each_figure_is_the_mean_over_the_protocols_random_halvings_of_the_slices():
    import json
    from dataclasses import replace

    from mri_vqvae.evaluate.comparisons import split_in_halves
    from mri_vqvae.evaluate.sample_metrics import classifier_two_sample_test

    assert PROTOCOLS["frozen-v3"].realism_halvings == 10
    assert PROTOCOLS["frozen-v2"].realism_halvings == 1  # released protocols stay as they were
    torch.manual_seed(2)
    real = torch.randn(60, 8).double()
    reconstructions = real.clone()
    reconstructions[:, 0] += 0.8  # a partial shift, so halvings disagree
    protocol = replace(PROTOCOLS["frozen-v3"], realism_halvings=3)
    by_halving, null_by_halving = [], []
    for seed in (5, 6, 7):
        first, second = split_in_halves(60, seed)
        by_halving.append(
            classifier_two_sample_test(
                reconstructions[first], real[second], protocol, seed
            ).accuracy
        )
        null_by_halving.append(
            classifier_two_sample_test(real[first], real[second], protocol, seed).accuracy
        )
    assert len(set(by_halving)) > 1  # else a loop repeating one halving would pass
    summary = realism_summary(evaluation(real, reconstructions), protocol, seed=5)
    two_sample = summary.two_sample
    figure = two_sample.reconstructions_vs_real
    assert figure.accuracy == pytest.approx(np.mean(by_halving))
    assert figure.accuracy_range == (min(by_halving), max(by_halving))
    assert figure.accuracy_sd == pytest.approx(np.std(by_halving))
    assert figure.halvings == two_sample.halvings == 3
    assert figure.ci95_low < figure.accuracy < figure.ci95_high
    # The null, and so the verdict, is averaged over the same halvings.
    assert two_sample.null_real_halves.accuracy == pytest.approx(np.mean(null_by_halving))
    json.dumps(to_plain(summary))  # plain numbers only, for metrics.json
    # One halving is the single test on those halves, as before.
    single = realism_summary(
        evaluation(real, reconstructions), replace(protocol, realism_halvings=1), seed=5
    )
    assert single.two_sample.reconstructions_vs_real.accuracy == by_halving[0]
    with pytest.raises(ValueError, match="realism_halvings must be at least 1"):
        realism_summary(evaluation(real, reconstructions), replace(protocol, realism_halvings=0))
