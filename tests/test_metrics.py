import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mri_vqvae.data.phantom import phantom_slice
from mri_vqvae.metrics import codebook_usage, perplexity, psnr_per_image, ssim_per_image


def to_model(unit: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(unit * 2 - 1).float()[None, None]


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_ssim_matches_scikit_image(noise):
    pixels, _ = phantom_slice(0, 0, 0, 0.5)
    unit = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    rng = np.random.default_rng(1)
    degraded = np.clip(unit + rng.normal(0, noise, unit.shape), 0, 1)
    reference = structural_similarity(
        unit, degraded, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
    )
    ours = ssim_per_image(to_model(unit), to_model(degraded)).item()
    assert ours == pytest.approx(reference, abs=1e-3)


def test_ssim_of_identical_images_is_one_per_image():
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(ssim_per_image(images, images), torch.ones(3))


def test_psnr_of_known_error():
    images = torch.zeros(2, 1, 16, 16)  # 0.5 in [0, 1]
    shifted = images + 0.2  # 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
    torch.testing.assert_close(psnr_per_image(images, shifted), torch.full((2,), 20.0))
    assert torch.isinf(psnr_per_image(images, images)).all()


def test_codebook_usage_and_perplexity():
    counts = torch.tensor([5, 0, 5, 0])
    assert codebook_usage(counts) == 0.5
    torch.testing.assert_close(perplexity(counts), torch.tensor(2.0))
    torch.testing.assert_close(perplexity(torch.tensor([0, 9, 0])), torch.tensor(1.0))


def test_ssim_refuses_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="differ"):
        ssim_per_image(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 32))
    with pytest.raises(ValueError, match="11 pixels"):
        ssim_per_image(torch.zeros(1, 1, 8, 32), torch.zeros(1, 1, 8, 32))
