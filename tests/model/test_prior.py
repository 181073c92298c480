"""The priors: output shapes on square and non-square maps, raster-order causality, the
key/value cache's agreement with a full forward, the masked prior's two-sided view and its
masking schedule, and conditioning."""

import math

import pytest
import torch

from mri_vqvae.model.prior import (
    ConditionSizes,
    GatedPixelCNN,
    MaskedTransformerPrior,
    PriorConditions,
    TransformerPrior,
    cosine_mask_ratio,
    random_masks,
)
from tests.helpers import NUM_CODES, positions, tiny_prior


@pytest.mark.parametrize("architecture", ["transformer", "masked", "pixelcnn"])
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
    position = positions(0.2, 0.9) if conditional else None
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
    low = prior(indices, positions(0.0))
    high = prior(indices, positions(1.0))
    assert not torch.allclose(low, high)
    with pytest.raises(ValueError, match="slice position"):
        prior(indices)
    with pytest.raises(ValueError, match="without a slice position"):
        tiny_prior("pixelcnn")(indices, positions(0.5))


@pytest.mark.parametrize("architecture", ["transformer", "masked", "pixelcnn"])
def test_every_condition_kind_reaches_the_logits(architecture):
    sizes = ConditionSizes(position=True, labels=(3, 2), augmentation=4)
    prior = tiny_prior(architecture, (4, 3), sizes=sizes)
    # The condition layers start near zero in a fresh network; make them count.
    for parameter in prior.condition.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    indices = torch.randint(0, NUM_CODES, (2, 4, 3))
    base = PriorConditions(
        torch.tensor([0.3, 0.3]), torch.tensor([[1, 2], [1, 2]]), torch.zeros(2, 4)
    )
    reference = prior(indices, base)
    changed = [
        PriorConditions(torch.tensor([0.3, 0.9]), base.labels, base.augmentation),
        PriorConditions(base.position, torch.tensor([[1, 2], [3, 2]]), base.augmentation),
        PriorConditions(base.position, base.labels, torch.tensor([[0.0] * 4, [0.5] * 4])),
        base.without_guided(torch.tensor([False, True])),
    ]
    for conditions in changed:
        logits = prior(indices, conditions)
        torch.testing.assert_close(logits[0], reference[0])  # row 0 kept its conditions
        assert not torch.allclose(logits[1], reference[1])


def test_dropping_conditions_hides_position_and_labels_but_not_the_augmentation():
    conditions = PriorConditions(
        torch.tensor([0.2, 0.7]), torch.tensor([[2], [1]]), torch.ones(2, 3)
    )
    dropped = conditions.without_guided(torch.tensor([True, False]))
    assert torch.isnan(dropped.position[0]) and dropped.position[1] == pytest.approx(0.7)
    assert dropped.labels.tolist() == [[0], [1]]
    assert torch.equal(dropped.augmentation, conditions.augmentation)
    everything = conditions.without_guided()
    assert torch.isnan(everything.position).all() and not everything.labels.any()


def test_a_masked_prior_sees_codes_on_both_sides():
    grid = (4, 3)
    prior = tiny_prior("masked", grid)
    indices = torch.randint(0, NUM_CODES, (1, *grid))
    before = prior(indices).flatten(2)
    changed = indices.flatten(1).clone()
    changed[0, -1] = (changed[0, -1] + 1) % NUM_CODES  # the last position
    after = prior(changed.reshape(1, *grid)).flatten(2)
    assert (after - before).abs()[0, :, 0].max() > 0  # the first position sees it


def test_random_masks_follow_the_cosine_schedule():
    generator = torch.Generator().manual_seed(0)
    masks = random_masks(4000, 100, generator)
    counts = masks.sum(dim=1).float()
    assert counts.min() >= 1 and counts.max() <= 100
    # The share masked is cos(pi/2 * u) for uniform u: its mean is 2/pi.
    assert counts.mean() / 100 == pytest.approx(2 / math.pi, abs=0.02)
    assert float(cosine_mask_ratio(torch.tensor(0.0))) == 1.0
    assert float(cosine_mask_ratio(torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-6)


def test_builds_the_configured_architecture():
    assert isinstance(tiny_prior("transformer"), TransformerPrior)
    assert isinstance(tiny_prior("masked"), MaskedTransformerPrior)
    assert isinstance(tiny_prior("pixelcnn"), GatedPixelCNN)
