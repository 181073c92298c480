"""Score a folder of generated slices against real ones: the ``evaluate-samples`` command."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mri_vqvae import plots
from mri_vqvae.code_maps import encode_slices, load_sample_codes
from mri_vqvae.config import DataConfig, SampleMetricsConfig
from mri_vqvae.data.dataset import SliceSet, list_slices, load_split
from mri_vqvae.errors import ConfigError, InputError, UserError
from mri_vqvae.evaluate.comparisons import ReferenceSets, compare_sets, split_in_halves
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
    SAMPLE_CODES,
    SAMPLE_METRICS,
    SAMPLES,
    SAMPLES_SUMMARY,
    SAMPLES_WITH_NEAREST,
    folder_kind,
    make_output_folder,
    write_csv_atomic,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.model.texture import ResidualTexture, texture_generator
from mri_vqvae.records.samples import (
    MEMORISATION_SSIM,
    SAMPLE_FILE,
    MeasuredTexture,
    SampleMeasures,
    SampleMetadata,
)
from mri_vqvae.trained import TrainedVQVAE

logger = logging.getLogger(__name__)

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
    *,
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
    *,
    vqvae: TrainedVQVAE,
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
        vqvae.model, train.images[rows], vqvae.device, texture=texture,
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


@dataclass(frozen=True)
class GeneratedSamples:
    """A sample folder as ``evaluate-samples`` reads it: the slices as written, their code
    maps (None where ``codes.pt`` is missing or does not match the files), the acquisition
    texture they carry (None if none) and the decoder's mean of their codes, prepared as
    loaded slices are (None without a texture or without codes)."""

    slices: SliceSet
    codes: torch.Tensor | None = None
    texture: ResidualTexture | None = None
    plain: torch.Tensor | None = None


def read_sample_metadata(folder: Path) -> SampleMetadata | None:
    """The folder's ``samples.json``, checked; None where there is none."""
    path = folder / SAMPLES_SUMMARY
    return SampleMetadata.read(path) if path.is_file() else None


def sample_files(folder: Path, metadata: SampleMetadata | None) -> list[Path]:
    """The slices to score in ``folder``: exactly the files its ``samples.json`` lists (others
    there are ignored, with a warning), or every slice of a folder ``sample`` did not write.
    A sample folder without its ``samples.json`` was not finished and is refused."""
    if metadata is None:
        if folder_kind(folder) is SAMPLES:
            raise InputError(
                f"{folder}: holds no {SAMPLES_SUMMARY}, so the sample command writing it did "
                "not finish (stopped or killed); draw the samples again with --overwrite"
            )
        return list_slices(folder)
    if metadata.files:
        listed = [folder / name for name in metadata.files]
    else:  # drawn before samples.json listed its files
        listed = [p for p in list_slices(folder) if SAMPLE_FILE.fullmatch(p.name)]
        if len(listed) != metadata.num_samples:
            raise InputError(
                f"{folder}: holds {len(listed)} sample files, but {SAMPLES_SUMMARY} says "
                f"{metadata.num_samples} were drawn; draw them again with --overwrite"
            )
    missing = [p.name for p in listed if not p.is_file()]
    if missing:
        raise InputError(
            f"{folder / SAMPLES_SUMMARY}: lists {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, missing from the "
            "folder; draw the samples again with --overwrite"
        )
    stray = sorted({p.name for p in list_slices(folder)} - {p.name for p in listed})
    if stray:
        shown = ", ".join(stray[:3]) + (" ..." if len(stray) > 3 else "")
        logger.warning(
            "%s: ignoring %d slice(s) %s does not list (%s)",
            *(folder, len(stray), SAMPLES_SUMMARY, shown),
        )
    return listed


def samples_vqvae_path(folder: Path, given: Path | None) -> Path:
    """The VQ-VAE the samples in ``folder`` were drawn with: ``given``, or the one their
    ``samples.json`` names."""
    metadata = read_sample_metadata(folder)
    if given is not None:
        return given
    if metadata is None:
        raise ConfigError(
            f"{folder / SAMPLES_SUMMARY} is missing, so names no VQ-VAE; pass --vqvae"
        )
    return Path(metadata.vqvae)


def read_generated_samples(
    folder: Path, *, vqvae: TrainedVQVAE, data: DataConfig
) -> GeneratedSamples:
    """The slices of a sample folder at ``vqvae``'s size, their codes and the texture they
    carry, after checking that ``samples.json`` says they were drawn with ``vqvae``."""
    metadata = read_sample_metadata(folder)
    if metadata is not None and metadata.vqvae_sha256 != vqvae.sha256:
        raise UserError(
            f"{vqvae.path}: not the VQ-VAE these samples were drawn with "
            f"({folder / SAMPLES_SUMMARY} gives sha256 {metadata.vqvae_sha256[:12]}...)"
        )
    files = sample_files(folder, metadata)
    slices = load_split(files, replace(data, use_cache=False), label="samples")
    codes = None
    if (folder / SAMPLE_CODES).is_file() and not slices.skipped:
        codes = load_sample_codes(folder / SAMPLE_CODES)
        codes = codes if len(codes) == len(slices) else None
    if metadata is None or not metadata.textured:
        return GeneratedSamples(slices, codes)
    if vqvae.texture is None:
        raise UserError(
            f"{folder / SAMPLES_SUMMARY} says the samples carry the VQ-VAE's acquisition "
            f"texture, but {vqvae.path} keeps none: not the VQ-VAE they were drawn with"
        )
    if codes is None:
        logger.warning(
            "%s: no codes.pt for every sample, so the textured files meet reconstructions "
            "given the texture too, and memorisation is searched with the files alone (their "
            "noise lowers each SSIM to a training slice a little)",
            folder,
        )
        return GeneratedSamples(slices, None, vqvae.texture)
    plain = as_loaded(vqvae.decode(codes))
    return GeneratedSamples(slices, codes, vqvae.texture, plain)


def evaluate_samples(
    samples: GeneratedSamples,
    *,
    train: SliceSet,
    held_out: SliceSet,
    vqvae: TrainedVQVAE,
    out_dir: str | Path,
    settings: SampleMetricsConfig,
) -> SampleMeasures:
    """Two-sample tests, KID, density and coverage (each with its null and the shift),
    memorisation, diversity and code statistics of ``samples``; writes ``sample_metrics.json``,
    ``memorisation.csv`` and figures to ``out_dir``.

    ``held_out`` are real slices the VQ-VAE and prior never trained on. Samples that carry the
    VQ-VAE's acquisition texture meet the reconstructions as the decoder's mean of their codes
    (noise on both sides would only blunt the classifier) and the real slices as written;
    without their codes, the files meet reconstructions given a draw of the texture too.
    Memorisation is searched with the files and the decoder's mean, the closer of the two,
    since added noise lowers every SSIM and would hide a copy.
    """
    out_dir = Path(out_dir)
    make_output_folder(out_dir)
    started = time.monotonic()
    written = samples.slices.images.float()
    if written.shape[-2:] != held_out.images.shape[-2:]:
        raise InputError(
            f"samples are {tuple(written.shape[-2:])} but real slices are "
            f"{tuple(held_out.images.shape[-2:])}; load both at the VQ-VAE's image size"
        )
    sets, held_out_codes = _compared_sets(samples, train, held_out, vqvae, settings)
    logger.info("comparing samples with training reconstructions (protocol %s)", settings.protocol)
    comparisons = compare_sets(sets, settings.measures, settings.seed)
    nearest = Nearest.of(written, held_out.images.float(), train, settings)
    if samples.plain is not None:
        nearest = nearest.or_closer(samples.plain.float(), train, settings)
    codes = samples.codes
    if codes is None:
        codes = encode_slices(vqvae.model, samples.slices, vqvae.device)
    measures = SampleMeasures(
        protocol=settings.measures,
        texture=_texture_record(samples),
        num_samples=len(samples.slices),
        num_held_out=len(held_out),
        num_train=len(train),
        num_train_reconstructed=len(sets.train_half_a) + len(sets.train_half_b),
        **comparisons.figures(),
        **nearest.figures(),
        **_diversity(sets.samples, sets.held_out_real, sets.held_out_reconstructions, settings),
        **_code_statistics(codes, held_out_codes, train, vqvae),
        settings=settings,
        seconds=0.0,
    )
    measures = replace(measures, targets=targets(measures), seconds=time.monotonic() - started)
    measures.write(out_dir / SAMPLE_METRICS)
    _write_memorisation_table(samples.slices, train, nearest, out_dir)
    _figures(samples.slices, train, nearest, out_dir, settings)
    return measures


def _compared_sets(
    samples: GeneratedSamples,
    train: SliceSet,
    held_out: SliceSet,
    vqvae: TrainedVQVAE,
    settings: SampleMetricsConfig,
) -> tuple[ReferenceSets, torch.Tensor]:
    """The sets to compare, and the held-out slices' code maps. Textured samples meet the
    reconstructions as the decoder's mean of their codes where they have them; without,
    as written, against reconstructions given a draw of the texture too."""
    written = samples.slices.images.float()
    compared = written if samples.plain is None else samples.plain.float()
    texture = samples.texture if samples.plain is None else None
    reconstructions, held_out_codes = reconstruct(
        vqvae.model, held_out.images, vqvae.device, texture=texture,
        generator=texture_generator(settings.seed, "held_out"),
    )  # fmt: skip
    sets = reference_sets(
        compared, train, held_out, reconstructions, vqvae=vqvae, settings=settings,
        samples_as_written=written, texture=texture,
    )  # fmt: skip
    return sets, held_out_codes


def _texture_record(samples: GeneratedSamples) -> MeasuredTexture:
    """What sample_metrics.json says of the acquisition texture and how it was handled."""
    if samples.texture is None:
        return MeasuredTexture(samples_textured=False)
    if samples.plain is not None:
        return MeasuredTexture(
            samples_textured=True,
            against_reconstructions="the decoder's mean of the samples' codes",
            against_real_slices="the sample files, texture and all",
            memorisation_searched_with="the files and the decoder's mean, the closer",
        )
    return MeasuredTexture(
        samples_textured=True,
        against_reconstructions="the sample files, against reconstructions with a draw "
        "of the texture (no codes to decode)",
        against_real_slices="the sample files, texture and all",
        memorisation_searched_with="the files alone",
    )


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

    def figures(self) -> dict[str, object]:
        """The distributions and the shares above the memorisation threshold, by the names
        of :class:`SampleMeasures`' fields."""
        return {
            "nearest_train_ssim_samples": distribution(self.samples),
            "nearest_train_ssim_held_out": distribution(self.held_out),
            "share_samples_memorised": share_above(self.samples, MEMORISATION_SSIM),
            "share_held_out_memorised": share_above(self.held_out, MEMORISATION_SSIM),
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
    vqvae: TrainedVQVAE,
) -> dict[str, float]:
    size = vqvae.model.num_embeddings
    train_codes = encode_slices(vqvae.model, train, vqvae.device)
    counts = {
        "samples": torch.bincount(sample_codes.flatten().long(), minlength=size),
        "held_out": torch.bincount(held_out_codes.flatten(), minlength=size),
        "train": torch.bincount(train_codes.flatten(), minlength=size),
    }
    return {
        "code_js_divergence_bits": jensen_shannon_bits(counts["samples"], counts["held_out"]),
        "code_js_divergence_train_vs_held_out_bits": jensen_shannon_bits(
            counts["train"], counts["held_out"]
        ),
        "codes_used_by_samples": int((counts["samples"] > 0).sum()),
        "codes_used_by_held_out": int((counts["held_out"] > 0).sum()),
    }


def targets(measures: SampleMeasures) -> dict[str, bool]:
    """The issue's targets, each true when ``measures`` meets it."""
    two_sample = measures.two_sample
    met = {
        "two_sample_vs_train_reconstructions_at_most_0.65": (
            two_sample.samples_vs_train_reconstructions.accuracy
            <= TARGET_TWO_SAMPLE_VS_TRAIN_RECONSTRUCTIONS
        ),
        "two_sample_null_at_most_0.55": (
            two_sample.null_train_halves.accuracy <= TARGET_NULL_ACCURACY
        ),
    }
    for space, kid in measures.kid.items():
        ratio = kid.ratio_to_null
        met[f"kid_{space}_at_most_2x_null"] = ratio is not None and ratio <= TARGET_KID_TO_NULL
    met["under_1_percent_above_0.95_ssim"] = (
        measures.share_samples_memorised < TARGET_MEMORISED_SHARE
    )
    for suffix, reference in (
        ("", measures.pairwise_ssim_held_out),
        ("_of_reconstructions", measures.pairwise_ssim_reconstructions),
    ):
        met[f"diversity_within_20_percent{suffix}"] = within(
            measures.pairwise_ssim_samples, reference, TARGET_DIVERSITY_TOLERANCE
        )
    return met


def _write_memorisation_table(
    samples: SliceSet, train: SliceSet, nearest: Nearest, out_dir: Path
) -> None:
    rows = [
        [name, train.names[nearest.sample_index[i]], f"{float(nearest.samples[i]):.6f}"]
        for i, name in enumerate(samples.names)
    ]
    write_csv_atomic(out_dir / MEMORISATION_TABLE, ["sample", "nearest_train_slice", "ssim"], rows)


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
