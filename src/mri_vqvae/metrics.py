"""Image and codebook metrics on tensors.

SSIM follows Wang et al. 2004 as almost everyone reports it: images mapped to [0, 1],
``data_range`` 1, an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over
the window positions that lie wholly inside the image. It is computed by ``pytorch_msssim`` and
matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ssim as _ssim


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def ssim_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of ``(B, 1, H, W)`` images given in the model's [-1, 1] range."""
    if images.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reconstructions.shape)}")
    if min(images.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs sides of at least 11 pixels, got {tuple(images.shape[-2:])}")
    return _ssim(
        _unit(images),
        _unit(reconstructions),
        data_range=1.0,
        size_average=False,
        win_size=11,
        win_sigma=1.5,
    )


def psnr_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair, on [0, 1] (peak 1); identical images give infinity."""
    mse = (_unit(images) - _unit(reconstructions)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 when one code is used, K when K are used evenly."""
    probabilities = counts.float() / counts.sum().clamp_min(1)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
    return torch.exp(entropy)


def codebook_usage(counts: torch.Tensor) -> float:
    """Share of the codebook's codes used at least once in a histogram of ``K`` counts."""
    return float((counts > 0).float().mean())
