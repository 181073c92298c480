"""``evaluate``: a split scored by a trained VQ-VAE, written to an evaluation folder
(``metrics.json``, ``per_image_metrics.csv``, the figures and the report's arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mri_vqvae import plots
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.evaluate.atlas import write_codebook_atlas, write_examples
from mri_vqvae.evaluate.realism import realism_summary
from mri_vqvae.evaluate.split import SplitEvaluation, evaluate_split
from mri_vqvae.files import (
    BEST_IMAGE,
    CODEBOOK_FILE,
    EVALUATION_SUMMARY,
    EXAMPLES_FILE,
    PER_IMAGE_METRICS,
    POWER_SPECTRUM,
    RANDOM_RECONSTRUCTIONS,
    TEXTURED_RECONSTRUCTIONS,
    WORST_IMAGE,
    make_output_folder,
    ssim_scores_file,
    write_csv_atomic,
)
from mri_vqvae.model.texture import texture_generator
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records.evaluation import EvaluationSummary
from mri_vqvae.trained import TrainedVQVAE

# How many random slices the reconstruction grids show.
SHOWN = 8


def write_evaluation(
    *,
    vqvae: TrainedVQVAE,
    slices: SliceSet,
    out_dir: str | Path,
    split: str,
    batch_size: int,
    protocol: SampleProtocol,
) -> EvaluationSummary:
    """Evaluate a split (named ``split`` in the outputs) and write ``per_image_metrics.csv``,
    ``metrics.json``, the figures and the arrays of the run's report; with the VQ-VAE's
    acquisition texture, textured reconstructions are scored beside the plain ones. Random
    choices follow the VQ-VAE's training seed."""
    out_dir = Path(out_dir)
    make_output_folder(out_dir)
    seed = vqvae.config.train.seed
    result = evaluate_split(
        vqvae.model,
        slices,
        batch_size=batch_size,
        protocol=protocol,
        texture=vqvae.texture,
        seed=seed,
    )
    summary = result.summary(split, realism_summary(result, protocol, seed))
    columns = result.per_image()
    rows = (
        [name, *(f"{values[index]:.6f}" for values in columns.values())]
        for index, name in enumerate(result.names)
    )
    write_csv_atomic(out_dir / PER_IMAGE_METRICS, ["file", *columns], rows)
    summary.write(out_dir / EVALUATION_SUMMARY)
    plots.ssim_scores(result.ssim, out_dir / ssim_scores_file(split), split=split)
    _draw_best_and_worst(vqvae, slices, result, out_dir)
    _draw_random_reconstructions(vqvae, slices, summary, out_dir)
    write_codebook_atlas(slices, result, out_dir / CODEBOOK_FILE, seed=seed)
    if summary.power_spectrum is not None:
        figure = plots.evaluation_spectra(summary.power_spectrum, split)
        plots.save_figure(figure, out_dir / POWER_SPECTRUM)
    return summary


def _draw_best_and_worst(
    vqvae: TrainedVQVAE, slices: SliceSet, result: SplitEvaluation, out_dir: Path
) -> None:
    """The examples' archive, and the best and worst slice beside its error map."""
    seed = vqvae.config.train.seed
    examples = write_examples(vqvae.model, slices, result, out_dir / EXAMPLES_FILE, seed=seed)
    for label, file_name in (("best", BEST_IMAGE), ("worst", WORST_IMAGE)):
        index = examples.rows_of(label)[0]
        plots.pair_with_error(
            examples.images[index].astype(np.float32),
            examples.reconstructions[index].astype(np.float32),
            out_dir / file_name,
            title=f"{label}: {examples.names[index]} (SSIM {examples.ssim[index]:.4f}, "
            f"PSNR {examples.psnr[index]:.2f} dB)",
        )


@torch.no_grad()
def _draw_random_reconstructions(
    vqvae: TrainedVQVAE, slices: SliceSet, summary: EvaluationSummary, out_dir: Path
) -> None:
    """Random slices over their reconstructions, and over their textured reconstructions
    where the VQ-VAE has a texture."""
    seed, split = vqvae.config.train.seed, summary.split
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(slices), generator=generator)[:SHOWN]
    images = slices.batch(chosen.sort().values).to(vqvae.device)
    reconstructions = vqvae.model(images).reconstruction.clamp(-1, 1)
    plots.reconstruction_grid(
        images.cpu().numpy(),
        reconstructions.cpu().numpy(),
        out_dir / RANDOM_RECONSTRUCTIONS,
        title=f"{len(chosen)} random {split} images (mean SSIM over the split "
        f"{summary.ssim_mean:.4f})",
    )
    if vqvae.texture is None:
        return
    textured = vqvae.texture.sample(reconstructions, texture_generator(seed, "evaluation"))
    plots.reconstruction_grid(
        images.cpu().numpy(),
        textured.numpy(),
        out_dir / TEXTURED_RECONSTRUCTIONS,
        title=f"the same {len(chosen)} {split} images over their reconstructions with a "
        "draw of the acquisition texture",
    )
