"""The VQ-VAE training objective with its named parts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class VQVAELoss(NamedTuple):
    """``total`` = ``reconstruction`` (MSE, as the seed) + ``quantization``."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    quantization: torch.Tensor


def vqvae_loss(
    images: torch.Tensor, reconstructions: torch.Tensor, quantization_loss: torch.Tensor
) -> VQVAELoss:
    """Pixel MSE plus the quantiser's codebook and commitment terms (van den Oord et al., eq. 3)."""
    reconstruction = F.mse_loss(reconstructions.float(), images.float())
    quantization = quantization_loss.float()
    return VQVAELoss(reconstruction + quantization, reconstruction, quantization)
