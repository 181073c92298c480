"""The learning-rate schedule both stages train with."""

from __future__ import annotations

import math

from mri_vqvae.config import LoopConfig


def warmup_cosine(
    lr: float,
    warmup_steps: int,
    final_lr_fraction: float,
    *,
    step: int,
    total_steps: int,
    time_used: float = 0.0,
) -> float:
    """Linear warm-up over ``warmup_steps``, then half a cosine from ``lr`` down to
    ``lr * final_lr_fraction``. Progress is the larger of the share of steps done and
    ``time_used``, the share of a time budget spent, so a budgeted run still anneals."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, time_used), 1.0)
    floor = lr * final_lr_fraction
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(
    settings: LoopConfig, step: int, total_steps: int, time_used: float = 0.0
) -> float:
    """The learning rate for optimisation step ``step`` (0-based) of ``total_steps``:
    ``settings.lr`` throughout (``"constant"``) or :func:`warmup_cosine` (``"cosine"``)."""
    if settings.lr_schedule == "constant":
        return settings.lr
    return warmup_cosine(
        settings.lr,
        settings.warmup_steps,
        settings.final_lr_fraction,
        step=step,
        total_steps=total_steps,
        time_used=time_used,
    )
