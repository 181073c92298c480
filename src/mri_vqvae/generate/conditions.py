"""What each sample is conditioned on: drawn from the training slices' conditions that agree
with what the user gives, checked against what the prior learned, and described for
``samples.json``."""

from __future__ import annotations

import logging

import torch

from mri_vqvae.checkpoint import PriorExtras, TrainingConditions
from mri_vqvae.config import SampleConfig
from mri_vqvae.data.labels import LabelVocabulary
from mri_vqvae.errors import ConfigError, shown
from mri_vqvae.model.prior import PriorConditions
from mri_vqvae.records.samples import SampleConditions

logger = logging.getLogger(__name__)


def draw_conditions(
    extras: PriorExtras,
    count: int,
    generator: torch.Generator,
    slice_position: float | None = None,
    labels: dict[str, str] | None = None,
) -> PriorConditions | None:
    """Conditions for ``count`` samples of the prior whose checkpoint ``extras`` are given.

    What is given (``slice_position``; ``labels``, a value for some of the labels by name)
    holds for every sample; the rest is drawn from the training slices that agree with what is
    given (the same label values; the tenth nearest in position), so that every sample's
    conditions occur together in training. The augmentation is always "none".
    """
    sizes = extras.condition_sizes
    labels = labels or {}
    if slice_position is not None and not sizes.position:
        raise ConfigError(
            "this prior was trained without slice positions; drop --slice-position "
            "(sample.slice_position)"
        )
    if labels and not sizes.labels:
        raise ConfigError("this prior was trained without labels; drop --label (sample.labels)")
    if not sizes.any:
        return None
    trained = extras.training_conditions
    given = _given_labels(extras.label_vocabulary, labels) if sizes.labels else {}
    rows = _matching_rows(trained, given, slice_position, count, generator)
    position = label_indices = augmentation = None
    if sizes.position:
        position = trained.position[rows].float()
        if slice_position is not None:
            position = torch.full((count,), float(slice_position))
    if sizes.labels:
        label_indices = trained.labels[rows].clone()
    if sizes.augmentation:
        augmentation = torch.zeros(count, sizes.augmentation)
    return PriorConditions(position, label_indices, augmentation)


def _matching_rows(
    trained: TrainingConditions,
    given_labels: dict[int, int],
    slice_position: float | None,
    count: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """``count`` random training rows among those with the given label values and, with a
    given position, the tenth of them nearest to it; None when training recorded neither
    positions nor labels (a prior conditioned on augmentation alone)."""
    position, labels = trained.position, trained.labels
    if position is None and labels is None:
        return None
    candidates = torch.arange(len(position if position is not None else labels))
    for column, index in given_labels.items():
        candidates = candidates[labels[candidates, column] == index]
    if len(candidates) == 0:
        raise ConfigError(
            "no training slice has all the labels given together (sample.labels); give fewer"
        )
    if slice_position is not None and position is not None:
        distance = (position[candidates].float() - slice_position).abs()
        nearest = max(1, len(candidates) // 10)
        candidates = candidates[distance.argsort()[:nearest]]
    return candidates[torch.randint(len(candidates), (count,), generator=generator)]


def _given_labels(vocabulary: LabelVocabulary, given: dict[str, str]) -> dict[int, int]:
    """Label name/value pairs to column/index pairs, refusing unknown names and values."""
    names = [name for name, _ in vocabulary]
    chosen = {}
    for name, value in given.items():
        if name not in names:
            raise ConfigError(
                f"this prior has no label {shown(name)} (its labels: {', '.join(names) or 'none'})"
            )
        column = names.index(name)
        values = list(vocabulary[column][1])
        if value not in values:
            raise ConfigError(
                f"label {name} has no value {shown(value)} in the training data "
                f"(known: {', '.join(values)})"
            )
        chosen[column] = values.index(value) + 1
    return chosen


def check_sampler_settings(
    extras: PriorExtras, settings: SampleConfig, *, condition_dropout: float, autoregressive: bool
) -> None:
    """Refuse guidance through an unconditional model the prior never learned (it was trained
    with ``condition_dropout`` 0); say when a setting has no effect on this prior."""
    sizes = extras.condition_sizes
    guidable = sizes.position or bool(sizes.labels)
    if settings.guidance != 1 and not guidable:
        logger.warning("sample.guidance has no effect: this prior has no position or labels")
    if settings.guidance != 1 and guidable and condition_dropout == 0:
        raise ConfigError(
            f"sample.guidance {settings.guidance} needs the unconditional model, which this "
            "prior never learned (prior_train.condition_dropout was 0); sample with guidance 1"
        )
    if autoregressive and settings.decoding_steps != SampleConfig().decoding_steps:
        logger.warning("sample.decoding_steps has no effect on an autoregressive prior")


def describe_conditions(
    conditions: PriorConditions | None, extras: PriorExtras, settings: SampleConfig
) -> SampleConditions:
    """What each sample was conditioned on, for ``samples.json``."""
    if conditions is None:
        return SampleConditions(conditioned=False)
    labels = {}
    if conditions.labels is not None:
        for column, (name, values) in enumerate(extras.label_vocabulary):
            labels[name] = tuple(
                values[int(i) - 1] if i > 0 else None for i in conditions.labels[:, column]
            )
    return SampleConditions(
        conditioned=True,
        guidance=settings.guidance,
        given_slice_position=settings.slice_position,
        given_labels=settings.label_values(),
        not_given="drawn from the training slices' conditions",
        slice_position=None
        if conditions.position is None
        else tuple(round(float(p), 6) for p in conditions.position),
        labels=labels,
        augmentation=None if conditions.augmentation is None else "none (all parameters zero)",
    )
