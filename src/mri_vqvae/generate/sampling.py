"""Sampling new slices: codes from the prior one position at a time, decoded by the VQ-VAE."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
from mri_vqvae.model.prior import Prior


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


@torch.no_grad()
def sample_codes(
    prior: Prior,
    num_samples: int,
    settings: SampleConfig | None = None,
    slice_position: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_samples`` code maps ``(N, h, w)`` drawn position by position in raster order.

    With ``settings.use_cache`` and a transformer, each new code costs one single-token
    forward over the cached keys and values of the prefix, for a whole batch at once; without
    it, each new code recomputes the whole prefix. Both give the same codes for the same
    ``generator`` state. ``generator`` must live on the prior's device.
    """
    settings = settings or SampleConfig()
    prior.eval()
    device = next(prior.parameters()).device
    height, width = prior.grid_shape
    length = height * width
    maps = []
    for start in range(0, num_samples, settings.batch_size):
        batch = min(settings.batch_size, num_samples - start)
        position = None
        if slice_position is not None:
            position = torch.full((batch,), float(slice_position), device=device)
        codes = torch.zeros(batch, length, dtype=torch.long, device=device)
        cache = prior.new_cache(batch) if settings.use_cache and prior.supports_cache else None
        for t in range(length):
            if cache is not None:
                logits = prior.step(codes[:, t - 1] if t else None, cache, position)
            else:
                logits = prior.next_logits(codes, t, position)
            logits = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            codes[:, t] = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
        maps.append(codes.reshape(batch, height, width).cpu())
    return torch.cat(maps)


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


def generate_samples(
    vqvae: VQVAE,
    prior: Prior,
    num_samples: int,
    settings: SampleConfig | None = None,
    slice_position: float | None = None,
    seed: int = 0,
) -> SampleRun:
    """Draw ``num_samples`` code maps from ``prior`` and decode them with ``vqvae``."""
    if prior.conditional and slice_position is None:
        raise ConfigError("this prior is conditioned on slice position; give --slice-position")
    if not prior.conditional and slice_position is not None:
        raise ConfigError("this prior was trained without slice positions; drop --slice-position")
    if slice_position is not None and not 0 <= slice_position <= 1:
        raise ConfigError(f"slice position must be in [0, 1], got {slice_position}")
    settings = settings or SampleConfig()
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    codes = sample_codes(prior, num_samples, settings, slice_position, generator)
    sampled = time.perf_counter()
    images = decode_codes(vqvae, codes, settings.batch_size)
    return SampleRun(codes, images, sampled - started, time.perf_counter() - sampled)


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
    for i, image in enumerate(run.images):
        path = out_dir / f"sample_{i:04d}.nii.gz"
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
