"""Quantized latents to images, mirroring the encoders."""

from __future__ import annotations

import torch
from torch import nn

from mri_vqvae.model.layers import ResidualStack, ResnetBlock, group_norm, upsample


class Decoder(nn.Module):
    """``(B, D, h, w)`` quantized latents to ``(B, C, h * 2**n, w * 2**n)`` images.

    A 3x3 conv to the coarsest width, then per level (coarse to fine) ``num_blocks`` residual
    blocks and a stride-2 transposed-conv upsampling to the next finer width; the finest
    level ends with GroupNorm, SiLU and the upsampling to the image channels. The output is
    unbounded; the VQ-VAE bounds it.
    """

    def __init__(
        self, embedding_dim: int, widths: list[int], out_channels: int, num_blocks: int
    ) -> None:
        super().__init__()
        coarse_to_fine = widths[::-1]
        self.conv_in = nn.Conv2d(embedding_dim, coarse_to_fine[0], kernel_size=3, padding=1)
        levels: list[nn.Module] = []
        for index, width in enumerate(coarse_to_fine):
            layers: list[nn.Module] = [ResnetBlock(width, width) for _ in range(num_blocks)]
            if index + 1 < len(coarse_to_fine):
                layers.append(upsample(width, coarse_to_fine[index + 1]))
            else:
                layers += [group_norm(width), nn.SiLU(), upsample(width, out_channels)]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.Sequential(*levels)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.levels(self.conv_in(quantized))


class SeedDecoder(nn.Module):
    """The seed's: a 3x3 conv, a ReLU residual stack, then strided 4x4 transposed convs."""

    def __init__(
        self,
        embedding_dim: int,
        widths: list[int],
        out_channels: int,
        num_residual_layers: int,
        residual_hidden_channels: int,
    ) -> None:
        super().__init__()
        hidden = widths[-1]
        self.conv_in = nn.Conv2d(embedding_dim, hidden, kernel_size=3, padding=1)
        self.residual_stack = ResidualStack(hidden, residual_hidden_channels, num_residual_layers)
        # Mirror of the encoder: widths from coarse to fine, ending at the image channels.
        targets = [*widths[::-1][1:], out_channels]
        layers: list[nn.Module] = []
        channels = hidden
        for index, width in enumerate(targets):
            layers.append(upsample(channels, width))
            if index < len(targets) - 1:
                layers.append(nn.ReLU(inplace=True))
            channels = width
        self.upsamplings = nn.Sequential(*layers)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.upsamplings(self.residual_stack(self.conv_in(quantized)))
