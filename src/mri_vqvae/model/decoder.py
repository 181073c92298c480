"""Quantized latents to images: a 3x3 conv, a residual stack, then transposed convolutions."""

from __future__ import annotations

import torch
from torch import nn

from mri_vqvae.model.layers import ResidualStack, level_channels, upsample


class Decoder(nn.Module):
    """``(B, D, h, w)`` quantized latents to ``(B, C, h * 2**n, w * 2**n)`` images.

    The output is unbounded, as the seed's; callers clamp to [-1, 1] when scoring.
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden_channels: int,
        out_channels: int,
        num_upsamplings: int,
        num_residual_layers: int,
        residual_hidden_channels: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(embedding_dim, hidden_channels, kernel_size=3, padding=1)
        self.residual_stack = ResidualStack(
            hidden_channels, residual_hidden_channels, num_residual_layers
        )
        # Mirror of the encoder: widths from coarse to fine, ending at the image channels.
        widths = [*level_channels(hidden_channels, num_upsamplings)[::-1][1:], out_channels]
        layers: list[nn.Module] = []
        channels = hidden_channels
        for index, width in enumerate(widths):
            layers.append(upsample(channels, width))
            if index < len(widths) - 1:
                layers.append(nn.ReLU())
            channels = width
        self.upsamplings = nn.Sequential(*layers)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.upsamplings(self.residual_stack(self.conv_in(quantized)))
