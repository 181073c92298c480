"""Building blocks of the seed's encoder and decoder (after van den Oord et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualLayer(nn.Module):
    """ReLU, 3x3 conv to a narrow width, ReLU, 1x1 conv back, added to the input."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    """``num_layers`` residual layers followed by a ReLU."""

    def __init__(self, channels: int, hidden_channels: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[ResidualLayer(channels, hidden_channels) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layers(x))


def downsample(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 4x4 stride-2 convolution: halves height and width."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


def upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """A 4x4 stride-2 transposed convolution: doubles height and width."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


def level_channels(hidden_channels: int, num_levels: int) -> list[int]:
    """Channels after each resolution level, as the seed: half width at the finest level."""
    if num_levels == 1:
        return [hidden_channels]
    return [hidden_channels // 2] + [hidden_channels] * (num_levels - 1)
