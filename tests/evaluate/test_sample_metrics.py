"""Sample measures on known cases: identical sets, disjoint sets, exact copies."""

import math

import pytest
import torch

from mri_vqvae.evaluate.sample_metrics import (
    SampleMetricsConfig,
    classifier_two_sample_test,
    clopper_pearson,
    jensen_shannon_bits,
    mean_pairwise_ssim,
    nearest_by_ssim,
)

FAST = SampleMetricsConfig(folds=2, classifier_steps=8, classifier_batch_size=16)


def blobs(count: int, seed: int, size=(32, 16)) -> torch.Tensor:
    """Smooth random images in [-1, 1]: no two alike."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, size[0] // 4, size[1] // 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") * 2 - 1


def test_two_sample_test_separates_disjoint_sets():
    smooth = blobs(32, 0)
    noise = torch.rand(32, 1, 32, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    result = classifier_two_sample_test(smooth, noise, FAST)
    assert result["accuracy"] >= 0.9
    assert result["ci95_low"] <= result["accuracy"] <= result["ci95_high"]
    assert result["images_per_set"] == 32


def test_two_sample_test_is_near_chance_on_one_distribution():
    images = blobs(64, 2)
    result = classifier_two_sample_test(images[:32], images[32:], FAST)
    assert result["ci95_low"] <= 0.5 <= result["ci95_high"]


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
    from mri_vqvae.errors import InputError
    from mri_vqvae.evaluate.sample_metrics import classifier_two_sample_test

    images = torch.zeros(2, 1, 32, 32)
    with pytest.raises(InputError, match="needs at least 4 images per set, got 2"):
        classifier_two_sample_test(images, images)
