"""Score a folder of generated slices against real ones: the ``evaluate-samples`` command."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mri_vqvae import plots
from mri_vqvae.code_maps import encode_slices
from mri_vqvae.config import SampleMetricsConfig
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.comparisons import (
    NULL,
    PRIMARY,
    ReferenceSets,
    compare_sets,
    split_in_halves,
)
from mri_vqvae.evaluate.protocol import protocol_named
from mri_vqvae.evaluate.sample_metrics import (
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
from mri_vqvae.model.texture import ResidualTexture, texture_generator

logger = logging.getLogger(__name__)

MEMORISATION_SSIM = 0.95
# The targets, recorded beside each figure so a summary says whether it met them.
TARGET_TWO_SAMPLE_VS_TRAIN_RECONSTRUCTIONS = 0.65
TARGET_NULL_ACCURACY = 0.55
TARGET_KID_TO_NULL = 2.0
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
    vqvae: VQVAE,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
    texture: ResidualTexture | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VQ-VAE's reconstructions of ``images`` ``(N, 1, H, W)``, prepared as loaded slices
    are, and the code maps ``(N, h, w)`` it chose for them; with ``texture``, a draw of it
    (from ``generator``) is added first, as ``sample`` adds it to samples."""
    vqvae.eval()
    images_out, codes = [], []
    for start in range(0, len(images), batch_size):
        output = vqvae(images[start : start + batch_size].float().to(device))
        images_out.append(output.reconstruction.clamp(-1, 1).cpu())
        codes.append(output.indices.cpu())
    decoded = torch.cat(images_out)
    if texture is not None:
        decoded = texture.sample(decoded, generator)
    return as_loaded(decoded), torch.cat(codes)


def reference_sets(
    samples: torch.Tensor,
    train: SliceSet,
    held_out: SliceSet,
    held_out_reconstructions: torch.Tensor,
    vqvae: VQVAE,
    device: torch.device,
    settings: SampleMetricsConfig,
    samples_as_written: torch.Tensor | None = None,
    texture: ResidualTexture | None = None,
) -> ReferenceSets:
    """The sets to compare: up to ``settings.reference_slices`` random training slices are
    reconstructed (with a draw of ``texture``, if given) and split into two random halves.
    ``samples`` meet the reconstructions, ``samples_as_written`` (default: the same) the real
    slices."""
    count = min(settings.reference_slices, len(train))
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed))
    rows = rows[:count]
    train_reconstructions, _ = reconstruct(
        vqvae, train.images[rows], device, texture=texture,
        generator=texture_generator(settings.seed, "train"),
    )  # fmt: skip
    half_a, half_b = split_in_halves(count, settings.seed)
    return ReferenceSets(
        samples=samples,
        samples_as_written=samples if samples_as_written is None else samples_as_written,
        train_half_a=train_reconstructions[half_a],
        train_half_b=train_reconstructions[half_b],
        held_out_reconstructions=held_out_reconstructions,
        held_out_real=held_out.images.float(),
        train_real=train.images[rows].float(),
    )


def evaluate_samples(
    samples: SliceSet,
    sample_codes: torch.Tensor | None,
    train: SliceSet,
    held_out: SliceSet,
    vqvae: VQVAE,
    out_dir: str | Path,
    device: torch.device,
    settings: SampleMetricsConfig | None = None,
    texture: ResidualTexture | None = None,
    plain_samples: torch.Tensor | None = None,
) -> dict:
    """Two-sample tests, KID, density and coverage (each with its null and the shift),
    memorisation, diversity and code statistics of ``samples``; writes ``sample_metrics.json``,
    ``memorisation.csv`` and figures to ``out_dir``.

    ``held_out`` are real slices the VQ-VAE and prior never trained on; ``sample_codes`` are
    the drawn code maps (encoded from the images when ``None``). Samples that carry the
    VQ-VAE's acquisition ``texture`` meet the reconstructions as ``plain_samples`` (the
    decoder's mean of their codes; noise on both sides would only blunt the classifier) and
    the real slices as written; without ``plain_samples``, the files meet reconstructions
    given a draw of the texture too. Memorisation is searched with the files and
    ``plain_samples``, the closer of the two, since added noise lowers every SSIM and would
    hide a copy.
    """
    settings = settings or SampleMetricsConfig()
    protocol = protocol_named(settings.protocol)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sample_images, real_images = samples.images.float(), held_out.images.float()
    if sample_images.shape[-2:] != real_images.shape[-2:]:
        raise InputError(
            f"samples are {tuple(sample_images.shape[-2:])} but real slices are "
            f"{tuple(real_images.shape[-2:])}; load both at the VQ-VAE's image size"
        )
    # Textured samples meet the reconstructions as the decoder's mean of their codes; without
    # their codes, as written, against reconstructions given the texture too.
    compared, reference_texture = sample_images, texture
    if plain_samples is not None:
        compared, reference_texture = plain_samples.float(), None
    reconstructions, held_out_codes = reconstruct(
        vqvae, held_out.images, device, texture=reference_texture,
        generator=texture_generator(settings.seed, "held_out"),
    )  # fmt: skip
    sets = reference_sets(
        compared, train, held_out, reconstructions, vqvae, device, settings, sample_images,
        reference_texture,
    )  # fmt: skip
    logger.info("comparing samples with training reconstructions (protocol %s)", protocol.name)
    comparisons = compare_sets(sets, protocol, settings.seed)
    logger.info("nearest training slices")
    nearest = Nearest.of(sample_images, real_images, train, settings)
    if plain_samples is not None:
        nearest = nearest.or_closer(plain_samples.float(), train, settings)
    if sample_codes is None:
        sample_codes = encode_slices(vqvae, samples, device)
    summary = {
        "protocol": protocol.to_dict(),
        "texture": _texture_record(texture, plain_samples is not None),
        "num_samples": len(samples),
        "num_held_out": len(held_out),
        "num_train": len(train),
        "num_train_reconstructed": len(sets.train_half_a) + len(sets.train_half_b),
        **comparisons,
        **nearest.summary(),
        **_diversity(compared, real_images, reconstructions, settings),
        **_code_statistics(sample_codes, held_out_codes, train, vqvae, device),
    }
    summary["targets"] = targets(summary)
    summary["settings"] = dataclasses.asdict(settings)
    summary["seconds"] = time.monotonic() - started
    write_text_atomic(out_dir / SAMPLE_METRICS, json.dumps(summary, indent=2))
    _write_memorisation_table(samples, train, nearest, out_dir)
    _figures(samples, train, nearest, out_dir, settings)
    return summary


def _texture_record(texture: ResidualTexture | None, decoded: bool) -> dict[str, object]:
    """What sample_metrics.json says of the acquisition texture and how it was handled."""
    if texture is None:
        return {"samples_textured": False}
    if decoded:
        return {
            "samples_textured": True,
            "against_reconstructions": "the decoder's mean of the samples' codes",
            "against_real_slices": "the sample files, texture and all",
            "memorisation_searched_with": "the files and the decoder's mean, the closer",
        }
    return {
        "samples_textured": True,
        "against_reconstructions": "the sample files, against reconstructions with a draw "
        "of the texture (no codes to decode)",
        "against_real_slices": "the sample files, texture and all",
        "memorisation_searched_with": "the files alone",
    }


@dataclass
class Nearest:
    """Each sample's and each held-out slice's highest SSIM to a training slice."""

    samples: torch.Tensor
    sample_index: torch.Tensor  # the training slice each sample is nearest to
    held_out: torch.Tensor

    @classmethod
    def of(
        cls,
        samples: torch.Tensor,
        held_out: torch.Tensor,
        train: SliceSet,
        settings: SampleMetricsConfig,
    ) -> Nearest:
        """Search the training slices (float16; converted a chunk at a time)."""
        candidates = settings.neighbour_candidates
        best, index = nearest_by_ssim(samples, train.images, candidates)
        return cls(best, index, nearest_by_ssim(held_out, train.images, candidates)[0])

    def or_closer(
        self, images: torch.Tensor, train: SliceSet, settings: SampleMetricsConfig
    ) -> Nearest:
        """Each sample's nearest training slice by its own image or by ``images`` (another
        rendering of the same samples), whichever is closer: never a weaker search."""
        best, index = nearest_by_ssim(images, train.images, settings.neighbour_candidates)
        closer = best > self.samples
        return Nearest(
            torch.where(closer, best, self.samples),
            torch.where(closer, index, self.sample_index),
            self.held_out,
        )

    def summary(self) -> dict[str, object]:
        """Distributions and the shares above the memorisation threshold."""
        return {
            "nearest_train_ssim_samples": distribution(self.samples),
            "nearest_train_ssim_held_out": distribution(self.held_out),
            "share_samples_above_0.95": share_above(self.samples, MEMORISATION_SSIM),
            "share_held_out_above_0.95": share_above(self.held_out, MEMORISATION_SSIM),
        }


def _diversity(
    samples: torch.Tensor,
    held_out: torch.Tensor,
    reconstructions: torch.Tensor,
    settings: SampleMetricsConfig,
) -> dict[str, float]:
    pairs, seed = settings.diversity_pairs, settings.seed
    sample_diversity = mean_pairwise_ssim(samples, pairs, seed)
    real_diversity = mean_pairwise_ssim(held_out, pairs, seed)
    # Decoded images lack the noise of real ones, which alone raises their pairwise SSIM; the
    # reconstructions give the like-for-like reference.
    reconstruction_diversity = mean_pairwise_ssim(reconstructions, pairs, seed)
    return {
        "pairwise_ssim_samples": sample_diversity,
        "pairwise_ssim_held_out": real_diversity,
        "pairwise_ssim_reconstructions": reconstruction_diversity,
        "diversity_ratio": sample_diversity / real_diversity,
        "diversity_ratio_vs_reconstructions": sample_diversity / reconstruction_diversity,
    }


def _code_statistics(
    sample_codes: torch.Tensor,
    held_out_codes: torch.Tensor,
    train: SliceSet,
    vqvae: VQVAE,
    device: torch.device,
) -> dict[str, float]:
    size = vqvae.num_embeddings
    counts = {
        "samples": torch.bincount(sample_codes.flatten().long(), minlength=size),
        "held_out": torch.bincount(held_out_codes.flatten(), minlength=size),
        "train": torch.bincount(encode_slices(vqvae, train, device).flatten(), minlength=size),
    }
    return {
        "code_js_divergence_bits": jensen_shannon_bits(counts["samples"], counts["held_out"]),
        "code_js_divergence_train_vs_held_out_bits": jensen_shannon_bits(
            counts["train"], counts["held_out"]
        ),
        "codes_used_by_samples": int((counts["samples"] > 0).sum()),
        "codes_used_by_held_out": int((counts["held_out"] > 0).sum()),
    }


def targets(summary: dict) -> dict[str, bool]:
    """The issue's targets, each true when ``summary`` meets it."""
    two_sample = summary["two_sample"]
    met = {
        "two_sample_vs_train_reconstructions_at_most_0.65": (
            two_sample[PRIMARY]["accuracy"] <= TARGET_TWO_SAMPLE_VS_TRAIN_RECONSTRUCTIONS
        ),
        "two_sample_null_at_most_0.55": two_sample[NULL]["accuracy"] <= TARGET_NULL_ACCURACY,
    }
    for space, kid in summary["kid"].items():
        ratio = kid["ratio_to_null"]
        met[f"kid_{space}_at_most_2x_null"] = ratio is not None and ratio <= TARGET_KID_TO_NULL
    met["under_1_percent_above_0.95_ssim"] = (
        summary["share_samples_above_0.95"] < TARGET_MEMORISED_SHARE
    )
    for suffix, reference in (("", "held_out"), ("_of_reconstructions", "reconstructions")):
        met[f"diversity_within_20_percent{suffix}"] = within(
            summary["pairwise_ssim_samples"],
            summary[f"pairwise_ssim_{reference}"],
            TARGET_DIVERSITY_TOLERANCE,
        )
    return met


def _write_memorisation_table(
    samples: SliceSet, train: SliceSet, nearest: Nearest, out_dir: Path
) -> None:
    with open(out_dir / MEMORISATION_TABLE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "nearest_train_slice", "ssim"])
        for i, name in enumerate(samples.names):
            writer.writerow(
                [name, train.names[nearest.sample_index[i]], f"{float(nearest.samples[i]):.6f}"]
            )


def _figures(
    samples: SliceSet,
    train: SliceSet,
    nearest: Nearest,
    out_dir: Path,
    settings: SampleMetricsConfig,
) -> None:
    shown = min(8, len(samples))
    closest = nearest.samples.argsort(descending=True)[:shown]
    random = torch.randperm(len(samples), generator=torch.Generator().manual_seed(settings.seed))
    for order, name, title in (
        (closest, CLOSEST_TO_TRAINING, "the samples closest to a training slice"),
        (random[:shown], SAMPLES_WITH_NEAREST, "random samples"),
    ):
        pairs = [samples.images[order], train.images[nearest.sample_index[order]]]
        plots.image_rows(
            [images.float().numpy() for images in pairs],
            ["sample", "nearest training slice"],
            out_dir / name,
            title=f"{title} and their nearest training slices",
            column_titles=[f"SSIM {float(nearest.samples[i]):.3f}" for i in order],
        )
    plots.score_histograms(
        {"samples": nearest.samples.numpy(), "held-out real slices": nearest.held_out.numpy()},
        out_dir / NEAREST_TRAINING_SSIM,
        xlabel="highest SSIM to any training slice",
        threshold=MEMORISATION_SSIM,
    )
