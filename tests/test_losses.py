import pytest
import torch

from mri_vqvae.losses import ms_ssim_window, structural_loss, vqvae_loss
from mri_vqvae.metrics import ssim_per_image


def test_terms_add_up_with_their_weights():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    reconstructions = (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)
    quantization = torch.tensor(0.3)
    loss = vqvae_loss(images, reconstructions, quantization, "l1", "ssim", 0.5)
    l1 = (images - reconstructions).abs().mean()
    structural = 1 - ssim_per_image(images, reconstructions).mean()
    torch.testing.assert_close(loss.reconstruction, l1)
    torch.testing.assert_close(loss.structural, structural)
    torch.testing.assert_close(loss.total, l1 + 0.5 * structural + 0.3)
    plain = vqvae_loss(images, reconstructions, quantization)
    torch.testing.assert_close(plain.total, ((images - reconstructions) ** 2).mean() + 0.3)
    assert plain.structural == 0


def test_ms_ssim_fits_its_window_to_128_pixel_sides():
    assert ms_ssim_window(256, 256) == 11
    assert ms_ssim_window(256, 128) == 7
    with pytest.raises(ValueError, match="over 32 pixels"):
        ms_ssim_window(64, 32)
    images = torch.rand(2, 1, 256, 128) * 2 - 1
    torch.testing.assert_close(structural_loss(images, images, "ms-ssim"), torch.tensor(0.0))
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(-1, 1).requires_grad_()
    value = structural_loss(images, noisy, "ms-ssim")
    value.backward()
    assert 0 < value < 1 and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def test_the_ssim_term_reports_the_batch_ssim_it_computed():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    reconstructions = torch.tanh(images + 0.2 * torch.randn_like(images))  # in range
    loss = vqvae_loss(images, reconstructions, torch.tensor(0.0), "mse", "ssim", 0.2)
    torch.testing.assert_close(loss.ssim, ssim_per_image(images, reconstructions).mean())
    assert vqvae_loss(images, reconstructions, torch.tensor(0.0)).ssim is None
    assert vqvae_loss(images, reconstructions, torch.tensor(0.0), "mse", "ssim", 0.0).ssim is None


def test_the_ssim_term_has_the_libraries_value_and_gradient():
    from pytorch_msssim import ssim

    torch.manual_seed(1)
    images = torch.rand(4, 1, 64, 48) * 2 - 1
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    ours = noisy.clone().requires_grad_()
    theirs = noisy.clone().requires_grad_()
    value = structural_loss(images, ours, "ssim")
    value.backward()
    reference = 1 - ssim(
        (images + 1) / 2, (theirs + 1) / 2, data_range=1.0, win_size=11, win_sigma=1.5
    )
    reference.backward()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-9)
    assert ours.grad.abs().sum() > 0
