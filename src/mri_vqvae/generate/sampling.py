"""Sampling new slices: codes from the prior (in raster order, or by parallel decoding from a
masked prior), decoded by the VQ-VAE."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae import plots
from mri_vqvae.config import SampleConfig
from mri_vqvae.data.dataset import postprocess, to_unit_range
from mri_vqvae.data.nifti import DataError, write_slice, write_slice_in_geometry
from mri_vqvae.data.reference import DataReference
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import (
    SAMPLE_CODES,
    SAMPLES_GRID,
    SAMPLES_SUMMARY,
    save_atomic,
    write_text_atomic,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import (
    ConditionSizes,
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


def draw_conditions(
    extras: dict[str, Any],
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
    sizes = ConditionSizes.from_dict(extras["condition_sizes"])
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
    trained = extras["training_conditions"]
    given = _given_labels(extras["label_vocabulary"], labels) if sizes.labels else {}
    rows = _matching_rows(trained, given, slice_position, count, generator)
    position = label_indices = augmentation = None
    if sizes.position:
        position = trained["position"][rows].float()
        if slice_position is not None:
            position = torch.full((count,), float(slice_position))
    if sizes.labels:
        label_indices = trained["labels"][rows].clone()
    if sizes.augmentation:
        augmentation = torch.zeros(count, sizes.augmentation)
    return PriorConditions(position, label_indices, augmentation)


def _matching_rows(
    trained: dict[str, Any],
    given_labels: dict[int, int],
    slice_position: float | None,
    count: int,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """``count`` random training rows among those with the given label values and, with a
    given position, the tenth of them nearest to it; None when training recorded neither
    positions nor labels (a prior conditioned on augmentation alone)."""
    position, labels = trained["position"], trained["labels"]
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


def _given_labels(vocabulary: list, given: dict[str, str]) -> dict[int, int]:
    """Label name/value pairs to column/index pairs, refusing unknown names and values."""
    names = [name for name, _ in vocabulary]
    chosen = {}
    for name, value in given.items():
        if name not in names:
            raise ConfigError(
                f"this prior has no label {name!r} (its labels: {', '.join(names) or 'none'})"
            )
        column = names.index(name)
        values = list(vocabulary[column][1])
        if value not in values:
            raise ConfigError(
                f"label {name} has no value {value!r} in the training data "
                f"(known: {', '.join(values)})"
            )
        chosen[column] = values.index(value) + 1
    return chosen


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


@torch.no_grad()
def decode_codes(vqvae: VQVAE, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Code maps ``(N, h, w)`` to images ``(N, 1, H, W)`` in [-1, 1] (on the CPU)."""
    vqvae.eval()
    device = next(vqvae.parameters()).device
    images = [
        vqvae.decode_indices(codes[i : i + batch_size].to(device)).clamp(-1, 1).cpu()
        for i in range(0, len(codes), batch_size)
    ]
    return torch.cat(images)


def check_prior_fits(vqvae: VQVAE, prior: Prior, image_size: tuple[int, int]) -> None:
    """Raise ``ValueError`` when the prior's codebook size or map shape is not the VQ-VAE's."""
    grid = tuple(side // vqvae.downsampling_factor for side in image_size)
    if prior.num_embeddings != vqvae.num_embeddings or tuple(prior.grid_shape) != grid:
        raise ConfigError(
            f"the prior models {prior.num_embeddings} codes on {prior.grid_shape} maps, the "
            f"VQ-VAE has {vqvae.num_embeddings} codes on {grid} maps"
        )


@dataclass
class SampleRun:
    """Samples drawn by :func:`generate_samples` and how long drawing them took."""

    codes: torch.Tensor  # (N, h, w)
    images: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    sampling_seconds: float
    decoding_seconds: float
    conditions: PriorConditions | None = None


def generate_samples(
    vqvae: VQVAE,
    prior: Prior,
    num_samples: int,
    settings: SampleConfig | None = None,
    conditions: PriorConditions | None = None,
    seed: int = 0,
) -> SampleRun:
    """Draw ``num_samples`` code maps from ``prior`` under ``conditions`` (one row per sample,
    as :func:`draw_conditions` makes them) and decode them with ``vqvae``."""
    if prior.conditional and conditions is None:
        raise ConfigError("this prior is conditioned; give it conditions (draw_conditions)")
    if not prior.conditional and conditions is not None:
        raise ConfigError("this prior was trained without conditions; give none")
    if conditions is not None and len(conditions) != num_samples:
        raise ConfigError(f"{len(conditions)} conditions for {num_samples} samples")
    settings = settings or SampleConfig()
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    codes = sample_codes(prior, num_samples, settings, conditions, generator)
    sampled = time.perf_counter()
    images = decode_codes(vqvae, codes, settings.batch_size)
    return SampleRun(codes, images, sampled - started, time.perf_counter() - sampled, conditions)


# What samples.json says when the VQ-VAE records no reference of its training data.
NO_REFERENCE = (
    "none: the VQ-VAE checkpoint records no reference of its training slices (it was trained "
    "before mri-vqvae recorded one); retrain the VQ-VAE to get samples in their geometry and scale"
)


def write_samples(
    run: SampleRun, out_dir: str | Path, metadata: dict, reference: DataReference | None = None
) -> Path:
    """Write ``samples.png`` (a grid), one NIfTI per sample (``sample_0000.nii.gz``), the
    codes (``codes.pt``) and ``samples.json`` (``metadata``, timings, and where each sample's
    geometry and intensities came from).

    With the training data's ``reference`` each sample is resized to the training slices'
    native shape, given their affine, voxel sizes and unit, and mapped from [0, 1] onto their
    typical intensity range (float32); without one it holds the decoded image in [0, 1] at
    the model's image size, with an identity affine."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit = to_unit_range(run.images).numpy()
    # Wide enough that the names sort in drawing order, as codes.pt holds the maps.
    digits = max(4, len(str(len(unit) - 1)))
    for i, image in enumerate(run.images):
        path = out_dir / f"sample_{i:0{digits}d}.nii.gz"
        if reference is None:
            write_slice(unit[i, 0], path)
        else:
            low, high = reference.intensity_range
            pixels = postprocess(image, reference.shape, low, high)
            write_slice_in_geometry(pixels, path, reference.geometry)
    save_atomic({"codes": run.codes.to(torch.int32)}, out_dir / SAMPLE_CODES)
    shown = run.images[:64].numpy()
    plots.image_grid(shown, out_dir / SAMPLES_GRID, title=f"{len(shown)} of {len(unit)} samples")
    codes_drawn = run.codes.numel()
    summary = {
        **metadata,
        "num_samples": len(unit),
        "grid_shape": list(run.codes.shape[1:]),
        "image_size": list(run.images.shape[-2:]),
        "sampling_seconds": run.sampling_seconds,
        "decoding_seconds": run.decoding_seconds,
        "codes_per_second": codes_drawn / max(run.sampling_seconds, 1e-9),
        **samples_provenance(reference, tuple(run.images.shape[-2:])),
    }
    write_text_atomic(out_dir / SAMPLES_SUMMARY, json.dumps(summary, indent=2, default=_plain))
    return out_dir


def samples_provenance(reference: DataReference | None, image_size: tuple[int, int]) -> dict:
    """The ``geometry`` and ``intensities`` entries of ``samples.json``: what the sample files
    hold and where it came from."""
    if reference is None:
        return {
            "geometry": {
                "source": NO_REFERENCE,
                "shape": list(image_size),
                "affine": np.eye(4).tolist(),
                "zooms": [1.0, 1.0],
            },
            "intensities": {"source": NO_REFERENCE, "range": [0.0, 1.0], "dtype": "float32"},
        }
    geometry = reference.geometry
    return {
        "geometry": {
            "source": reference.describe_geometry(),
            "shape": list(reference.shape),
            "stored_shape": list(geometry.stored_shape),
            "decoded_shape": list(image_size),
            "resized": tuple(image_size) != reference.shape,
            "affine": [list(row) for row in geometry.affine],
            "zooms": list(geometry.zooms),
            "spatial_unit": geometry.spatial_unit,
            "sform_code": geometry.sform_code,
            "qform_code": geometry.qform_code,
        },
        "intensities": {
            "source": reference.describe_intensities(),
            "range": list(reference.intensity_range),
            "dtype": "float32",
        },
    }


def load_sample_codes(path: str | Path) -> torch.Tensor:
    """The ``(N, h, w)`` code maps :func:`write_samples` saved."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["codes"].long()
    except Exception as err:  # damaged or foreign: fail in many ways inside torch.load
        raise DataError(
            path, f"is not the codes file that sample writes, or is damaged ({type(err).__name__})"
        ) from err


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
