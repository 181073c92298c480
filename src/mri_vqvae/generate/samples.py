"""New slices: code maps drawn from a prior and decoded by its VQ-VAE, with a draw of the
acquisition texture, and the sample folder they are written to (one NIfTI per sample, a grid,
the codes and ``samples.json``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mri_vqvae import plots
from mri_vqvae.code_maps import save_sample_codes
from mri_vqvae.config import SampleConfig
from mri_vqvae.data.dataset import postprocess, to_unit_range
from mri_vqvae.data.nifti import write_slice, write_slice_in_geometry
from mri_vqvae.data.reference import DataReference
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import SAMPLE_CODES, SAMPLES_GRID, SAMPLES_SUMMARY, make_output_folder
from mri_vqvae.generate.conditions import (
    check_sampler_settings,
    describe_conditions,
    draw_conditions,
)
from mri_vqvae.generate.sampling import sample_codes
from mri_vqvae.model.prior import Prior, PriorConditions
from mri_vqvae.model.texture import texture_generator
from mri_vqvae.records.samples import (
    SampleGeometry,
    SampleIntensities,
    SampleMetadata,
    SampleTexture,
)
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRun:
    """Samples drawn by :func:`generate_samples`, how long drawing them took, and (from
    :func:`draw_samples`) what ``samples.json`` records of them."""

    codes: torch.Tensor  # (N, h, w)
    images: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    sampling_seconds: float
    decoding_seconds: float
    conditions: PriorConditions | None = None
    metadata: SampleMetadata | None = None


def generate_samples(
    *,
    vqvae: TrainedVQVAE,
    prior: Prior,
    settings: SampleConfig,
    conditions: PriorConditions | None = None,
) -> SampleRun:
    """Draw ``settings.num_samples`` code maps from ``prior`` (seeded by ``settings.seed``)
    under ``conditions`` (one row per sample, as :func:`draw_conditions` makes them) and
    decode them with ``vqvae``."""
    if prior.conditional and conditions is None:
        raise ConfigError("this prior is conditioned; give it conditions (draw_conditions)")
    if not prior.conditional and conditions is not None:
        raise ConfigError("this prior was trained without conditions; give none")
    count = settings.num_samples
    if conditions is not None and len(conditions) != count:
        raise ConfigError(f"{len(conditions)} conditions for {count} samples")
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    started = time.perf_counter()
    codes = sample_codes(prior, count, settings, conditions, generator)
    sampled = time.perf_counter()
    images = vqvae.decode(codes, settings.batch_size)
    return SampleRun(codes, images, sampled - started, time.perf_counter() - sampled, conditions)


def draw_samples(*, vqvae: TrainedVQVAE, prior: TrainedPrior, settings: SampleConfig) -> SampleRun:
    """What ``sample`` draws: conditions checked and drawn as ``settings`` ask, code maps
    from ``prior`` decoded by ``vqvae``, a draw of its acquisition texture added (when
    ``settings.texture`` is on and it has one), and the samples' metadata."""
    if vqvae.data_reference is None:
        logger.warning(
            "%s records no reference of its training slices (trained by an older mri-vqvae): "
            "the samples hold the decoded images in [0, 1] with an identity affine; retrain "
            "the VQ-VAE for samples in the training data's geometry and intensity scale",
            vqvae.path,
        )
    check_sampler_settings(
        prior.extras,
        settings,
        condition_dropout=prior.config.prior_train.condition_dropout,
        autoregressive=prior.model.autoregressive,
    )
    conditions = draw_conditions(
        prior.extras,
        settings.num_samples,
        torch.Generator().manual_seed(settings.seed),
        settings.slice_position,
        settings.label_values(),
    )
    run = generate_samples(vqvae=vqvae, prior=prior.model, settings=settings, conditions=conditions)
    run, texture = _with_texture(run, vqvae, settings)
    geometry, intensities = samples_provenance(vqvae.data_reference, run.images.shape[-2:])
    metadata = SampleMetadata(
        # Absolute, so evaluate-samples finds them from any working folder.
        vqvae=str(vqvae.path.resolve()),
        vqvae_sha256=vqvae.sha256,
        prior=str(prior.path.resolve()),
        prior_sha256=prior.sha256,
        prior_architecture=prior.config.prior.architecture,
        settings=settings,
        seed=settings.seed,
        slice_position=settings.slice_position,
        conditions=describe_conditions(conditions, prior.extras, settings),
        texture=texture,
        device=str(vqvae.device),
        num_samples=len(run.codes),
        grid_shape=tuple(run.codes.shape[1:]),
        image_size=tuple(run.images.shape[-2:]),
        sampling_seconds=run.sampling_seconds,
        decoding_seconds=run.decoding_seconds,
        codes_per_second=run.codes.numel() / max(run.sampling_seconds, 1e-9),
        geometry=geometry,
        intensities=intensities,
    )
    return replace(run, metadata=metadata)


def _with_texture(
    run: SampleRun, vqvae: TrainedVQVAE, settings: SampleConfig
) -> tuple[SampleRun, SampleTexture]:
    """The decoded samples with a draw of the VQ-VAE's acquisition texture added (when
    ``sample.texture`` is on and the VQ-VAE has one), and what samples.json says of it."""
    if not settings.texture:
        return run, SampleTexture(applied=False, reason="sample.texture is off: the decoder's mean")
    if vqvae.texture is None:
        logger.warning(
            "%s keeps no acquisition texture (trained with train.texture_slices 0, or by an "
            "older mri-vqvae): the samples are the decoder's smooth mean",
            vqvae.path,
        )
        return run, SampleTexture(applied=False, reason="the VQ-VAE keeps no acquisition texture")
    generator = texture_generator(settings.seed, "samples")
    textured = replace(run, images=vqvae.texture.sample(run.images, generator))
    return textured, SampleTexture(
        applied=True,
        fitted_slices=vqvae.texture.fitted_slices,
        intensity_bins=len(vqvae.texture.bin_centres),
        seed=settings.seed,
    )


# What samples.json says when the VQ-VAE records no reference of its training data.
NO_REFERENCE = (
    "none: the VQ-VAE checkpoint records no reference of its training slices (it was trained "
    "before mri-vqvae recorded one); retrain the VQ-VAE to get samples in their geometry and scale"
)


def write_samples(run: SampleRun, out_dir: str | Path, reference: DataReference | None) -> Path:
    """Write ``samples.png`` (a grid), one NIfTI per sample (``sample_0000.nii.gz``), the
    codes (``codes.pt``) and ``samples.json`` (the run's metadata: models, settings, timings,
    and where each sample's geometry and intensities came from).

    With the training data's ``reference`` each sample is resized to the training slices'
    native shape, given their affine, voxel sizes and unit, and mapped from [0, 1] onto their
    typical intensity range (float32); without one it holds the decoded image in [0, 1] at
    the model's image size, with an identity affine."""
    if run.metadata is None:
        raise ValueError("write_samples needs the metadata draw_samples records")
    out_dir = Path(out_dir)
    make_output_folder(out_dir)
    unit = to_unit_range(run.images).numpy()
    # Wide enough that the names sort in drawing order, as codes.pt holds the maps.
    digits = max(4, len(str(len(unit) - 1)))
    names = tuple(f"sample_{i:0{digits}d}.nii.gz" for i in range(len(unit)))
    for i, (name, image) in enumerate(zip(names, run.images, strict=True)):
        path = out_dir / name
        if reference is None:
            write_slice(unit[i, 0], path)
        else:
            low, high = reference.intensity_range
            pixels = postprocess(image, reference.shape, low, high)
            write_slice_in_geometry(pixels, path, reference.geometry)
    save_sample_codes(run.codes, out_dir / SAMPLE_CODES)
    shown = run.images[:64].numpy()
    plots.image_grid(shown, out_dir / SAMPLES_GRID, title=f"{len(shown)} of {len(unit)} samples")
    # Written last: a folder without it was not finished, and evaluate-samples refuses it.
    replace(run.metadata, files=names).write(out_dir / SAMPLES_SUMMARY)
    return out_dir


def samples_provenance(
    reference: DataReference | None, image_size: tuple[int, int]
) -> tuple[SampleGeometry, SampleIntensities]:
    """What geometry and intensities the sample files hold, and where they came from."""
    if reference is None:
        identity = tuple(tuple(float(x) for x in row) for row in np.eye(4))
        return (
            SampleGeometry(
                source=NO_REFERENCE, shape=tuple(image_size), affine=identity, zooms=(1.0, 1.0)
            ),
            SampleIntensities(source=NO_REFERENCE, range=(0.0, 1.0), dtype="float32"),
        )
    geometry = reference.geometry
    geometry_record = SampleGeometry(
        source=reference.describe_geometry(),
        shape=reference.shape,
        stored_shape=geometry.stored_shape,
        decoded_shape=tuple(image_size),
        resized=tuple(image_size) != reference.shape,
        affine=geometry.affine,
        zooms=geometry.zooms,
        spatial_unit=geometry.spatial_unit,
        sform_code=geometry.sform_code,
        qform_code=geometry.qform_code,
    )
    intensities = SampleIntensities(
        source=reference.describe_intensities(),
        range=reference.intensity_range,
        dtype="float32",
    )
    return geometry_record, intensities
