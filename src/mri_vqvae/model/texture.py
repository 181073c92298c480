"""The acquisition texture a decoder smooths away, as a stochastic observation model.

A decoder trained on pixel losses draws the conditional mean of a slice given its codes: the
acquisition noise and the finest detail, which the codes do not determine, average out, so a
decoded slice is smoother than any acquired one (its power spectrum falls below the real
slices' at high frequencies, and a classifier tells it from them by that alone). Restoring that
texture inside the decoder costs the distortion measures by construction: independent noise of
the right power doubles the squared error where it is added (the perception-distortion
trade-off, Blau & Michaeli 2018). So the mean stays the reconstruction, and this model adds the
texture as a separate, optional draw: ``p(x | codes) = mean + residual``.

:class:`ResidualTexture` is fitted to the residuals ``real - reconstruction`` of training
slices, with no assumption about the scanner's noise:

- **the distribution at each intensity**: the residual's quantiles in bins of the
  reconstructed intensity, so a magnitude image's Rician floor in the background, the larger
  spread in tissue and any bias of the decoder are each where they belong;
- **the spatial correlation**: the mean 2D power spectrum the reconstructions lack against
  the real slices (the real slices' minus the reconstructions', where positive), so the
  textured slices have the real slices' spectrum; noise left white by the scanner stays white,
  and noise coloured by filtering or resampling keeps its colour and direction. Only that
  deficit's share of the residual's power is drawn: the rest of the residual is structure the
  decoder drew slightly out of place, whose power the reconstruction already carries.

A draw filters white Gaussian noise by the spectrum's square root, maps it through the
normal CDF to a uniform field and reads the residual at that level from the quantiles of the
pixel's intensity (a Gaussian copula), blending the two nearest bins' quantiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Most pixels per bin whose residual quantiles are computed (torch.quantile's input limit is
# 16M; a quarter of a million random pixels fix 129 quantiles more finely than they are used).
_PIXELS_PER_BIN = 250_000
# Slices drawn together: bounds the memory of a draw for thousands of samples.
_SLICES_PER_DRAW = 64


@dataclass(frozen=True)
class ResidualTexture:
    """Residual quantiles ``(bins, levels)`` at probabilities ``levels`` for the
    reconstructed intensities ``bin_centres (bins,)`` (narrowed about each bin's median to the
    power the reconstructions lack), and the square root of that lacking power spectrum
    ``amplitude (H, W // 2 + 1)`` (an ``rfft2`` half-plane) for slices of ``image_size``;
    fitted on ``fitted_slices`` slices."""

    bin_centres: torch.Tensor
    levels: torch.Tensor
    quantiles: torch.Tensor
    amplitude: torch.Tensor
    image_size: tuple[int, int]
    fitted_slices: int

    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        bins: int = 16,
        levels: int = 129,
        seed: int = 0,
    ) -> ResidualTexture:
        """Fit to real ``images`` and their ``reconstructions``, both ``(N, 1, H, W)`` in
        the model's [-1, 1] range."""
        if images.shape != reconstructions.shape or images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(
                "images and reconstructions must both be (N, 1, H, W), got "
                f"{tuple(images.shape)} and {tuple(reconstructions.shape)}"
            )
        if bins < 1 or levels < 3 or levels % 2 == 0:
            raise ValueError(f"need bins >= 1 and an odd levels >= 3, got {bins} and {levels}")
        generator = torch.Generator().manual_seed(seed)
        mean = reconstructions.float().clamp(-1, 1)
        residual = images.float() - mean
        flat_mean, flat_residual = mean.flatten(), residual.flatten()
        edges = _bin_edges(flat_mean, bins, generator)
        which = torch.bucketize(flat_mean, edges[1:-1])
        probabilities = torch.linspace(0.5 / levels, 1 - 0.5 / levels, levels)
        centres, quantiles = [], []
        for b in range(len(edges) - 1):
            chosen = which == b
            if not chosen.any():
                continue
            values = _at_most(flat_residual[chosen], _PIXELS_PER_BIN, generator)
            centres.append(_at_most(flat_mean[chosen], _PIXELS_PER_BIN, generator).median())
            quantiles.append(torch.quantile(values, probabilities))
        deficit, share = _power_deficit(images.float(), mean, residual)
        # The residual also holds what the decoder drew in the wrong place (an edge a pixel
        # off), whose power the reconstruction already has: only the share of the residual's
        # power that the reconstructions lack is drawn, about each bin's median.
        table = torch.stack(quantiles)
        middle = table[:, levels // 2 : levels // 2 + 1]
        return cls(
            bin_centres=torch.stack(centres),
            levels=probabilities,
            quantiles=middle + share**0.5 * (table - middle),
            amplitude=deficit.sqrt(),
            image_size=(int(images.shape[-2]), int(images.shape[-1])),
            fitted_slices=int(images.shape[0]),
        )

    def residual_field(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Gaussian fields ``shape = (N, 1, H, W)`` with the residual's spatial correlation,
        each standardised to mean 0 and standard deviation 1."""
        white = torch.randn(shape, generator=generator)
        coloured = torch.fft.irfft2(torch.fft.rfft2(white) * self.amplitude, s=shape[-2:])
        centred = coloured - coloured.mean(dim=(-2, -1), keepdim=True)
        return centred / centred.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)

    def sample(
        self, reconstructions: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``reconstructions (N, 1, H, W)`` in [-1, 1] with a draw of the texture added,
        clamped to [-1, 1]; on the CPU (``generator`` is a CPU generator)."""
        if tuple(reconstructions.shape[-2:]) != self.image_size:
            raise ValueError(
                f"this texture was fitted to {self.image_size[0]}x{self.image_size[1]} "
                f"slices, got {tuple(reconstructions.shape[-2:])}"
            )
        mean = reconstructions.detach().float().cpu().clamp(-1, 1)
        # A few dozen slices at a time: each pixel's draw needs several temporaries.
        return torch.cat([self._draw(part, generator) for part in mean.split(_SLICES_PER_DRAW)])

    def _draw(self, mean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        field = self.residual_field(tuple(mean.shape), generator)
        uniform = 0.5 * (1 + torch.erf(field / math.sqrt(2)))
        residual = self._residual_at(mean.flatten(), uniform.flatten()).reshape(mean.shape)
        return (mean + residual).clamp(-1, 1)

    def _residual_at(self, mean: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The residual at level ``uniform`` for reconstructed intensity ``mean`` (both
        flat): each quantile function read linearly, then the two nearest bins' blended."""
        count = len(self.levels)
        position = (uniform - self.levels[0]) / (self.levels[-1] - self.levels[0]) * (count - 1)
        position = position.clamp(0, count - 1)
        # levels is odd and at least 3 (fit checks), so low_level + 1 is a level too.
        low_level = position.floor().long().clamp(max=count - 2)
        level_weight = position - low_level

        flat_table = self.quantiles.reshape(-1)
        high_level = low_level + 1

        def read(bin_index: torch.Tensor) -> torch.Tensor:
            # Two values per pixel from the flat table, never a (pixels, levels) copy.
            low = flat_table[bin_index * count + low_level]
            high = flat_table[bin_index * count + high_level]
            return low + (high - low) * level_weight

        centres = self.bin_centres
        if len(centres) == 1:
            return read(torch.zeros_like(low_level))
        upper = torch.bucketize(mean, centres).clamp(1, len(centres) - 1)
        lower = upper - 1
        span = (centres[upper] - centres[lower]).clamp_min(1e-12)
        weight = ((mean - centres[lower]) / span).clamp(0, 1)
        return read(lower) * (1 - weight) + read(upper) * weight

    def to_plain(self) -> dict[str, Any]:
        """Tensors and plain values, for a checkpoint's extras."""
        return {
            "bin_centres": self.bin_centres,
            "levels": self.levels,
            "quantiles": self.quantiles,
            "amplitude": self.amplitude,
            "image_size": list(self.image_size),
            "fitted_slices": self.fitted_slices,
        }

    @classmethod
    def from_plain(cls, values: dict[str, Any]) -> ResidualTexture:
        """Undo :meth:`to_plain`; ``ValueError`` when the parts do not fit together."""
        texture = cls(
            bin_centres=values["bin_centres"].float(),
            levels=values["levels"].float(),
            quantiles=values["quantiles"].float(),
            amplitude=values["amplitude"].float(),
            image_size=(int(values["image_size"][0]), int(values["image_size"][1])),
            fitted_slices=int(values["fitted_slices"]),
        )
        height, width = texture.image_size
        expected = {
            "quantiles": (len(texture.bin_centres), len(texture.levels)),
            "amplitude": (height, width // 2 + 1),
        }
        for name, shape in expected.items():
            if tuple(getattr(texture, name).shape) != shape:
                raise ValueError(f"{name} is {tuple(getattr(texture, name).shape)}, not {shape}")
        return texture


# Offsets that give each use of the texture its own random stream from a user's seed, so that
# samples and the references they are scored against never share a noise field (seed 0 for
# both would otherwise draw identical fields, and flatter every comparison).
_STREAMS = {
    "samples": 1_000_003,
    "held_out": 2_000_003,
    "train": 3_000_017,
    "evaluation": 4_000_037,
}


def texture_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for drawing textures for ``stream`` (samples, held_out, train or
    evaluation) from ``seed``."""
    return torch.Generator().manual_seed(seed + _STREAMS[stream])


def _power_deficit(
    images: torch.Tensor, reconstructions: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The mean power spectrum (an ``rfft2`` half-plane, without the mean) that the
    reconstructions lack against the real slices, never negative, and its total as a share of
    the residual's (at most 1)."""

    def power(fields: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft2(fields[:, 0]).abs().square().mean(0)
        spectrum[0, 0] = 0  # each slice's mean offset is the bins' business
        return spectrum

    deficit = (power(images) - power(reconstructions)).clamp_min(0)
    residual_power = power(residual)
    # Parseval on a half-plane: the columns between 0 and Nyquist stand for two each.
    width = images.shape[-1]
    counted = torch.full((deficit.shape[-1],), 2.0)
    counted[0] = 1
    if width % 2 == 0:
        counted[-1] = 1
    total = float((residual_power * counted).sum())
    share = min(1.0, float((deficit * counted).sum()) / total) if total > 0 else 0.0
    return deficit, share


def _at_most(values: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    if len(values) <= count:
        return values
    return values[torch.randint(len(values), (count,), generator=generator)]


def _bin_edges(values: torch.Tensor, bins: int, generator: torch.Generator) -> torch.Tensor:
    """Edges of up to ``bins`` bins holding equal shares of ``values`` (fewer where many values
    are equal, as in a flat background), from -inf to inf."""
    sample = _at_most(values, 4 * _PIXELS_PER_BIN, generator)
    inner = torch.quantile(sample, torch.linspace(0, 1, bins + 1)[1:-1]).unique()
    infinity = torch.tensor([math.inf])
    return torch.cat([-infinity, inner, infinity])
