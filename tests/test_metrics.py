import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mri_vqvae.data.phantom import phantom_slice
from mri_vqvae.metrics import (
    codebook_usage,
    foreground_mask,
    foreground_ssim_psnr,
    perplexity,
    psnr_per_image,
    radial_power_spectrum,
    spectrum_gap_db,
    ssim_map,
    ssim_per_image,
    ssim_seed_protocol,
)


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


def degraded_pair(noise: float = 0.1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, _ = phantom_slice(0, 0, 0, 0.5, height=96, width=64)
    unit = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    rng = np.random.default_rng(seed)
    degraded = np.clip(unit + rng.normal(0, noise, unit.shape), 0, 1)
    return to_model(unit), to_model(degraded)


def test_ssim_map_mean_is_the_whole_image_ssim():
    images, degraded = degraded_pair()
    unit = ((images + 1) / 2, (degraded + 1) / 2)
    local = ssim_map(*unit)
    assert local.shape == (1, 1, 96 - 10, 64 - 10)
    torch.testing.assert_close(local.mean().reshape(1), ssim_per_image(images, degraded))


def test_seed_protocol_matches_scikit_image_defaults_with_the_reconstructions_range():
    images, degraded = degraded_pair(0.2)
    degraded = degraded * 1.3  # an unbounded reconstruction, as the seed's decoder gives
    x, y = images[0, 0].double().numpy(), degraded[0, 0].double().numpy()
    reference = structural_similarity(x, y, data_range=y.max() - y.min())
    assert ssim_seed_protocol(images, degraded).item() == pytest.approx(reference, abs=1e-4)


def test_foreground_mask_is_the_body_with_its_holes_filled():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    radius = ((yy - 32) ** 2 + (xx - 32) ** 2).float().sqrt()
    body = (radius < 20).float() * 0.8
    body[radius < 5] = 0.0  # a dark hole inside the body, such as air in the rectum
    mask = foreground_mask((body * 2 - 1)[None, None])[0, 0]
    torch.testing.assert_close(mask, radius < 20)


def test_foreground_scores_ignore_the_background():
    images, degraded = degraded_pair(0.1)
    mask = foreground_mask(images)
    assert 0.2 < mask.float().mean() < 0.9
    # Painting the background exactly changes whole-image scores but not foreground ones.
    painted = torch.where(mask, degraded, images)
    fg_ssim, fg_psnr = foreground_ssim_psnr(images, degraded, mask)
    fg_ssim_painted, fg_psnr_painted = foreground_ssim_psnr(images, painted, mask)
    torch.testing.assert_close(fg_psnr_painted, fg_psnr)
    assert ssim_per_image(images, painted) > ssim_per_image(images, degraded)
    assert (fg_ssim_painted - fg_ssim).abs() < 0.05
    # An everywhere-true mask gives back the whole-image figures.
    everywhere = torch.ones_like(mask)
    ssim_all, psnr_all = foreground_ssim_psnr(images, degraded, everywhere)
    torch.testing.assert_close(ssim_all, ssim_per_image(images, degraded))
    torch.testing.assert_close(psnr_all, psnr_per_image(images, degraded))


def test_foreground_of_an_empty_image_is_nan():
    blank = -torch.ones(1, 1, 32, 32)
    ssim, psnr = foreground_ssim_psnr(blank, blank)
    assert torch.isnan(ssim).all() and torch.isnan(psnr).all()


def test_the_power_spectrum_of_white_noise_is_flat_at_its_variance():
    torch.manual_seed(0)
    noise = torch.rand(64, 1, 64, 32) * 2 - 1  # [0, 1] pixels of variance 1/12
    frequencies, power = radial_power_spectrum(noise)
    assert frequencies[0] == pytest.approx(1 / 32) and frequencies[-1] == pytest.approx(0.5)
    assert len(frequencies) == len(power) == 16
    np.testing.assert_allclose(power[2:], 1 / 12, rtol=0.15)  # the first rings hold few
    # A blurred copy keeps the low frequencies and loses the high ones.
    blurred = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1)
    gap = spectrum_gap_db(power, radial_power_spectrum(blurred)[1])
    assert gap[1] > -1.5 and gap[-1] < -10


def test_the_power_spectrum_finds_a_stripe_at_its_frequency():
    # Vertical stripes with a period of 8 pixels: all power at 1/8 cycles per pixel.
    columns = torch.cos(2 * torch.pi * torch.arange(32) / 8)
    stripes = columns.expand(2, 1, 64, 32).clone()
    frequencies, power = radial_power_spectrum(stripes)
    assert frequencies[power.argmax()] == pytest.approx(1 / 8)
    assert power.max() > 100 * np.delete(power, power.argmax()).max()
