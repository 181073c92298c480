"""KID and density/coverage on known cases, and the fixed random feature network."""

import dataclasses

import pytest
import torch

from mri_vqvae.evaluate.distances import (
    density_and_coverage,
    kernel_inception_distance,
    median_distance,
    standardiser,
)
from mri_vqvae.evaluate.features import FeatureSpaces, RandomFeatureNet, extract_features
from mri_vqvae.protocol import PROTOCOLS

PROTOCOL = PROTOCOLS["frozen-v1"]


def gaussian(count: int, seed: int, shift: float = 0.0, dims: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, dims, generator=generator, dtype=torch.float64) + shift


def kid(first: torch.Tensor, second: torch.Tensor, kernel: str = "cubic") -> dict:
    width = median_distance(first) if kernel == "gaussian" else None
    return kernel_inception_distance(
        first, second, subsets=20, max_subset_size=1000, seed=0, kernel=kernel, width=width
    )


@pytest.mark.parametrize("kernel", ["cubic", "gaussian"])
def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_a_shift(kernel):
    reference = gaussian(200, 0)
    same = kid(reference, gaussian(200, 1), kernel)
    shifted = kid(reference, gaussian(200, 2, shift=0.5), kernel)
    assert abs(same.mean) < 2 * same.std + 1e-3
    assert shifted.mean > 10 * (abs(same.mean) + same.std)
    # Subsets hold half the smaller set, so they differ and their spread is a noise level.
    assert same.subset_size == 100 and same.std > 0


def test_kid_of_a_set_with_itself_is_small_beside_a_shift():
    # Subsets of each side are drawn independently, so a vector met on both sides pulls the
    # estimate a little below 0; it stays far below what a shift gives.
    reference = gaussian(200, 3)
    itself = kid(reference, reference).mean
    assert abs(itself) < 0.1 * kid(reference, reference + 0.5).mean


def test_one_outlying_vector_cannot_swing_the_gaussian_kid_as_it_swings_the_cubic():
    # The MNI failure of frozen-v1: one sample far out in a few features.
    reference, compared = gaussian(200, 8), gaussian(200, 9)
    outlier = compared.clone()
    outlier[0, :3] = 100.0
    for kernel, bound in (("gaussian", 0.05), ("cubic", None)):
        clean, spoiled = kid(reference, compared, kernel), kid(reference, outlier, kernel)
        shift = kid(reference, gaussian(200, 10, shift=0.5), kernel).mean
        change = spoiled.mean - clean.mean
        if bound is None:
            assert change > shift  # one vector outweighs a shift of half a standard deviation
        else:
            assert abs(change) < bound * shift


def test_an_unknown_kernel_or_a_gaussian_without_width_is_refused():
    points = gaussian(8, 11)
    with pytest.raises(ValueError, match="KID kernel must be one of"):
        kernel_inception_distance(
            points, points, subsets=2, max_subset_size=4, seed=0, kernel="laplace", width=1.0
        )
    with pytest.raises(ValueError, match="positive width"):
        kernel_inception_distance(
            points, points, subsets=2, max_subset_size=4, seed=0, kernel="gaussian"
        )


def test_the_median_distance_is_the_median_over_distinct_pairs():
    points = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)  # distances 1, 2, 3
    assert median_distance(points) == 2.0


def test_density_and_coverage_of_identical_and_shifted_sets():
    reference = gaussian(300, 4)
    identical = density_and_coverage(reference, reference, neighbours=5)
    assert identical.coverage == 1.0
    assert identical.density == pytest.approx(1.0, abs=0.25)
    same = density_and_coverage(reference, gaussian(300, 5), neighbours=5)
    assert 0.8 <= same.coverage <= 1.0 and same.density == pytest.approx(1.0, abs=0.3)
    shifted = density_and_coverage(reference, gaussian(300, 6, shift=1.0), neighbours=5)
    assert shifted.coverage < 0.5 * same.coverage
    assert shifted.density < 0.5 * same.density


def test_a_feature_constant_in_the_reference_is_not_blown_up():
    reference = torch.cat([gaussian(50, 7, dims=4), torch.zeros(50, 1, dtype=torch.float64)], 1)
    other = torch.ones(4, 5, dtype=torch.float64)
    scaled = standardiser(reference)(other)
    assert torch.isfinite(scaled).all()
    # Its spread counts as a tenth of the typical one, no less.
    median_spread = reference[:, :4].std(0).median()
    torch.testing.assert_close(scaled[:, 4], torch.full((4,), 10 / median_spread.item()).double())


def test_the_random_feature_network_is_the_same_on_every_call():
    images = torch.rand(6, 1, 32, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    widths, seed = PROTOCOL.random_features_widths, PROTOCOL.random_features_seed
    torch.manual_seed(123)  # the global generator must not matter
    first = extract_features(RandomFeatureNet(widths, seed), images)
    torch.manual_seed(456)
    second = extract_features(RandomFeatureNet(widths, seed), images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    other_seed = extract_features(RandomFeatureNet(widths, seed + 1), images)
    assert not torch.allclose(first, other_seed)


def test_the_feature_spaces_give_finite_features_for_tiny_images():
    images = torch.rand(12, 1, 32, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    quick = dataclasses.replace(PROTOCOL, autoencoder_steps=10)
    features = FeatureSpaces(images, quick)(images[:3])
    assert set(features) == {"random_cnn", "autoencoder"}
    for vectors in features.values():
        assert vectors.shape[0] == 3 and torch.isfinite(vectors).all()
