"""Sample measures on known cases: identical sets, disjoint sets, exact copies."""

import dataclasses
import math

import pytest
import torch

from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.features import RandomFeatureNet, extract_features
from mri_vqvae.evaluate.sample_metrics import (
    classifier_two_sample_test,
    clopper_pearson,
    jensen_shannon_bits,
    mean_pairwise_ssim,
    nearest_by_ssim,
    null_verdict,
)
from mri_vqvae.protocol import PROTOCOLS
from mri_vqvae.records.measures import NullVerdict, TwoSampleTest

PROTOCOL = PROTOCOLS["frozen-v1"]


def blobs(count: int, seed: int, size=(32, 16)) -> torch.Tensor:
    """Smooth random images in [-1, 1]: no two alike."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, size[0] // 4, size[1] // 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") * 2 - 1


def random_features(images: torch.Tensor) -> torch.Tensor:
    network = RandomFeatureNet(PROTOCOL.random_features_widths, PROTOCOL.random_features_seed)
    return extract_features(network, images)


def test_two_sample_test_separates_disjoint_sets():
    smooth = blobs(32, 0)
    noise = torch.rand(32, 1, 32, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    result = classifier_two_sample_test(random_features(smooth), random_features(noise), PROTOCOL)
    assert result.accuracy >= 0.9
    assert result.ci95_low <= result.accuracy <= result.ci95_high
    assert result.images_per_set == 32


def test_two_sample_test_tells_a_mild_texture_change():
    # Smoothing with a 3x3 box, as a decoder loses fine texture, is a difference the
    # classifier must find though the structures are the same.
    images = blobs(64, 7, size=(64, 32)) + 0.2 * torch.randn(
        64, 1, 64, 32, generator=torch.Generator().manual_seed(8)
    )
    smoothed = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    features = random_features(torch.cat([images[:32], smoothed[32:]]))
    result = classifier_two_sample_test(features[:32], features[32:], PROTOCOL)
    assert result.accuracy >= 0.9


def test_two_sample_test_is_near_chance_on_one_distribution():
    features = random_features(blobs(64, 2))
    result = classifier_two_sample_test(features[:32], features[32:], PROTOCOL)
    assert result.ci95_low <= 0.5 <= result.ci95_high
    assert null_verdict(result, PROTOCOL) == NullVerdict(trustworthy=True)


def test_the_null_test_flags_a_split_that_is_not_random():
    # A deliberately broken "random halves" split: one set's brightest images against its
    # darkest. The classifier finds that difference, so the figure beside it is flagged.
    images = blobs(64, 3)
    order = images.mean(dim=(1, 2, 3)).argsort()
    features = random_features(images[order])
    null = classifier_two_sample_test(features[:32], features[32:], PROTOCOL)
    verdict = null_verdict(null, PROTOCOL)
    assert verdict.trustworthy is False
    assert "null test" in verdict.untrustworthy_reason


def test_a_null_interval_above_half_is_flagged_even_under_the_accuracy_bound():
    strict = dataclasses.replace(PROTOCOL, null_max_accuracy=0.9)
    null = TwoSampleTest(
        accuracy=0.54, ci95_low=0.51, ci95_high=0.57, images_per_set=100, train_accuracy=0.6
    )
    verdict = null_verdict(null, strict)
    assert verdict.trustworthy is False and "excludes 0.5" in verdict.untrustworthy_reason


def test_clopper_pearson_known_values():
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.1871, abs=1e-4) and high == pytest.approx(0.8129, abs=1e-4)
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0


def test_a_copy_is_found_with_ssim_one():
    train = blobs(40, 3)
    queries = torch.cat([train[[5, 17]], blobs(2, 4)])
    best, index = nearest_by_ssim(queries, train, candidates=4)
    torch.testing.assert_close(best[:2], torch.ones(2))
    assert index[:2].tolist() == [5, 17]
    assert (best[2:] < 0.99).all()


def test_pairwise_ssim_of_identical_images_is_one():
    same = blobs(1, 5).repeat(6, 1, 1, 1)
    assert mean_pairwise_ssim(same) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_ssim(blobs(30, 6), max_pairs=50) < 0.9


def test_js_divergence_of_equal_and_disjoint_histograms():
    counts = torch.tensor([3, 0, 5, 2])
    assert jensen_shannon_bits(counts, counts * 4) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon_bits(torch.tensor([4, 0]), torch.tensor([0, 9])) == pytest.approx(1.0)
    assert 0 < jensen_shannon_bits(torch.tensor([1, 1]), torch.tensor([1, 3])) < 1
    assert not math.isnan(jensen_shannon_bits(torch.tensor([0, 1]), torch.tensor([1, 1])))


def test_too_few_samples_for_the_folds_is_a_user_error():
    features = torch.zeros(2, 8)
    with pytest.raises(InputError, match="needs at least 5 images per set, got 2"):
        classifier_two_sample_test(features, features, PROTOCOL)
