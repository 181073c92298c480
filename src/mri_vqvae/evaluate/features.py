"""Two feature spaces for comparing sets of slices, neither needing a download.

- A random-weight CNN, its weights drawn from a fixed seed, so every run and machine uses the
  same network. Random convolutions with ReLU already describe texture well (Ustyuzhaninov et
  al. 2017); the coarse spatial read-out of its last stage adds layout.
- A small convolutional autoencoder trained for a fixed number of steps on the training slices
  themselves, so its features are tuned to this anatomy's structure.

Both read out the same way (:func:`read_out`): per-channel mean and standard deviation of every
stage (texture statistics) and a 4x2 average of the last stage (where things are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.protocol import SampleProtocol

# Slices are tall (left-right by anterior-posterior): a 4x2 grid keeps cells about square.
LAYOUT_GRID = (4, 2)
# Images per forward pass when extracting features: large enough to keep the convolutions
# efficient, small enough that the first stage's activations stay in cache-sized chunks.
FEATURE_BATCH = 64


def _stages(widths: tuple[int, ...], kernel: int) -> nn.ModuleList:
    """Stride-2 convolutions with ReLU, one per width."""
    stages, channels_in = [], 1
    for width in widths:
        stages.append(
            nn.Sequential(nn.Conv2d(channels_in, width, kernel, 2, kernel // 2), nn.ReLU())
        )
        channels_in = width
    return nn.ModuleList(stages)


def read_out(activations: list[torch.Tensor]) -> torch.Tensor:
    """``(N, F)`` features: each stage's per-channel mean and std, and the last stage averaged
    over a coarse grid."""
    parts = []
    for stage in activations:
        flat = stage.flatten(2)
        parts += [flat.mean(2), flat.std(2, correction=0)]
    parts.append(F.adaptive_avg_pool2d(activations[-1], LAYOUT_GRID).flatten(1))
    return torch.cat(parts, dim=1)


class _StagedNet(nn.Module):
    """A network whose features are the outputs of its stride-2 ``stages``."""

    stages: nn.ModuleList

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage."""
        outputs = []
        for stage in self.stages:
            images = stage(images)
            outputs.append(images)
        return outputs


class RandomFeatureNet(_StagedNet):
    """Stride-2 3x3 convolutions with He-normal weights drawn from ``seed`` and zero biases."""

    def __init__(self, widths: tuple[int, ...], seed: int) -> None:
        super().__init__()
        self.stages = _stages(widths, kernel=3)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for stage in self.stages:
                conv = stage[0]
                fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
                )
                conv.bias.zero_()


class SliceAutoencoder(_StagedNet):
    """A small convolutional autoencoder: stride-2 encoder stages, a mirrored decoder."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = _stages(widths, kernel=3)
        decoder: list[nn.Module] = []
        for width, width_out in zip(widths[::-1], (*widths[-2::-1], 1), strict=True):
            decoder += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width_out, 3, padding=1)]
            decoder.append(nn.ReLU() if width_out != 1 else nn.Tanh())
        self.decoder = nn.Sequential(*decoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(self.activations(images)[-1])
        # Sides not divisible by 2**stages come back a little short; match the input's size.
        return F.interpolate(decoded, size=images.shape[-2:], mode="bilinear")


def _pooled(images: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(images.float(), factor) if factor > 1 else images.float()


def train_autoencoder(images: torch.Tensor, protocol: SampleProtocol) -> SliceAutoencoder:
    """An autoencoder fitted to ``images`` ``(N, 1, H, W)`` for the protocol's fixed steps."""
    torch.manual_seed(protocol.autoencoder_seed)
    model = SliceAutoencoder(protocol.autoencoder_widths)
    optimizer = torch.optim.Adam(model.parameters(), lr=protocol.autoencoder_learning_rate)
    generator = torch.Generator().manual_seed(protocol.autoencoder_seed)
    pooled = _pooled(images, protocol.autoencoder_pool)
    size = min(protocol.autoencoder_batch_size, len(pooled))
    for _ in range(protocol.autoencoder_steps):
        batch = pooled[torch.randint(len(pooled), (size,), generator=generator)]
        loss = F.mse_loss(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def extract_features(
    network: RandomFeatureNet | SliceAutoencoder, images: torch.Tensor, pool: int = 1
) -> torch.Tensor:
    """``(N, F)`` float64 features of ``images`` (pooled by ``pool`` first), in batches."""
    network.eval()
    parts = [
        read_out(network.activations(_pooled(chunk, pool))).double()
        for chunk in images.split(FEATURE_BATCH)
    ]
    return torch.cat(parts)


class FeatureSpaces:
    """Both feature spaces of one evaluation: the random network and an autoencoder fitted to
    ``train_images``."""

    def __init__(self, train_images: torch.Tensor, protocol: SampleProtocol) -> None:
        self.protocol = protocol
        self.random = RandomFeatureNet(
            protocol.random_features_widths, protocol.random_features_seed
        )
        self.autoencoder = train_autoencoder(train_images, protocol)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"random_cnn": (N, F1), "autoencoder": (N, F2)}`` features of ``images``."""
        return {
            "random_cnn": extract_features(self.random, images),
            "autoencoder": extract_features(
                self.autoencoder, images, self.protocol.autoencoder_pool
            ),
        }
