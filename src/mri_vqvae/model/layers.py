"""Building blocks of the encoders and decoders.

Two families: the seed's (van den Oord et al. 2017: strided 4x4 convolutions, ReLU residual
layers of a narrow width) and pre-activation residual blocks with GroupNorm and SiLU (He et al.
2016; the form used by Esser et al. 2021's VQGAN), which train faster and more stably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualLayer(nn.Module):
    """The seed's: ReLU, 3x3 conv to a narrow width, ReLU, 1x1 conv back, added to the input."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        # Only ReLUs that follow a convolution run in place: a convolution's backward pass
        # does not need its output, and reusing the buffer saves a pass over memory. The
        # first ReLU must not overwrite x, which the skip connection adds back.
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    """The seed's: ``num_layers`` residual layers followed by a ReLU."""

    def __init__(self, channels: int, hidden_channels: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[ResidualLayer(channels, hidden_channels) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.layers(x))  # in place: the sum is not needed again


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels where the width allows."""
    fitting = [g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 4]
    groups = fitting[0] if fitting else 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, added to the input (1x1-projected if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def downsample(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 4x4 stride-2 convolution: halves height and width."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


def upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    """A 4x4 stride-2 transposed convolution: doubles height and width."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


def level_widths(channels: int, channel_multipliers: tuple[int, ...]) -> list[int]:
    """Channels at each resolution level, finest first."""
    return [channels * multiplier for multiplier in channel_multipliers]
