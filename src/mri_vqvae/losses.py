"""The VQ-VAE training objective with its named parts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

from mri_vqvae.errors import ConfigError
from mri_vqvae.metrics import ssim_map


class VQVAELoss(NamedTuple):
    """``total`` = ``reconstruction`` + ``ssim_weight * structural`` + ``quantization`` +
    ``spectral_weight * spectral`` (+ the weighted ``adversarial`` term, when training adds it).
    """

    total: torch.Tensor
    reconstruction: torch.Tensor  # the pixel loss (MSE or L1)
    quantization: torch.Tensor
    structural: torch.Tensor  # 1 - (MS-)SSIM, zero when that term is off
    # The batch's mean SSIM on [0, 1] (unclamped reconstructions) when the "ssim" term
    # computed it, so a caller logging SSIM need not compute it again; else None.
    ssim: torch.Tensor | None = None
    # The log-spectrum distance (:func:`spectral_loss`); None when that term is off.
    spectral: torch.Tensor | None = None
    # The generator's adversarial loss and its weight in ``total``, when that term is on.
    adversarial: torch.Tensor | None = None
    adversarial_weight: torch.Tensor | None = None


def ms_ssim_window(height: int, width: int) -> int:
    """The largest odd Gaussian window (at most 11) MS-SSIM's five scales allow at this size."""
    for window in (11, 9, 7, 5, 3):
        # pytorch_msssim requires the smaller side to exceed (window - 1) * 2**4.
        if min(height, width) > (window - 1) * 16:
            return window
    raise ConfigError(
        f"MS-SSIM needs image sides over 32 pixels, got {height}x{width}; use the ssim loss"
    )


def structural_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """``1 - SSIM`` (``kind="ssim"``) or ``1 - MS-SSIM`` (``"ms-ssim"``) on [0, 1] images."""
    x = (images.float() + 1) / 2
    y = (reconstructions.float() + 1) / 2
    if kind == "ssim":
        # The same SSIM as pytorch_msssim's (11x11 Gaussian window, sigma 1.5), computed by
        # banded products: a quarter of the time on a CPU, where the library's cost a quarter
        # of a training step.
        return 1 - ssim_map(x, y).mean()
    if kind == "ms-ssim":
        window = ms_ssim_window(*images.shape[-2:])
        return 1 - ms_ssim(x, y, data_range=1.0, win_size=window, win_sigma=1.5)
    raise ValueError(f"structural loss must be 'ssim' or 'ms-ssim', got {kind!r}")


def vqvae_loss(
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    quantization_loss: torch.Tensor,
    pixel_loss: str = "mse",
    ssim_loss: str = "none",
    ssim_weight: float = 0.0,
    spectral_weight: float = 0.0,
) -> VQVAELoss:
    """Pixel loss plus the quantiser's codebook and commitment terms (van den Oord et al.,
    eq. 3), plus optionally ``ssim_weight * (1 - SSIM)`` (Zhao et al., "Loss Functions for
    Image Restoration with Neural Networks", 2017) and ``spectral_weight`` times the
    log-spectrum distance (:func:`spectral_loss`)."""
    if pixel_loss == "mse":
        reconstruction = F.mse_loss(reconstructions.float(), images.float())
    elif pixel_loss == "l1":
        reconstruction = F.l1_loss(reconstructions.float(), images.float())
    else:
        raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
    quantization = quantization_loss.float()
    if ssim_loss != "none" and ssim_weight > 0:
        structural = structural_loss(images, reconstructions, ssim_loss)
    else:
        structural = torch.zeros((), device=images.device)
    total = reconstruction + ssim_weight * structural + quantization
    spectral = None
    if spectral_weight > 0:
        spectral = spectral_loss(images, reconstructions)
        total = total + spectral_weight * spectral
    mean_ssim = (1 - structural).detach() if ssim_loss == "ssim" and ssim_weight > 0 else None
    return VQVAELoss(
        total=total,
        reconstruction=reconstruction,
        quantization=quantization,
        structural=structural,
        ssim=mean_ssim,
        spectral=spectral,
    )


# Added to Fourier magnitudes before their logarithm, so empty frequencies stay finite.
SPECTRUM_FLOOR = 1e-3


def spectral_loss(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the log-magnitude 2D Fourier spectra, per image.

    A pixel loss forgives a decoder that drops the faint high frequencies (noise, the thinnest
    lines), since they carry little energy; on a log scale every frequency counts alike. The
    spectra are compared by magnitude only, so the term asks for the right texture without
    asking for it in the same place (MONAI's ``JukeboxLoss`` is a spectral term of this kind;
    this one is written for slices in float32)."""
    # With orthonormal transforms a coefficient's magnitude is on the pixels' scale: noise of
    # standard deviation 0.02 gives magnitudes near 0.02, so the floor lies well below it.
    spectra = [
        torch.log(torch.fft.rfft2(x.float(), norm="ortho").abs() + SPECTRUM_FLOOR)
        for x in (images, reconstructions)
    ]
    return (spectra[0] - spectra[1]).abs().mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017, as VQGAN uses): ``mean(relu(1 - real)) +
    mean(relu(1 + fake))``, halved so it is 1 when the logits say nothing (all zero)."""
    real = F.relu(1.0 - real_logits.float()).mean()
    fake = F.relu(1.0 + fake_logits.float()).mean()
    return 0.5 * (real + fake)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game: raise the discriminator's logits on its images."""
    return -fake_logits.float().mean()


def adaptive_adversarial_weight(
    reconstruction_loss: torch.Tensor,
    adversarial_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """The adversarial term's weight that gives its gradient at the decoder's last layer the
    norm of the reconstruction loss's there (Esser et al. 2021, eq. 7): ``||grad rec|| /
    (||grad adv|| + 1e-4)``, clipped to ``[0, max_weight]`` and detached. Keeps the two
    objectives in balance whatever their scales; both losses' graphs are kept for the
    backward pass that follows."""
    (reconstruction_grad,) = torch.autograd.grad(
        reconstruction_loss, last_layer_weight, retain_graph=True
    )
    (adversarial_grad,) = torch.autograd.grad(
        adversarial_loss, last_layer_weight, retain_graph=True
    )
    weight = reconstruction_grad.float().norm() / (adversarial_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
