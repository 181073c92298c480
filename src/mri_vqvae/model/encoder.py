"""Images to features at ``2**levels`` times lower resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.model.layers import ResidualStack, ResnetBlock, downsample, group_norm


class Encoder(nn.Module):
    """``(B, C, H, W)`` images to ``(B, widths[-1], H / 2**n, W / 2**n)`` features.

    Per level a stride-2 downsampling and ``num_blocks`` residual blocks at that level's
    width, then GroupNorm and SiLU. Nothing runs at full resolution: on a CPU a full-size
    feature map costs more than all the coarser levels together.
    """

    def __init__(self, in_channels: int, widths: list[int], num_blocks: int) -> None:
        super().__init__()
        levels: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            blocks = [ResnetBlock(width, width) for _ in range(num_blocks)]
            levels.append(nn.Sequential(downsample(channels, width), *blocks))
            channels = width
        self.levels = nn.Sequential(*levels)
        self.norm_out = group_norm(channels)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm_out(self.levels(images)))


class SeedEncoder(nn.Module):
    """The seed's: strided 4x4 convs with ReLU, a 3x3 conv, then a ReLU residual stack."""

    def __init__(
        self,
        in_channels: int,
        widths: list[int],
        num_residual_layers: int,
        residual_hidden_channels: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [downsample(channels, width), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, channels, kernel_size=3, padding=1))
        self.convs = nn.Sequential(*layers)
        self.residual_stack = ResidualStack(channels, residual_hidden_channels, num_residual_layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.residual_stack(self.convs(images))
