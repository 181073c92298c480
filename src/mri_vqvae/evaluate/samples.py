"""Score a folder of generated slices against real ones: the ``evaluate-samples`` command."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch

from mri_vqvae import plots
from mri_vqvae.code_maps import encode_slices
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.sample_metrics import (
    SampleMetricsConfig,
    classifier_two_sample_test,
    distribution,
    jensen_shannon_bits,
    mean_pairwise_ssim,
    nearest_by_ssim,
    share_above,
    within,
)
from mri_vqvae.files import (
    CLOSEST_TO_TRAINING,
    MEMORISATION_TABLE,
    NEAREST_TRAINING_SSIM,
    SAMPLE_METRICS,
    SAMPLES_WITH_NEAREST,
    write_text_atomic,
)
from mri_vqvae.model import VQVAE

logger = logging.getLogger(__name__)

MEMORISATION_SSIM = 0.95
# The targets, recorded beside each figure so a summary says whether it met them.
TARGET_TWO_SAMPLE_VS_RECONSTRUCTIONS = 0.65
TARGET_MEMORISED_SHARE = 0.01
TARGET_DIVERSITY_TOLERANCE = 0.20


def as_loaded(images: torch.Tensor) -> torch.Tensor:
    """Images put through what loading a slice does: per-image min-max scaling to [-1, 1] and
    float16 storage, so generated and reconstructed images are prepared alike."""
    flat = images.float().flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scaled = (flat - low[:, None]) / (high - low).clamp_min(1e-8)[:, None]
    return (scaled * 2 - 1).reshape(images.shape).half().float()


@torch.no_grad()
def reconstruct(
    vqvae: VQVAE, slices: SliceSet, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ-VAE's reconstructions of a split, prepared as loaded slices are, and the code
    maps ``(N, h, w)`` it chose for them."""
    vqvae.eval()
    images_out, codes = [], []
    for start in range(0, len(slices), batch_size):
        images = slices.batch(slice(start, start + batch_size)).to(device)
        output = vqvae(images)
        images_out.append(output.reconstruction.clamp(-1, 1).cpu())
        codes.append(output.indices.cpu())
    return as_loaded(torch.cat(images_out)), torch.cat(codes)


def evaluate_samples(
    samples: SliceSet,
    sample_codes: torch.Tensor | None,
    train: SliceSet,
    held_out: SliceSet,
    vqvae: VQVAE,
    out_dir: str | Path,
    device: torch.device,
    settings: SampleMetricsConfig | None = None,
) -> dict:
    """Two-sample tests, memorisation, diversity and code statistics of ``samples``; writes
    ``sample_metrics.json``, ``memorisation.csv`` and figures to ``out_dir``.

    ``held_out`` are real slices the VQ-VAE and prior never trained on; ``sample_codes`` are
    the drawn code maps (encoded from the images when ``None``).
    """
    settings = settings or SampleMetricsConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample_images, real_images = samples.images.float(), held_out.images.float()
    train_images = train.images  # float16; converted a chunk at a time
    if sample_images.shape[-2:] != real_images.shape[-2:]:
        raise InputError(
            f"samples are {tuple(sample_images.shape[-2:])} but real slices are "
            f"{tuple(real_images.shape[-2:])}; load both at the VQ-VAE's image size"
        )
    logger.info("two-sample test: samples against real held-out slices")
    against_real = classifier_two_sample_test(sample_images, real_images, settings)
    logger.info("two-sample test: samples against reconstructions of held-out slices")
    reconstructions, held_out_codes = reconstruct(vqvae, held_out, device)
    against_reconstructions = classifier_two_sample_test(sample_images, reconstructions, settings)

    logger.info("nearest training slices")
    sample_nearest, sample_nearest_index = nearest_by_ssim(
        sample_images, train_images, settings.neighbour_candidates
    )
    real_nearest, _ = nearest_by_ssim(real_images, train_images, settings.neighbour_candidates)
    sample_diversity = mean_pairwise_ssim(sample_images, settings.diversity_pairs, settings.seed)
    real_diversity = mean_pairwise_ssim(real_images, settings.diversity_pairs, settings.seed)
    # Decoded images lack the noise of real ones, which alone raises their pairwise SSIM; the
    # reconstructions give the like-for-like reference.
    reconstruction_diversity = mean_pairwise_ssim(
        reconstructions, settings.diversity_pairs, settings.seed
    )

    if sample_codes is None:
        sample_codes = encode_slices(vqvae, samples, device)
    num_embeddings = vqvae.num_embeddings
    counts = {
        "samples": torch.bincount(sample_codes.flatten().long(), minlength=num_embeddings),
        "held_out": torch.bincount(held_out_codes.flatten(), minlength=num_embeddings),
        "train": torch.bincount(
            encode_slices(vqvae, train, device).flatten(), minlength=num_embeddings
        ),
    }
    memorised = share_above(sample_nearest, MEMORISATION_SSIM)
    summary = {
        "num_samples": len(samples),
        "num_held_out": len(held_out),
        "num_train": len(train),
        "two_sample_vs_real": against_real,
        "two_sample_vs_reconstructions": against_reconstructions,
        "nearest_train_ssim_samples": distribution(sample_nearest),
        "nearest_train_ssim_held_out": distribution(real_nearest),
        "share_samples_above_0.95": memorised,
        "share_held_out_above_0.95": share_above(real_nearest, MEMORISATION_SSIM),
        "pairwise_ssim_samples": sample_diversity,
        "pairwise_ssim_held_out": real_diversity,
        "pairwise_ssim_reconstructions": reconstruction_diversity,
        "diversity_ratio": sample_diversity / real_diversity,
        "diversity_ratio_vs_reconstructions": sample_diversity / reconstruction_diversity,
        "code_js_divergence_bits": jensen_shannon_bits(counts["samples"], counts["held_out"]),
        "code_js_divergence_train_vs_held_out_bits": jensen_shannon_bits(
            counts["train"], counts["held_out"]
        ),
        "codes_used_by_samples": int((counts["samples"] > 0).sum()),
        "codes_used_by_held_out": int((counts["held_out"] > 0).sum()),
        "targets": {
            "two_sample_vs_reconstructions_at_most_0.65": against_reconstructions["accuracy"]
            <= TARGET_TWO_SAMPLE_VS_RECONSTRUCTIONS,
            "under_1_percent_above_0.95_ssim": memorised < TARGET_MEMORISED_SHARE,
            "diversity_within_20_percent": within(
                sample_diversity, real_diversity, TARGET_DIVERSITY_TOLERANCE
            ),
            "diversity_within_20_percent_of_reconstructions": within(
                sample_diversity, reconstruction_diversity, TARGET_DIVERSITY_TOLERANCE
            ),
        },
        "settings": {
            "folds": settings.folds,
            "classifier_steps": settings.classifier_steps,
            "neighbour_candidates": settings.neighbour_candidates,
            "diversity_pairs": settings.diversity_pairs,
            "seed": settings.seed,
        },
    }
    write_text_atomic(out_dir / SAMPLE_METRICS, json.dumps(summary, indent=2))
    with open(out_dir / MEMORISATION_TABLE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "nearest_train_slice", "ssim"])
        for i, name in enumerate(samples.names):
            writer.writerow(
                [name, train.names[sample_nearest_index[i]], f"{float(sample_nearest[i]):.6f}"]
            )
    _figures(samples, train, sample_nearest, sample_nearest_index, real_nearest, out_dir, settings)
    return summary


def _figures(
    samples: SliceSet,
    train: SliceSet,
    nearest: torch.Tensor,
    nearest_index: torch.Tensor,
    real_nearest: torch.Tensor,
    out_dir: Path,
    settings: SampleMetricsConfig,
) -> None:
    shown = min(8, len(samples))
    closest = nearest.argsort(descending=True)[:shown]
    random = torch.randperm(len(samples), generator=torch.Generator().manual_seed(settings.seed))
    for order, name, title in (
        (closest, CLOSEST_TO_TRAINING, "the samples closest to a training slice"),
        (random[:shown], SAMPLES_WITH_NEAREST, "random samples"),
    ):
        pairs = [samples.images[order], train.images[nearest_index[order]]]
        plots.image_rows(
            [images.float().numpy() for images in pairs],
            ["sample", "nearest training slice"],
            out_dir / name,
            title=f"{title} and their nearest training slices",
            column_titles=[f"SSIM {float(nearest[i]):.3f}" for i in order],
        )
    plots.score_histograms(
        {"samples": nearest.numpy(), "held-out real slices": real_nearest.numpy()},
        out_dir / NEAREST_TRAINING_SSIM,
        xlabel="highest SSIM to any training slice",
        threshold=MEMORISATION_SSIM,
    )
