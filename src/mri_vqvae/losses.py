"""The VQ-VAE training objective with its named parts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

from mri_vqvae.errors import ConfigError
from mri_vqvae.metrics import ssim_map


class VQVAELoss(NamedTuple):
    """``total`` = ``reconstruction`` + ``ssim_weight * structural`` + ``quantization``."""

    total: torch.Tensor
    reconstruction: torch.Tensor  # the pixel loss (MSE or L1)
    quantization: torch.Tensor
    structural: torch.Tensor  # 1 - (MS-)SSIM, zero when that term is off
    # The batch's mean SSIM on [0, 1] (unclamped reconstructions) when the "ssim" term
    # computed it, so a caller logging SSIM need not compute it again; else None.
    ssim: torch.Tensor | None = None


def ms_ssim_window(height: int, width: int) -> int:
    """The largest odd Gaussian window (at most 11) MS-SSIM's five scales allow at this size."""
    for window in (11, 9, 7, 5, 3):
        # pytorch_msssim requires the smaller side to exceed (window - 1) * 2**4.
        if min(height, width) > (window - 1) * 16:
            return window
    raise ConfigError(
        f"MS-SSIM needs image sides over 32 pixels, got {height}x{width}; use the ssim loss"
    )


def structural_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """``1 - SSIM`` (``kind="ssim"``) or ``1 - MS-SSIM`` (``"ms-ssim"``) on [0, 1] images."""
    x = (images.float() + 1) / 2
    y = (reconstructions.float() + 1) / 2
    if kind == "ssim":
        # The same SSIM as pytorch_msssim's (11x11 Gaussian window, sigma 1.5), computed by
        # banded products: a quarter of the time on a CPU, where the library's cost a quarter
        # of a training step.
        return 1 - ssim_map(x, y).mean()
    if kind == "ms-ssim":
        window = ms_ssim_window(*images.shape[-2:])
        return 1 - ms_ssim(x, y, data_range=1.0, win_size=window, win_sigma=1.5)
    raise ValueError(f"structural loss must be 'ssim' or 'ms-ssim', got {kind!r}")


def vqvae_loss(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    quantization_loss: torch.Tensor,
    pixel_loss: str = "mse",
    ssim_loss: str = "none",
    ssim_weight: float = 0.0,
) -> VQVAELoss:
    """Pixel loss plus the quantiser's codebook and commitment terms (van den Oord et al.,
    eq. 3), plus optionally ``ssim_weight * (1 - SSIM)`` (Zhao et al., "Loss Functions for
    Image Restoration with Neural Networks", 2017)."""
    if pixel_loss == "mse":
        reconstruction = F.mse_loss(reconstructions.float(), images.float())
    elif pixel_loss == "l1":
        reconstruction = F.l1_loss(reconstructions.float(), images.float())
    else:
        raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
    quantization = quantization_loss.float()
    if ssim_loss != "none" and ssim_weight > 0:
        structural = structural_loss(images, reconstructions, ssim_loss)
    else:
        structural = torch.zeros((), device=images.device)
    total = reconstruction + ssim_weight * structural + quantization
    mean_ssim = (1 - structural).detach() if ssim_loss == "ssim" and ssim_weight > 0 else None
    return VQVAELoss(total, reconstruction, quantization, structural, mean_ssim)
