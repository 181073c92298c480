"""Images to latents: strided convolutions, then a residual stack."""

from __future__ import annotations

import torch
from torch import nn

from mri_vqvae.model.layers import ResidualStack, downsample, level_channels


class Encoder(nn.Module):
    """``(B, C, H, W)`` images to ``(B, hidden, H / 2**n, W / 2**n)`` features."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_downsamplings: int,
        num_residual_layers: int,
        residual_hidden_channels: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in level_channels(hidden_channels, num_downsamplings):
            layers += [downsample(channels, out_channels), nn.ReLU()]
            channels = out_channels
        layers.append(nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1))
        self.convs = nn.Sequential(*layers)
        self.residual_stack = ResidualStack(
            hidden_channels, residual_hidden_channels, num_residual_layers
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.residual_stack(self.convs(images))
