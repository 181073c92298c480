"""The priors: output shapes on square and non-square maps, raster-order causality, the
key/value cache's agreement with a full forward, and conditioning."""

import pytest
import torch

from mri_vqvae.model.prior import GatedPixelCNN, TransformerPrior
from tests.helpers import NUM_CODES, tiny_prior


@pytest.mark.parametrize("architecture", ["transformer", "pixelcnn"])
@pytest.mark.parametrize("grid", [(4, 4), (8, 4), (4, 2)])
def test_logits_have_one_distribution_per_position(architecture, grid):
    prior = tiny_prior(architecture, grid)
    indices = torch.randint(0, NUM_CODES, (3, *grid))
    assert prior(indices).shape == (3, NUM_CODES, *grid)


@pytest.mark.parametrize("architecture", ["transformer", "pixelcnn"])
@pytest.mark.parametrize("conditional", [False, True])
def test_a_code_only_changes_the_logits_after_it(architecture, conditional):
    grid = (4, 3)
    prior = tiny_prior(architecture, grid, conditional)
    indices = torch.randint(0, NUM_CODES, (2, *grid))
    position = torch.tensor([0.2, 0.9]) if conditional else None
    before = prior(indices, position).flatten(2)  # (B, K, L)
    length = grid[0] * grid[1]
    for t in range(length):
        changed = indices.flatten(1).clone()
        changed[:, t] = (changed[:, t] + 1) % NUM_CODES
        after = prior(changed.reshape(2, *grid), position).flatten(2)
        difference = (after - before).abs().amax(dim=(0, 1))  # per position
        torch.testing.assert_close(difference[: t + 1], torch.zeros(t + 1))
        if t + 1 < length:  # the very next position does see it: no blind spot
            assert difference[t + 1] > 0


def test_cached_steps_match_the_full_forward():
    prior = tiny_prior("transformer", (4, 3))
    codes = torch.randint(0, NUM_CODES, (2, 12))
    full = prior(codes.reshape(2, 4, 3)).flatten(2)
    cache = prior.new_cache(2)
    for t in range(12):
        logits = prior.step(codes[:, t - 1] if t else None, cache)
        torch.testing.assert_close(logits, full[:, :, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior.next_logits(codes, t), full[:, :, t])
    assert cache.length == 12


def test_conditioning_changes_the_prediction_and_is_required():
    prior = tiny_prior("transformer", (4, 3), conditional=True)
    indices = torch.randint(0, NUM_CODES, (1, 4, 3))
    low = prior(indices, torch.tensor([0.0]))
    high = prior(indices, torch.tensor([1.0]))
    assert not torch.allclose(low, high)
    with pytest.raises(ValueError, match="slice_position"):
        prior(indices)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior("pixelcnn")(indices, torch.tensor([0.5]))


def test_builds_the_configured_architecture():
    assert isinstance(tiny_prior("transformer"), TransformerPrior)
    assert isinstance(tiny_prior("pixelcnn"), GatedPixelCNN)
