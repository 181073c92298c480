"""A PatchGAN discriminator for 1-channel slices (Isola et al. 2017, as in VQGAN, Esser et al.
2021): a stack of strided 4x4 convolutions whose output is a map of real/fake logits, one per
overlapping patch, so it judges texture rather than the whole slice.

GroupNorm instead of the original batch norm: its statistics are each image's own, so DDP ranks
need not share batch statistics, and it is stable in bfloat16.
"""

from __future__ import annotations

import torch
from torch import nn

from mri_vqvae.model.layers import group_norm


class PatchDiscriminator(nn.Module):
    """``(B, C, H, W)`` images to ``(B, 1, h, w)`` patch logits (higher: more like a real slice).

    Args:
        in_channels: image channels (1 for MRI slices).
        channels: the first layer's width; each further strided layer doubles it (up to 8x).
        num_layers: strided (halving) convolutions after the first; each patch logit sees a
            receptive field of 70 pixels with 3, 34 with 2.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or num_layers < 1:
            raise ValueError(
                f"the discriminator needs channels >= 1 and num_layers >= 1, got {channels} and "
                f"{num_layers}"
            )
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for index in range(1, num_layers + 1):
            # The last of these keeps the resolution, as PatchGAN's does.
            stride = 2 if index < num_layers else 1
            wider = channels * min(2**index, 8)
            layers += [
                nn.Conv2d(width, wider, kernel_size=4, stride=stride, padding=1, bias=False),
                group_norm(wider),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = wider
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        return self.layers(images)


def _init_weights(module: nn.Module) -> None:
    # The DCGAN initialisation PatchGAN uses: small normal weights, norms at unit scale.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
