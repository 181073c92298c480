"""The moving average of the prior's weights: the update rule, its warm-up, and that it
survives a checkpoint."""

import pytest
import torch

from mri_vqvae.train.ema import WeightAverage, warmed_up_decay


def test_the_decay_warms_up_to_its_setting():
    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 10) == pytest.approx(11 / 20)
    assert warmed_up_decay(0.9, 10_000) == 0.9


def test_each_update_moves_the_average_toward_the_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.5)
    # The average starts as a copy of the weights.
    torch.testing.assert_close(average.module.weight, torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    average.update(model)  # the first update only copies (AveragedModel's rule)
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), 3.0))
    with torch.no_grad():
        model.weight.fill_(5.0)
    average.update(model)  # after 1 update: decay min(0.5, 2/11) = 2/11
    expected = 3.0 * (2 / 11) + 5.0 * (9 / 11)
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), expected))
    assert not average.module.weight.requires_grad


def test_the_average_comes_back_from_its_state():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model)
    state = average.state_dict()
    again = WeightAverage(torch.nn.Linear(3, 2), decay=0.9)
    again.load_state_dict(state)
    assert state["updates"] == 4 and int(again.averaged.n_averaged) == 4
    for key, value in average.module.state_dict().items():
        torch.testing.assert_close(again.module.state_dict()[key], value)


def test_a_decay_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(torch.nn.Linear(1, 1), decay=1.0)
