"""Measures of generated slices that need no downloaded weights.

- Classifier two-sample test (Lopez-Paz & Oquab 2017): a logistic regression on fixed features
  tells two sets apart; its cross-validated accuracy is 0.5 when it cannot, 1.0 when they are
  disjoint. Reported with a Clopper-Pearson 95% interval, and judged by its null test.
- Memorisation: each sample's highest SSIM to any training slice.
- Diversity: mean SSIM between random pairs of a set (lower is more diverse).
- Code statistics: the Jensen-Shannon divergence between two code histograms, in bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.distances import standardiser
from mri_vqvae.metrics import ssim_map
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records.measures import Distribution, NullVerdict, TwoSampleTest


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


def _fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, protocol: SampleProtocol
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-penalised logistic regression, fitted by L-BFGS: a convex
    problem, so the fit is the same however it is started."""
    weights = torch.zeros(features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias],
        max_iter=protocol.classifier_lbfgs_iterations,
        line_search_fn="strong_wolfe",
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(features @ weights + bias, labels)
        value = value + 0.5 * protocol.classifier_l2_penalty * weights.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weights.detach(), bias.detach()


def classifier_two_sample_test(
    first: torch.Tensor, second: torch.Tensor, protocol: SampleProtocol, seed: int = 0
) -> TwoSampleTest:
    """Cross-validated accuracy of a logistic regression telling the feature vectors ``first``
    from ``second`` (``(N, F)`` each; Lopez-Paz & Oquab 2017).

    The larger set is subsampled to the smaller's size, so chance is exactly 0.5. Every vector
    is classified once, by the model of the fold that held it out; features are standardised
    with the training folds' statistics only.
    """
    folds = protocol.classifier_folds
    generator = torch.Generator().manual_seed(seed)
    count = min(len(first), len(second))
    if count < folds:
        raise InputError(f"the two-sample test needs at least {folds} images per set, got {count}")
    sets = [
        vectors[torch.randperm(len(vectors), generator=generator)[:count]].double()
        for vectors in (first, second)
    ]
    features = torch.cat(sets)
    labels = torch.cat([torch.zeros(count), torch.ones(count)]).double()
    # Stratified folds over already shuffled rows: fold f holds every folds-th row of a class.
    fold_of = torch.cat([torch.arange(count) % folds] * 2)
    correct, train_correct, train_total = 0, 0, 0
    for fold in range(folds):
        held_out = fold_of == fold
        standardise = standardiser(features[~held_out])
        weights, bias = _fit_logistic(standardise(features[~held_out]), labels[~held_out], protocol)
        hits = ((standardise(features) @ weights + bias) > 0) == labels.bool()
        correct += int(hits[held_out].sum())
        train_correct += int(hits[~held_out].sum())
        train_total += int((~held_out).sum())
    trials = 2 * count
    low, high = clopper_pearson(correct, trials)
    return TwoSampleTest(
        accuracy=correct / trials,
        ci95_low=low,
        ci95_high=high,
        images_per_set=count,
        train_accuracy=train_correct / train_total,
    )


def null_verdict(null: TwoSampleTest, protocol: SampleProtocol) -> NullVerdict:
    """Whether a two-sample figure can be trusted, from the test on two random halves of one
    set (the null): its accuracy must stay at most ``protocol.null_max_accuracy`` and its 95%
    interval must reach down to 0.5. A null above chance means the classifier finds
    differences that are not there (too few images, leaking folds, a broken split), so the
    figure beside it says nothing about the samples."""
    reasons = []
    if null.accuracy > protocol.null_max_accuracy:
        reasons.append(
            f"the null test (two random halves of one set) reached accuracy "
            f"{null.accuracy:.3f} > {protocol.null_max_accuracy}"
        )
    if null.ci95_low > 0.5:
        reasons.append(
            f"the null test's 95% interval [{null.ci95_low:.3f}, {null.ci95_high:.3f}] excludes 0.5"
        )
    return NullVerdict(trustworthy=not reasons, untrustworthy_reason="; ".join(reasons) or None)


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
    """SSIM of ``first[rows_first[i]]`` with ``second[rows_second[i]]`` for every ``i``, as
    :func:`mri_vqvae.metrics.ssim_per_image` gives it. Computed by ``ssim_map``'s banded
    matrix products, 1.7x faster per pair on a CPU than ``ssim_per_image``'s convolutions."""
    scores = []
    for start in range(0, len(rows_first), SSIM_PAIRS_PER_BATCH):
        a = first[rows_first[start : start + SSIM_PAIRS_PER_BATCH]].float()
        b = second[rows_second[start : start + SSIM_PAIRS_PER_BATCH]].float()
        scores.append(ssim_map(unit_range(a), unit_range(b)).flatten(1).mean(1))
    return torch.cat(scores)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in the model's [-1, 1] mapped to SSIM's [0, 1], as ``ssim_per_image`` does."""
    return ((images + 1) / 2).clamp(0, 1)


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


def distribution(values: torch.Tensor) -> Distribution:
    """Mean, spread and quantiles of a 1D tensor."""
    values = values.double()
    quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return Distribution(
        mean=float(values.mean()),
        std=float(values.std()) if len(values) > 1 else 0.0,
        min=float(values.min()),
        p05=float(quantiles[0]),
        median=float(quantiles[1]),
        p95=float(quantiles[2]),
        max=float(values.max()),
    )


def within(value: float, reference: float, tolerance: float) -> bool:
    """True when ``value`` lies within ``tolerance`` (a share) of ``reference``."""
    return math.isfinite(value) and abs(value - reference) <= tolerance * abs(reference)
