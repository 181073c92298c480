"""An exponential moving average of a model's weights (Polyak averaging), for validation and
sampling: the average of the last few thousand steps' weights generalises better than the
last step's, and smooths the noise of small batches.

Built on torch's :class:`~torch.optim.swa_utils.AveragedModel`; the decay is warmed up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run is not dominated by its
random initial weights.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay used for the update after ``updates`` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The moving average of ``model``'s parameters and buffers.

    :meth:`update` after each optimisation step; :attr:`module` is the averaged copy.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the moving average's decay must be in (0, 1), got {decay}")
        self.decay = decay

        def average(averaged: list, current: list, updates: torch.Tensor) -> None:
            weight = 1 - warmed_up_decay(decay, int(updates))
            # lerp_: averaged += weight * (current - averaged), over all tensors at once.
            torch._foreach_lerp_(averaged, current, weight)

        self.averaged = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        """The averaged weights (loadable into the model itself) and the update count."""
        return {"weights": self.module.state_dict(), "updates": int(self.averaged.n_averaged)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.averaged.n_averaged.fill_(state["updates"])
