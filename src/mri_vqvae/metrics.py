"""Image and codebook metrics on tensors.

SSIM follows Wang et al. 2004 as almost everyone reports it: images mapped to [0, 1],
``data_range`` 1, an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over
the window positions that lie wholly inside the image. It is computed by ``pytorch_msssim`` and
matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_msssim import ssim as _ssim
from scipy import ndimage


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def ssim_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of ``(B, 1, H, W)`` images given in the model's [-1, 1] range."""
    if images.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reconstructions.shape)}")
    if min(images.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs sides of at least 11 pixels, got {tuple(images.shape[-2:])}")
    return _ssim(
        _unit(images),
        _unit(reconstructions),
        data_range=1.0,
        size_average=False,
        win_size=11,
        win_sigma=1.5,
    )


def psnr_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair, on [0, 1] (peak 1); identical images give infinity."""
    mse = (_unit(images) - _unit(reconstructions)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 when one code is used, K when K are used evenly."""
    probabilities = counts.float() / counts.sum().clamp_min(1)
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
    return torch.exp(entropy)


def codebook_usage(counts: torch.Tensor) -> float:
    """Share of the codebook's codes used at least once in a histogram of ``K`` counts."""
    return float((counts > 0).float().mean())


def _window_1d(size: int, sigma: float | None, device: torch.device) -> torch.Tensor:
    """A normalised 1D window: Gaussian with ``sigma``, or uniform when ``sigma`` is None."""
    if sigma is None:
        window = torch.ones(size, device=device)
    else:
        offsets = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
        window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def _filter_matrix(size: int, window: torch.Tensor) -> torch.Tensor:
    """The ``(size - w + 1, size)`` matrix whose product with a signal of length ``size`` is
    its valid correlation with the length-``w`` ``window``."""
    outputs = size - window.shape[0] + 1
    offsets = (
        torch.arange(size, device=window.device)[None, :]
        - torch.arange(outputs, device=window.device)[:, None]
    )
    inside = (offsets >= 0) & (offsets < window.shape[0])
    return torch.where(inside, window[offsets.clamp(0, window.shape[0] - 1)], 0.0)


def ssim_map(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    data_range: torch.Tensor | float = 1.0,
    win_size: int = 11,
    sigma: float | None = 1.5,
    sample_covariance: bool = False,
) -> torch.Tensor:
    """Local SSIM at every window position inside the image, ``(B, 1, H - w + 1, W - w + 1)``.

    Wang et al. 2004 with K1 = 0.01, K2 = 0.03 on ``(B, 1, H, W)`` inputs taken as they are.
    ``sigma=None`` gives a uniform window; ``data_range`` may be one value per image, ``(B,)``.
    With the defaults its mean over positions equals :func:`ssim_per_image` on [0, 1] inputs.
    Differentiable: the training loss uses it.
    """
    x, y = images.float(), reconstructions.float()
    window = _window_1d(win_size, sigma, x.device)
    # The five local moments are smoothed together, each direction as one product with a
    # banded matrix: on a CPU this is 4x faster, forward and backward, than the depthwise
    # convolutions pytorch_msssim uses, for the same numbers.
    rows = _filter_matrix(x.shape[-2], window)  # (H', H)
    columns = _filter_matrix(x.shape[-1], window).t()  # (W, W')
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mu_x, mu_y, xx, yy, xy = torch.matmul(rows, moments @ columns).unbind(dim=1)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    if sample_covariance:  # skimage's default: unbiased estimates over the window's pixels
        correction = win_size**2 / (win_size**2 - 1)
        var_x, var_y, cov = var_x * correction, var_y * correction, cov * correction
    data_range = torch.as_tensor(data_range, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    local = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return local.unsqueeze(1)


def ssim_seed_protocol(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """SSIM as the seed reported it, per image: on the model's [-1, 1] values (reconstructions
    unclamped), ``data_range`` = each reconstruction's max - min, with scikit-image's default
    7x7 uniform window and sample covariance. Only for comparison with the seed's figures."""
    if images.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reconstructions.shape)}")
    flat = reconstructions.float().flatten(1)
    data_range = (flat.max(1).values - flat.min(1).values).clamp_min(1e-8)
    scores = ssim_map(
        images, reconstructions, data_range, win_size=7, sigma=None, sample_covariance=True
    )
    return scores.flatten(1).mean(1)


def foreground_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Boolean ``(B, 1, H, W)`` mask of the anatomy in [-1, 1] images.

    A pixel is foreground when it is brighter than ``threshold`` on the slice's own [0, 1]
    scale, after closing gaps of a few pixels and filling enclosed holes (dark structures
    inside the body, such as air in the rectum, belong to the anatomy).
    """
    unit = _unit(images).cpu().numpy()
    masks = np.zeros(unit.shape, dtype=bool)
    structure = np.ones((5, 5), dtype=bool)
    for index, image in enumerate(unit[:, 0]):
        low, high = image.min(), image.max()
        if high <= low:
            continue
        bright = (image - low) / (high - low) > threshold
        closed = ndimage.binary_closing(bright, structure=structure, border_value=0)
        masks[index, 0] = ndimage.binary_fill_holes(closed | bright)
    return torch.from_numpy(masks).to(images.device)


def foreground_ssim_psnr(
    images: torch.Tensor, reconstructions: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and PSNR inside the anatomy, per image, on [0, 1] (standard SSIM window).

    SSIM is the mean of the local SSIM map over window centres inside ``mask`` (by default
    :func:`foreground_mask` of ``images``); PSNR uses the squared error over mask pixels. An
    image with no foreground gets NaN for both.
    """
    if mask is None:
        mask = foreground_mask(images)
    x, y = _unit(images), _unit(reconstructions)
    local = ssim_map(x, y)
    margin = (mask.shape[-2] - local.shape[-2]) // 2
    inside = mask[..., margin : margin + local.shape[-2], margin : margin + local.shape[-1]]
    inside = inside.float()
    ssim = (local * inside).flatten(1).sum(1) / inside.flatten(1).sum(1)
    weights = mask.float()
    mse = ((x - y) ** 2 * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)
    return ssim, 10 * torch.log10(1.0 / mse)


def radial_power_spectrum(images: torch.Tensor, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The mean power of ``(N, 1, H, W)`` images (in the model's [-1, 1], measured on [0, 1])
    at each spatial frequency,
    averaged over rings: ``(frequencies, power)``, frequencies in cycles per pixel from one
    ring's width (``1 / min(H, W)``) up to Nyquist (0.5), the zero frequency left out.

    Each image's mean is removed first, and the power is ``|FFT|^2 / (H W)``, so it does not
    depend on the image size. Non-square images are fine: a ring holds the frequencies whose
    radius ``sqrt(fy^2 + fx^2)`` falls in it, whatever their direction. The rings are as wide
    as the coarser axis's frequency spacing: with narrower ones, every other ring of a tall
    slice would miss that axis's frequencies and the curve would zig-zag."""
    height, width = images.shape[-2:]
    step = 1 / min(height, width)
    radius = torch.sqrt(
        torch.fft.fftfreq(height, dtype=torch.float64)[:, None] ** 2
        + torch.fft.fftfreq(width, dtype=torch.float64)[None, :] ** 2
    )
    ring = torch.round(radius / step).long().flatten()  # ring 0: the zero frequency alone
    rings = round(0.5 / step)
    totals = torch.zeros(rings + 1, dtype=torch.float64)
    for part in images.split(chunk):
        pixels = _unit(part).double()[:, 0]
        pixels = pixels - pixels.mean(dim=(1, 2), keepdim=True)
        power = torch.fft.fft2(pixels).abs().pow(2).sum(0) / (height * width)
        kept = ring <= rings  # the corners beyond Nyquist along both axes are left out
        totals += torch.bincount(ring[kept], weights=power.flatten()[kept], minlength=rings + 1)
    counts = torch.bincount(ring[ring <= rings], minlength=rings + 1).double()
    power = totals / counts.clamp(min=1) / len(images)
    frequencies = torch.arange(rings + 1, dtype=torch.float64) * step
    return frequencies[1:].numpy(), power[1:].numpy()


def spectrum_gap_db(real: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``other``'s power relative to ``real``'s at each frequency, in dB (negative: weaker)."""
    tiny = np.finfo(np.float64).tiny
    return 10 * np.log10(np.maximum(other, tiny) / np.maximum(real, tiny))
