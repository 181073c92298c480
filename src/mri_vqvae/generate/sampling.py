"""Drawing code maps from a prior: in raster order from an autoregressive one, by iterative
parallel decoding from a masked one."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mri_vqvae.config import SampleConfig
from mri_vqvae.model.prior import (
    MaskedTransformerPrior,
    Prior,
    PriorConditions,
    cosine_mask_ratio,
)
from mri_vqvae.runtime import autocast, resolve_precision


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """``(B, K)`` logits scaled by ``1 / temperature`` with codes outside the top-k and the
    top-p nucleus (Holtzman et al. 2020) set to -inf; the most likely code always stays."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a code when the codes more likely than it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _guided(
    conditions: PriorConditions | None, guidance: float
) -> tuple[PriorConditions | None, int, Callable[[torch.Tensor], torch.Tensor]]:
    """The conditions a guided forward takes, how many copies of the batch it holds, and how
    its logits become the guided ones (Ho & Salimans 2022: unconditional + guidance *
    (conditional - unconditional)). Without position or labels there is nothing to guide."""
    guidable = conditions is not None and (
        conditions.position is not None or conditions.labels is not None
    )
    if not guidable or guidance == 1:
        return conditions, 1, lambda logits: logits
    if guidance == 0:
        return conditions.without_guided(), 1, lambda logits: logits
    doubled = PriorConditions.cat([conditions, conditions.without_guided()])

    def combine(logits: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = logits.float().chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return doubled, 2, combine


def _batches(num_samples: int, batch_size: int, conditions: PriorConditions | None):
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        yield stop - start, None if conditions is None else conditions.rows(slice(start, stop))


@torch.no_grad()
def sample_codes(
    prior: Prior,
    num_samples: int,
    settings: SampleConfig | None = None,
    conditions: PriorConditions | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_samples`` code maps ``(N, h, w)``: position by position in raster order from an
    autoregressive prior, by iterative parallel decoding from a masked one.

    With ``settings.use_cache`` and a transformer, each new code costs one single-token
    forward over the cached keys and values of the prefix, for a whole batch at once; without
    it, each new code recomputes the whole prefix. Both give the same codes for the same
    ``generator`` state. ``generator`` must live on the prior's device.
    """
    settings = settings or SampleConfig()
    prior.eval()
    device = next(prior.parameters()).device
    maps = []
    for batch, batch_conditions in _batches(num_samples, settings.batch_size, conditions):
        if batch_conditions is not None:
            batch_conditions = batch_conditions.to(device)
        draw = _raster_codes if prior.autoregressive else _masked_codes
        with autocast(device, sampling_precision(prior, settings.precision, device)):
            maps.append(draw(prior, batch, settings, batch_conditions, generator).cpu())
    return torch.cat(maps)


def sampling_precision(prior: Prior, precision: str, device: torch.device) -> str:
    """The precision ``prior`` samples in on ``device`` for ``sample.precision``. ``"auto"``
    is float32 for an autoregressive prior on a CPU: its single-code steps are too small for
    bfloat16 to pay, and on an AMX CPU 64 maps took 334 s in bfloat16 against 188 s in
    float32, while a masked prior's whole-map steps ran 1.6x faster in bfloat16
    (docs/benchmarks.md)."""
    if precision == "auto" and prior.autoregressive and device.type == "cpu":
        return "float32"
    return resolve_precision(precision, device, "sample.precision")


def _raster_codes(
    prior: Prior,
    batch: int,
    settings: SampleConfig,
    conditions: PriorConditions | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    device = next(prior.parameters()).device
    height, width = prior.grid_shape
    length = height * width
    forward_conditions, copies, combine = _guided(conditions, settings.guidance)
    codes = torch.zeros(batch, length, dtype=torch.long, device=device)
    use_cache = settings.use_cache and prior.supports_cache
    cache = prior.new_cache(batch * copies) if use_cache else None
    for t in range(length):
        if cache is not None:
            previous = codes[:, t - 1].repeat(copies) if t else None
            logits = prior.step(previous, cache, forward_conditions)
        else:
            logits = prior.next_logits(codes.repeat(copies, 1), t, forward_conditions)
        logits = filter_logits(
            combine(logits), settings.temperature, settings.top_k, settings.top_p
        )
        codes[:, t] = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
    return codes.reshape(batch, height, width)


def _masked_codes(
    prior: Prior,
    batch: int,
    settings: SampleConfig,
    conditions: PriorConditions | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    device = next(prior.parameters()).device
    start = torch.full((batch, *prior.grid_shape), prior.mask_token, device=device)
    return decode_masked(prior, start, settings, conditions, generator)


@torch.no_grad()
def decode_masked(
    prior: MaskedTransformerPrior,
    codes: torch.Tensor,
    settings: SampleConfig,
    conditions: PriorConditions | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the masked positions of ``codes (B, h, w)`` (``prior.mask_token`` where unknown)
    by MaskGIT's iterative parallel decoding, in ``settings.decoding_steps`` steps.

    Each step samples a code for every unknown position, keeps the most confident of them
    (the log-probability of the sampled code plus Gumbel noise scaled by
    ``settings.choice_temperature``, annealed to 0) and masks the rest again, so that the
    share still unknown follows the cosine schedule to none after the last step. Known codes
    are never changed.
    """
    prior.eval()
    batch = codes.shape[0]
    length = prior.sequence_length
    steps = settings.decoding_steps
    forward_conditions, copies, combine = _guided(conditions, settings.guidance)
    codes = codes.reshape(batch, length).clone()
    unknown = codes == prior.mask_token
    initially_unknown = unknown.sum(dim=1)
    for step in range(steps):
        if not unknown.any():
            break
        inputs = codes.repeat(copies, 1).reshape(batch * copies, *prior.grid_shape)
        logits = combine(prior(inputs, forward_conditions).flatten(2).transpose(1, 2))
        logits = filter_logits(
            logits.reshape(batch * length, -1),
            settings.temperature,
            settings.top_k,
            settings.top_p,
        )
        probabilities = logits.softmax(dim=-1)
        drawn = torch.multinomial(probabilities, 1, generator=generator).reshape(batch, length)
        chosen = probabilities.gather(1, drawn.reshape(-1, 1)).reshape(batch, length)
        drawn = torch.where(unknown, drawn, codes)
        noise_scale = settings.choice_temperature * (1 - (step + 1) / steps)
        confidence = chosen.clamp_min(1e-30).log() + noise_scale * _gumbel(chosen, generator)
        confidence = confidence.masked_fill(~unknown, math.inf)
        still_unknown = _still_unknown(unknown, initially_unknown, step, steps)
        # The least confident of the new codes are masked again.
        order = confidence.argsort(dim=1)
        rank = order.argsort(dim=1)
        remask = rank < still_unknown[:, None]
        codes = torch.where(remask, prior.mask_token, drawn)
        unknown = remask
    return codes.reshape(batch, *prior.grid_shape)


def _still_unknown(
    unknown: torch.Tensor, initially_unknown: torch.Tensor, step: int, steps: int
) -> torch.Tensor:
    """How many positions of each map stay masked after ``step``: the cosine schedule's share
    of the positions unknown at the start, at most one fewer than are unknown now (each step
    fills at least one), and none after the last step."""
    if step == steps - 1:
        return torch.zeros_like(initially_unknown)
    ratio = float(cosine_mask_ratio(torch.tensor((step + 1) / steps, dtype=torch.float64)))
    # The nudge keeps cos(pi/3) * 100, 49.99999..., at the schedule's 50.
    scheduled = (initially_unknown.double() * ratio + 1e-9).floor().long()
    now = unknown.sum(dim=1)
    return torch.minimum(scheduled, (now - 1).clamp_min(0))


def _gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    uniform = torch.rand(like.shape, generator=generator, device=like.device)
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
