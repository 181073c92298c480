"""A split's reconstructions scored image by image: SSIM and PSNR (whole slice, inside the
anatomy, and under the seed's protocol), code use, and the features and spectra that tell
reconstructions from real slices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.evaluate.features import RandomFeatureNet, extract_features
from mri_vqvae.metrics import (
    codebook_usage,
    foreground_ssim_psnr,
    perplexity,
    psnr_per_image,
    radial_power_spectrum,
    ssim_per_image,
    ssim_seed_protocol,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.model.texture import ResidualTexture, texture_generator
from mri_vqvae.protocol import SampleProtocol
from mri_vqvae.records.evaluation import EvaluationSummary, RealismSummary

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
    code_maps: torch.Tensor  # (N, h, w) code indices, on the CPU
    # Random-CNN features (N, F) of the real slices and of their reconstructions, for the
    # two-sample test between them, and both sets' radially averaged power spectra.
    real_features: torch.Tensor
    reconstruction_features: torch.Tensor
    frequencies: np.ndarray
    real_power: np.ndarray
    reconstruction_power: np.ndarray
    # The same for the reconstructions with a draw of the acquisition texture added, and their
    # mean SSIM and PSNR against the real slices; None without a texture.
    textured_features: torch.Tensor | None = None
    textured_power: np.ndarray | None = None
    textured_ssim_mean: float | None = None
    textured_psnr_mean: float | None = None

    def per_image(self) -> dict[str, np.ndarray]:
        """The per-image columns of ``per_image_metrics.csv``."""
        return {
            "ssim": self.ssim,
            "psnr": self.psnr,
            "foreground_ssim": self.foreground_ssim,
            "foreground_psnr": self.foreground_psnr,
            "ssim_seed_protocol": self.ssim_seed_protocol,
        }

    def summary(self, split: str, realism: RealismSummary | None = None) -> EvaluationSummary:
        """The figures of ``metrics.json``, the split named ``split``."""
        figures: dict[str, float] = {}
        for name, values in self.per_image().items():
            # NaN marks an image without foreground; it is left out of the foreground figures.
            finite = values[~np.isnan(values)]
            figures[f"{name}_mean"] = float(finite.mean()) if finite.size else float("nan")
            figures[f"{name}_min"] = float(finite.min()) if finite.size else float("nan")
        return EvaluationSummary(
            split=split,
            n_images=len(self.names),
            **figures,
            ssim_std=float(self.ssim.std()),
            ssim_max=float(self.ssim.max()),
            images_without_foreground=int(np.isnan(self.foreground_ssim).sum()),
            codebook_usage=codebook_usage(self.code_counts),
            codes_used=int((self.code_counts > 0).sum()),
            perplexity=float(perplexity(self.code_counts)),
            best_image=self.names[int(self.ssim.argmax())],
            worst_image=self.names[int(self.ssim.argmin())],
            protocols=SSIM_PROTOCOLS,
            textured_ssim_mean=self.textured_ssim_mean,
            textured_psnr_mean=self.textured_psnr_mean,
            two_sample=None if realism is None else realism.two_sample,
            power_spectrum=None if realism is None else realism.power_spectrum,
        )


@torch.no_grad()
def reconstruct_batches(model: VQVAE, slices: SliceSet, batch_size: int):
    """Yield ``(start, images, output)`` over a split, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(slices), batch_size):
        images = slices.batch(slice(start, start + batch_size)).to(device)
        yield start, images, model(images)


def evaluate_split(
    model: VQVAE,
    slices: SliceSet,
    *,
    batch_size: int,
    protocol: SampleProtocol,
    texture: ResidualTexture | None = None,
    seed: int = 0,
) -> SplitEvaluation:
    """SSIM and PSNR of every image's reconstruction (clamped to the image range), code use,
    and what tells reconstructions from the real slices: ``protocol``'s random-CNN features
    of both, and both power spectra; with a ``texture``, the same for the reconstructions
    with a draw of it (from ``seed``) added."""
    columns: dict[str, list[torch.Tensor]] = {
        "ssim": [],
        "psnr": [],
        "foreground_ssim": [],
        "foreground_psnr": [],
        "ssim_seed_protocol": [],
    }
    counts = torch.zeros(model.num_embeddings, dtype=torch.long)
    code_maps = []
    device = next(model.parameters()).device
    realism = _RealismTally(protocol, device, texture, seed)
    for _, images, output in reconstruct_batches(model, slices, batch_size):
        reconstruction = output.reconstruction.clamp(-1, 1)
        realism.add(images, reconstruction)
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
        code_maps.append(output.indices.cpu())
    arrays = {name: torch.cat(values).double().numpy() for name, values in columns.items()}
    return SplitEvaluation(
        names=list(slices.names),
        code_counts=counts,
        code_maps=torch.cat(code_maps),
        **realism.results(len(slices)),
        **arrays,
    )


class _RealismTally:
    """Random-CNN features, power spectra and (textured) scores, batch by batch."""

    def __init__(
        self,
        protocol: SampleProtocol,
        device: torch.device,
        texture: ResidualTexture | None,
        seed: int,
    ) -> None:
        self.features = RandomFeatureNet(
            protocol.random_features_widths, protocol.random_features_seed
        ).to(device)
        self.texture = texture
        self.generator = texture_generator(seed, "evaluation")
        names = ("real", "reconstruction") + (("textured",) if texture is not None else ())
        self.vectors: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.power: dict[str, np.ndarray | float] = {name: 0.0 for name in names}
        self.textured_scores: dict[str, list[torch.Tensor]] = {"ssim": [], "psnr": []}
        self.frequencies = np.zeros(0)

    def add(self, images: torch.Tensor, reconstruction: torch.Tensor) -> None:
        batches = {"real": images, "reconstruction": reconstruction}
        if self.texture is not None:
            textured = self.texture.sample(reconstruction, self.generator).to(images.device)
            batches["textured"] = textured
            self.textured_scores["ssim"].append(ssim_per_image(images, textured).cpu())
            self.textured_scores["psnr"].append(psnr_per_image(images, textured).cpu())
        for name, batch in batches.items():
            self.vectors[name].append(extract_features(self.features, batch.float()).cpu())
            self.frequencies, batch_power = radial_power_spectrum(batch.cpu())
            self.power[name] = self.power[name] + batch_power * len(batch)

    def results(self, count: int) -> dict:
        result = {
            "real_features": torch.cat(self.vectors["real"]),
            "reconstruction_features": torch.cat(self.vectors["reconstruction"]),
            "frequencies": self.frequencies,
            "real_power": np.asarray(self.power["real"]) / count,
            "reconstruction_power": np.asarray(self.power["reconstruction"]) / count,
        }
        if self.texture is not None:
            result["textured_features"] = torch.cat(self.vectors["textured"])
            result["textured_power"] = np.asarray(self.power["textured"]) / count
            result["textured_ssim_mean"] = float(torch.cat(self.textured_scores["ssim"]).mean())
            result["textured_psnr_mean"] = float(torch.cat(self.textured_scores["psnr"]).mean())
        return result
