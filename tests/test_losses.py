import pytest
import torch

from mri_vqvae.losses import (
    adaptive_adversarial_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    ms_ssim_window,
    spectral_loss,
    structural_loss,
    vqvae_loss,
)
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


def blurred(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.full((1, 1, 5, 5), 1 / 25)
    return torch.nn.functional.conv2d(images, kernel, padding=2)


def test_the_spectral_loss_is_zero_for_identical_images_and_positive_for_a_blurred_copy():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 32) * 2 - 1
    assert spectral_loss(images, images) == 0
    assert spectral_loss(images, blurred(images)) > 0.1
    # Magnitudes only: a copy shifted (circularly) has the same spectrum.
    shifted = torch.roll(images, shifts=(3, 5), dims=(2, 3))
    assert spectral_loss(images, shifted) < 1e-5
    loss = vqvae_loss(images, blurred(images), torch.tensor(0.0), spectral_weight=0.5)
    torch.testing.assert_close(loss.spectral, spectral_loss(images, blurred(images)))
    torch.testing.assert_close(
        loss.total, loss.reconstruction + 0.5 * spectral_loss(images, blurred(images))
    )
    assert vqvae_loss(images, blurred(images), torch.tensor(0.0)).spectral is None


def test_hinge_losses_on_known_logits():
    confident = hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert confident == 0  # beyond the margin on both sides
    undecided = hinge_discriminator_loss(torch.zeros(4), torch.zeros(4))
    assert undecided == 1
    assert generator_adversarial_loss(torch.tensor([1.0, 3.0])) == -2


def test_the_adaptive_weight_matches_the_gradient_norms_and_is_clipped():
    weight = torch.tensor([1.0, 2.0], requires_grad=True)
    # Gradients at `weight`: (3, 4) for the first loss (norm 5), (0, 5) for the second.
    first = 3 * weight[0] + 4 * weight[1]
    second = 5 * weight[1]
    equal = adaptive_adversarial_weight(first, second, weight)
    torch.testing.assert_close(equal, torch.tensor(5 / (5 + 1e-4)))
    assert equal == pytest.approx(1, abs=1e-4)
    smaller = 0.5 * weight[1]  # norm 0.5: the weight doubles the term's gradient to match
    torch.testing.assert_close(
        adaptive_adversarial_weight(first, smaller, weight), torch.tensor(5 / (0.5 + 1e-4))
    )
    vanishing = 0.0 * weight[1]  # no gradient at all: clipped to the bound, not infinite
    assert adaptive_adversarial_weight(first, vanishing, weight, max_weight=100.0) == 100.0
    assert not equal.requires_grad
    (first + second).backward()  # both graphs were kept for the step's backward pass
    torch.testing.assert_close(weight.grad, torch.tensor([3.0, 9.0]))
