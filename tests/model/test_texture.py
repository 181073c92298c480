"""The acquisition texture: fitted to residuals, it draws noise with their distribution at each
intensity and their spatial correlation, and nothing where there was none."""

import pytest
import torch

from mri_vqvae.checkpoint import (
    TEXTURE,
    Checkpoint,
    CheckpointError,
    keep_texture,
    load_checkpoint,
    read_texture,
    save_checkpoint,
)
from mri_vqvae.config import Config
from mri_vqvae.model.texture import ResidualTexture, texture_generator


def smooth_slices(count: int = 40, size: tuple[int, int] = (64, 32)) -> torch.Tensor:
    """A bright blob on a dark background, the same in every slice, in [-1, 1]."""
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij"
    )
    blob = 0.8 * torch.exp(-3 * (x**2 + y**2)) - 0.5
    return blob.expand(count, 1, *size).clone()


def mean_power(fields: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft2(fields[:, 0]).abs().square().mean(0)


def test_noise_of_each_intensity_is_drawn_at_its_own_spread():
    mean = smooth_slices()
    spread = 0.03 + 0.1 * (mean + 0.5)  # 0.03 in the background, up to 0.11 in the blob
    real = mean + spread * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    texture = ResidualTexture.fit(real, mean, bins=8)
    drawn = texture.sample(mean, torch.Generator().manual_seed(2)) - mean
    background, bright = mean < -0.45, mean > 0.15
    for region in (background, bright):
        wanted = (real - mean)[region].std()
        assert drawn[region].std() == pytest.approx(float(wanted), rel=0.15)
    assert drawn[bright].std() > 2 * drawn[background].std()
    # White noise stays white: as much power at high frequencies as at low ones.
    power = mean_power(drawn)
    assert power[20:, 10:].mean() / power[1:10, 1:5].mean() == pytest.approx(1.0, rel=0.2)


def test_correlated_noise_keeps_its_spectrum():
    mean = smooth_slices()
    white = torch.randn(40, 1, 66, 34, generator=torch.Generator().manual_seed(3))
    blurred = torch.nn.functional.avg_pool2d(white, 3, stride=1)  # low-pass noise
    real = mean + 0.1 * blurred
    texture = ResidualTexture.fit(real, mean)
    drawn = texture.sample(mean, torch.Generator().manual_seed(4)) - mean
    wanted, got = mean_power(real - mean), mean_power(drawn)
    high, low = (slice(25, None), slice(12, None)), (slice(1, 8), slice(1, 4))
    wanted_ratio = wanted[high].mean() / wanted[low].mean()
    got_ratio = got[high].mean() / got[low].mean()
    assert wanted_ratio < 0.1  # the blur took most of the high frequencies
    assert got_ratio == pytest.approx(float(wanted_ratio), rel=0.4)
    assert drawn.std() == pytest.approx(float((real - mean).std()), rel=0.1)


def test_structure_drawn_a_pixel_off_is_not_taken_for_noise():
    real = smooth_slices()
    real[:, :, 20:44, 10:22] += 0.5  # a sharp-edged square
    shifted = torch.roll(real, shifts=1, dims=-1)  # the same square one pixel to the right
    texture = ResidualTexture.fit(real, shifted)
    drawn = texture.sample(shifted, torch.Generator().manual_seed(10)) - shifted
    # The residual is large along the edges, but the shifted slices have the real ones'
    # power at every frequency: next to nothing is missing, so next to nothing is drawn.
    assert (real - shifted).abs().max() > 0.4
    assert drawn.std() < 0.1 * (real - shifted).std()


def test_no_residual_means_nothing_is_added_and_draws_repeat_by_seed():
    mean = smooth_slices(4)
    texture = ResidualTexture.fit(mean, mean)
    assert torch.equal(texture.sample(mean, torch.Generator().manual_seed(0)), mean)
    noisy = ResidualTexture.fit(mean + 0.1 * torch.randn(mean.shape), mean)
    first = noisy.sample(mean, torch.Generator().manual_seed(5))
    assert torch.equal(first, noisy.sample(mean, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, noisy.sample(mean, torch.Generator().manual_seed(6)))
    assert first.min() >= -1 and first.max() <= 1


def test_a_flat_background_gives_fewer_bins_not_an_error():
    mean = torch.full((6, 1, 16, 8), -1.0)
    mean[:, :, 4:12, 2:6] = 0.5  # two intensities only
    real = mean + 0.05 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    texture = ResidualTexture.fit(real, mean, bins=16)
    assert 1 <= len(texture.bin_centres) <= 3
    assert texture.sample(mean).shape == mean.shape


def test_wrong_shapes_are_refused():
    mean = smooth_slices(2)
    with pytest.raises(ValueError, match="must both be"):
        ResidualTexture.fit(mean, mean[:, :, :10])
    texture = ResidualTexture.fit(mean, mean)
    with pytest.raises(ValueError, match="fitted to 64x32"):
        texture.sample(torch.zeros(1, 1, 32, 32))


def test_the_texture_is_kept_in_the_checkpoint_and_read_back(tmp_path):
    mean = smooth_slices(6)
    real = mean + 0.05 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(8))
    texture = ResidualTexture.fit(real, mean)
    path = tmp_path / "best.pt"
    save_checkpoint(Checkpoint("vqvae", Config(), {"weight": torch.ones(2)}), path)
    assert read_texture(load_checkpoint(path), path) is None
    keep_texture(path, texture)
    kept = load_checkpoint(path)
    assert torch.equal(kept.model_state["weight"], torch.ones(2))
    restored = read_texture(kept, path)
    assert restored is not None and restored.image_size == (64, 32)
    generator = torch.Generator().manual_seed(9)
    assert torch.equal(
        restored.sample(mean, generator), texture.sample(mean, generator.manual_seed(9))
    )
    kept.extras[TEXTURE] = {"levels": "edited"}
    with pytest.raises(CheckpointError, match="texture is not what training records"):
        read_texture(kept, path)


def test_odd_widths_one_bin_and_the_streams():
    mean = smooth_slices(8, (20, 13))  # an odd width: the half-plane has no Nyquist column
    real = mean + 0.1 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(11))
    texture = ResidualTexture.fit(real, mean, bins=1)
    assert len(texture.bin_centres) == 1 and texture.amplitude.shape == (20, 7)
    drawn = texture.sample(mean, torch.Generator().manual_seed(12)) - mean
    assert drawn.std() == pytest.approx(0.1, rel=0.25)
    with pytest.raises(ValueError, match="odd levels"):
        ResidualTexture.fit(real, mean, levels=64)
    # Each use draws its own field from the same seed: samples never share their references'.
    fields = [
        texture_generator(0, name).initial_seed() for name in ("samples", "held_out", "train")
    ]
    assert len(set(fields)) == 3


def test_a_texture_whose_parts_do_not_fit_is_named(tmp_path):
    mean = smooth_slices(4)
    plain = ResidualTexture.fit(mean + 0.05 * torch.randn(mean.shape), mean).to_plain()
    plain["amplitude"] = plain["amplitude"][:, :-1]
    checkpoint = Checkpoint("vqvae", Config(), {}, extras={TEXTURE: plain})
    with pytest.raises(CheckpointError, match=r"amplitude is \(64, 16\), not \(64, 17\)"):
        read_texture(checkpoint, tmp_path / "best.pt")
