"""Per-image reconstruction metrics on a split, their summary and figures; reconstructing a file."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mri_vqvae import plots
from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import SliceSet, postprocess, preprocess
from mri_vqvae.data.nifti import read_slice, write_slice
from mri_vqvae.metrics import (
    codebook_usage,
    foreground_ssim_psnr,
    perplexity,
    psnr_per_image,
    ssim_per_image,
    ssim_seed_protocol,
)
from mri_vqvae.model import VQVAE

SSIM_PROTOCOLS = {
    "ssim": "Wang et al. 2004 on [0, 1], data range 1, 11x11 Gaussian window (sigma 1.5); "
    "reconstructions clamped to the image range",
    "foreground": "the same SSIM map and PSNR averaged inside the anatomy only (pixels above "
    "10% of the slice's range, closed and hole-filled)",
    "ssim_seed_protocol": "the seed's protocol, for comparison with its published 0.799 only: "
    "on [-1, 1], data range from each unclamped reconstruction, 7x7 uniform window, sample "
    "covariance (scikit-image defaults), at this run's image size",
}


@dataclass
class SplitEvaluation:
    """Per-image scores on a split, and its code histogram."""

    names: list[str]
    ssim: np.ndarray
    psnr: np.ndarray
    foreground_ssim: np.ndarray
    foreground_psnr: np.ndarray
    ssim_seed_protocol: np.ndarray
    code_counts: torch.Tensor

    def per_image(self) -> dict[str, np.ndarray]:
        """The per-image columns of ``per_image_metrics.csv``."""
        return {
            "ssim": self.ssim,
            "psnr": self.psnr,
            "foreground_ssim": self.foreground_ssim,
            "foreground_psnr": self.foreground_psnr,
            "ssim_seed_protocol": self.ssim_seed_protocol,
        }

    def summary(self) -> dict:
        """The figures of ``metrics.json``."""
        best, worst = int(self.ssim.argmax()), int(self.ssim.argmin())
        summary: dict = {"n_images": len(self.names)}
        for name, values in self.per_image().items():
            # NaN marks an image without foreground; it is left out of the foreground figures.
            finite = values[~np.isnan(values)]
            summary[f"{name}_mean"] = float(finite.mean()) if finite.size else float("nan")
            summary[f"{name}_min"] = float(finite.min()) if finite.size else float("nan")
            if name == "ssim":
                summary["ssim_std"] = float(self.ssim.std())
                summary["ssim_max"] = float(self.ssim.max())
        summary["images_without_foreground"] = int(np.isnan(self.foreground_ssim).sum())
        summary["codebook_usage"] = codebook_usage(self.code_counts)
        summary["codes_used"] = int((self.code_counts > 0).sum())
        summary["perplexity"] = float(perplexity(self.code_counts))
        summary["best_image"] = self.names[best]
        summary["worst_image"] = self.names[worst]
        summary["protocols"] = SSIM_PROTOCOLS
        return summary


@torch.no_grad()
def reconstruct_batches(model: VQVAE, slices: SliceSet, batch_size: int, device: torch.device):
    """Yield ``(start, images, output)`` over a split, in eval mode."""
    model.eval()
    for start in range(0, len(slices), batch_size):
        images = slices.batch(slice(start, start + batch_size)).to(device)
        yield start, images, model(images)


def evaluate_split(
    model: VQVAE, slices: SliceSet, batch_size: int, device: torch.device
) -> SplitEvaluation:
    """SSIM and PSNR of every image's reconstruction (clamped to the image range), and code use."""
    columns: dict[str, list[torch.Tensor]] = {
        "ssim": [],
        "psnr": [],
        "foreground_ssim": [],
        "foreground_psnr": [],
        "ssim_seed_protocol": [],
    }
    counts = torch.zeros(model.num_embeddings, dtype=torch.long)
    for _, images, output in reconstruct_batches(model, slices, batch_size, device):
        reconstruction = output.reconstruction.clamp(-1, 1)
        foreground_ssim, foreground_psnr = foreground_ssim_psnr(images, reconstruction)
        scores = {
            "ssim": ssim_per_image(images, reconstruction),
            "psnr": psnr_per_image(images, reconstruction),
            "foreground_ssim": foreground_ssim,
            "foreground_psnr": foreground_psnr,
            "ssim_seed_protocol": ssim_seed_protocol(images, output.reconstruction),
        }
        for name, values in scores.items():
            columns[name].append(values.cpu())
        counts += torch.bincount(output.indices.flatten().cpu(), minlength=model.num_embeddings)
    arrays = {name: torch.cat(values).double().numpy() for name, values in columns.items()}
    return SplitEvaluation(names=list(slices.names), code_counts=counts, **arrays)


def write_evaluation(
    model: VQVAE,
    slices: SliceSet,
    out_dir: str | Path,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Evaluate a split and write ``per_image_metrics.csv``, ``metrics.json`` and the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_split(model, slices, batch_size, device)
    summary = result.summary()
    with open(out_dir / "per_image_metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = result.per_image()
        writer.writerow(["file", *columns])
        for index, name in enumerate(result.names):
            writer.writerow([name, *(f"{values[index]:.6f}" for values in columns.values())])
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    plots.ssim_scores(result.ssim, out_dir / "ssim_scores_test_set.png")
    model.eval()
    with torch.no_grad():
        for label, index in (("best", result.ssim.argmax()), ("worst", result.ssim.argmin())):
            image = slices.batch([int(index)]).to(device)
            reconstruction = model(image).reconstruction.clamp(-1, 1)
            plots.pair_with_error(
                image[0].cpu().numpy(),
                reconstruction[0].cpu().numpy(),
                out_dir / f"{label}_image.png",
                title=f"{label}: {result.names[index]} (SSIM {result.ssim[index]:.4f}, "
                f"PSNR {result.psnr[index]:.2f} dB)",
            )
        chosen = torch.randperm(len(slices), generator=torch.Generator().manual_seed(seed))[:8]
        images = slices.batch(chosen.sort().values).to(device)
        reconstructions = model(images).reconstruction.clamp(-1, 1)
        plots.reconstruction_grid(
            images.cpu().numpy(),
            reconstructions.cpu().numpy(),
            out_dir / "reconstructed_images.png",
            title=f"{len(chosen)} random test images (mean SSIM over the split "
            f"{summary['ssim_mean']:.4f})",
        )
    return summary


@torch.no_grad()
def reconstruct_file(
    model: VQVAE,
    in_path: str | Path,
    out_path: str | Path,
    data_config: DataConfig,
    device: torch.device,
) -> Path:
    """Reconstruct one NIfTI slice; the output has the input's shape, intensity range,
    affine and header."""
    source = read_slice(in_path)
    size = data_config.image_size or source.pixels.shape
    image = preprocess(source.pixels, size)[None].to(device)
    model.eval()
    reconstruction = model(image).reconstruction.clamp(-1, 1)[0]
    low, high = float(source.pixels.min()), float(source.pixels.max())
    pixels = postprocess(reconstruction, source.pixels.shape, low, high)
    original_shape = tuple(int(s) for s in source.header.get_data_shape())
    write_slice(pixels.reshape(original_shape), out_path, source.affine, source.header)
    return Path(out_path)
