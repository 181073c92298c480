"""Measures of generated slices that need no downloaded weights.

- Classifier two-sample test (Lopez-Paz & Oquab 2017): a small CNN, trained from scratch, tells
  two sets apart; its cross-validated accuracy is 0.5 when it cannot, 1.0 when they are
  disjoint. Reported with a Clopper-Pearson 95% interval.
- Memorisation: each sample's highest SSIM to any training slice.
- Diversity: mean SSIM between random pairs of a set (lower is more diverse).
- Code statistics: the Jensen-Shannon divergence between two code histograms, in bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.config import SampleMetricsConfig
from mri_vqvae.errors import InputError
from mri_vqvae.metrics import ssim_per_image


class SliceClassifier(nn.Module):
    """Four stride-2 convolutions with GroupNorm and SiLU, global average pooling, one logit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in = 1
        for multiplier in (1, 2, 4, 4):
            channels = width * multiplier
            layers += [
                nn.Conv2d(channels_in, channels, 3, stride=2, padding=1),
                nn.GroupNorm(4, channels),
                nn.SiLU(),
            ]
            channels_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels_in, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))[:, 0]


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial confidence interval for a proportion."""
    # Imported here: scipy.stats costs a third of a second, and every command would pay it
    # at start-up (the command line imports all workflows) while only evaluate-samples uses it.
    from scipy.stats import beta

    alpha = 1 - level
    failures = trials - successes
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, failures + 1))
    high = 1.0 if failures == 0 else float(beta.ppf(1 - alpha / 2, successes + 1, failures))
    return low, high


def _fit_classifier(
    images: torch.Tensor, labels: torch.Tensor, settings: SampleMetricsConfig, seed: int
) -> SliceClassifier:
    torch.manual_seed(seed)
    classifier = SliceClassifier().to(images.device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    size = min(settings.classifier_batch_size, len(images))
    steps = 0
    while steps < settings.classifier_steps:
        order = torch.randperm(len(images), generator=generator)
        # Full batches only, so a small remainder never makes a noisy step.
        for start in range(0, len(images) - size + 1, size):
            rows = order[start : start + size]
            loss = F.binary_cross_entropy_with_logits(classifier(images[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == settings.classifier_steps:
                break
    return classifier.eval()


@torch.no_grad()
def _predict(classifier: SliceClassifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [classifier(images[i : i + batch_size]) > 0 for i in range(0, len(images), batch_size)]
    )


def classifier_two_sample_test(
    first: torch.Tensor, second: torch.Tensor, settings: SampleMetricsConfig | None = None
) -> dict[str, float]:
    """Cross-validated accuracy of a CNN telling ``first`` from ``second`` (``(N, 1, H, W)``).

    The larger set is subsampled to the smaller's size, so chance is exactly 0.5. Every image
    is classified once, by the classifier of the fold that held it out.
    """
    settings = settings or SampleMetricsConfig()
    generator = torch.Generator().manual_seed(settings.seed)
    count = min(len(first), len(second))
    if count < settings.folds:
        raise InputError(
            f"the two-sample test needs at least {settings.folds} images per set, got {count}"
        )
    sets = [
        images[torch.randperm(len(images), generator=generator)[:count]]
        for images in (first, second)
    ]
    images = torch.cat(sets).float()
    labels = torch.cat([torch.zeros(count), torch.ones(count)]).to(images.device)
    # Stratified folds: fold f holds every folds-th image of each class.
    fold_of = torch.cat([torch.arange(count) % settings.folds] * 2)
    correct, train_correct, train_total = 0, 0, 0
    for fold in range(settings.folds):
        held_out = fold_of == fold
        classifier = _fit_classifier(
            images[~held_out], labels[~held_out], settings, settings.seed + fold
        )
        predictions = _predict(classifier, images, settings.classifier_batch_size)
        hits = predictions == labels.bool()
        correct += int(hits[held_out].sum())
        train_correct += int(hits[~held_out].sum())
        train_total += int((~held_out).sum())
    trials = 2 * count
    low, high = clopper_pearson(correct, trials)
    return {
        "accuracy": correct / trials,
        "ci95_low": low,
        "ci95_high": high,
        "images_per_set": count,
        "folds": settings.folds,
        "train_accuracy": train_correct / train_total,
    }


def _coarse(images: torch.Tensor) -> torch.Tensor:
    # In chunks, so a float16 split of thousands of slices is never copied whole to float32.
    return torch.cat([F.avg_pool2d(chunk.float(), 4).flatten(1) for chunk in images.split(512)])


# SSIM over a few pairs at a time: on 256x128 images, batches of 8 pairs ran 4x faster per
# pair than batches of 32 or more, whose large temporaries glibc hands back to the kernel and
# faults in again on every call.
SSIM_PAIRS_PER_BATCH = 8


def paired_ssim(
    first: torch.Tensor, second: torch.Tensor, rows_first: torch.Tensor, rows_second: torch.Tensor
) -> torch.Tensor:
    """SSIM of ``first[rows_first[i]]`` with ``second[rows_second[i]]`` for every ``i``."""
    scores = []
    for start in range(0, len(rows_first), SSIM_PAIRS_PER_BATCH):
        a = first[rows_first[start : start + SSIM_PAIRS_PER_BATCH]].float()
        b = second[rows_second[start : start + SSIM_PAIRS_PER_BATCH]].float()
        scores.append(ssim_per_image(a, b))
    return torch.cat(scores)


@torch.no_grad()
def nearest_by_ssim(
    queries: torch.Tensor, references: torch.Tensor, candidates: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the highest SSIM to any reference image and that reference's
    index; SSIM is computed for the ``candidates`` references nearest in mean squared
    distance at a quarter of the resolution."""
    candidates = min(candidates, len(references))
    distances = torch.cdist(_coarse(queries), _coarse(references))  # (Q, R)
    shortlist = distances.topk(candidates, dim=1, largest=False).indices  # (Q, c)
    query_rows = torch.arange(len(queries)).repeat_interleave(candidates)
    scores = paired_ssim(queries, references, query_rows, shortlist.flatten())
    best_ssim, where = scores.reshape(len(queries), candidates).max(dim=1)
    return best_ssim, shortlist.gather(1, where[:, None])[:, 0]


@torch.no_grad()
def mean_pairwise_ssim(images: torch.Tensor, max_pairs: int = 2000, seed: int = 0) -> float:
    """Mean SSIM between distinct images of a set: every pair when there are at most
    ``max_pairs``, else ``max_pairs`` random pairs."""
    count = len(images)
    if count < 2:
        raise InputError("pairwise SSIM needs at least two images")
    if count * (count - 1) // 2 <= max_pairs:
        first, second = torch.triu_indices(count, count, offset=1)
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (max_pairs,), generator=generator)
        # An offset in 1..count-1 never pairs an image with itself.
        second = (first + torch.randint(1, count, (max_pairs,), generator=generator)) % count
    return float(paired_ssim(images, images, first, second).mean())


def jensen_shannon_bits(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Jensen-Shannon divergence between two histograms, in bits: 0 for equal distributions,
    1 for disjoint ones."""
    p = counts_a.double() / counts_a.sum()
    q = counts_b.double() / counts_b.sum()
    middle = (p + q) / 2

    def kl(x: torch.Tensor) -> float:
        kept = x > 0
        return float((x[kept] * (x[kept] / middle[kept]).log2()).sum())

    return (kl(p) + kl(q)) / 2


def share_above(values: torch.Tensor, threshold: float) -> float:
    """The share of ``values`` strictly above ``threshold``."""
    return float((values > threshold).float().mean())


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean, spread and quantiles of a 1D tensor."""
    values = values.double()
    quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {
        "mean": float(values.mean()),
        "std": float(values.std()) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "p05": float(quantiles[0]),
        "median": float(quantiles[1]),
        "p95": float(quantiles[2]),
        "max": float(values.max()),
    }


def within(value: float, reference: float, tolerance: float) -> bool:
    """True when ``value`` lies within ``tolerance`` (a share) of ``reference``."""
    return math.isfinite(value) and abs(value - reference) <= tolerance * abs(reference)
