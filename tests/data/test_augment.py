import pytest
import torch

from mri_vqvae.config import AugmentConfig
from mri_vqvae.data.augment import (
    AUGMENTATION_PARAMETERS,
    CONTRAST_UNIT,
    LOG_GAMMA_UNIT,
    LOG_SCALE_UNIT,
    ROTATION_UNIT,
    SHIFT_UNIT,
    apply_augmentations,
    parameter_limits,
    sample_augmentations,
)

INDEX = {name: i for i, name in enumerate(AUGMENTATION_PARAMETERS)}


def images(count: int = 3, size=(32, 16), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, 1, *size), generator=generator) * 2 - 1


def only(count: int = 1, **values: float) -> torch.Tensor:
    parameters = torch.zeros((count, len(AUGMENTATION_PARAMETERS)))
    for name, value in values.items():
        parameters[:, INDEX[name]] = value
    return parameters


def test_parameter_vector_layout():
    assert len(set(AUGMENTATION_PARAMETERS)) == len(AUGMENTATION_PARAMETERS)
    assert {"shift_y", "shift_x", "rotation", "log_scale", "log_gamma", "contrast", "flip"} == set(
        AUGMENTATION_PARAMETERS
    )


def test_zero_parameters_return_the_rows_bit_identical_and_others_changed():
    batch = images(4)
    parameters = sample_augmentations(4, AugmentConfig(), torch.Generator().manual_seed(1))
    parameters[[0, 2]] = 0
    out = apply_augmentations(batch, parameters)
    assert torch.equal(out[[0, 2]], batch[[0, 2]])
    assert not torch.equal(out[1], batch[1]) and not torch.equal(out[3], batch[3])
    assert torch.equal(apply_augmentations(batch, torch.zeros_like(parameters)), batch)


def test_a_known_shift_moves_the_content_by_whole_pixels():
    height, width = 32, 16
    batch = images(1, (height, width))
    # 2 rows down and 3 columns to the left, as fractions of each side in SHIFT_UNITs.
    parameters = only(shift_y=2 / height / SHIFT_UNIT, shift_x=-3 / width / SHIFT_UNIT)
    out = apply_augmentations(batch, parameters)
    torch.testing.assert_close(out[..., 2:, : width - 3], batch[..., : height - 2, 3:])
    # What came in from outside is the background, the image's minimum.
    torch.testing.assert_close(out[..., :2, :], batch.min().expand(1, 1, 2, width))
    torch.testing.assert_close(out[..., :, width - 3 :], batch.min().expand(1, 1, height, 3))


def test_a_quarter_turn_of_a_non_square_image_is_a_turn_in_pixels():
    # A bright dot 4 pixels right of the centre of a 32x16 image ends up 4 pixels below it:
    # in normalised coordinates the turn would have squashed that to 2 pixels.
    batch = torch.full((1, 1, 32, 16), -1.0)
    batch[0, 0, 15:17, 11:13] = 1.0  # centre is (16, 8) between pixels
    out = apply_augmentations(batch, only(rotation=90 / ROTATION_UNIT))
    bright = (out[0, 0] > 0.5).nonzero().float().mean(dim=0)
    torch.testing.assert_close(bright, torch.tensor([19.5, 7.5]), atol=0.01, rtol=0)


@pytest.mark.parametrize("size", [(32, 16), (16, 32), (24, 24)])
def test_every_augmentation_keeps_the_shape_and_the_range(size):
    config = AugmentConfig(flip_left_right=True, max_shift=0.2, max_rotation_degrees=30)
    batch = images(6, size)
    parameters = sample_augmentations(6, config, torch.Generator().manual_seed(2))
    out = apply_augmentations(batch, parameters)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert out.min() >= -1 and out.max() <= 1


def test_flip_mirrors_the_first_axis_exactly():
    batch = images(2)
    out = apply_augmentations(batch, only(2, flip=1.0))
    assert torch.equal(out, batch.flip(-2))


def test_zoom_grows_the_content_about_the_centre():
    batch = torch.full((1, 1, 32, 16), -1.0)
    batch[0, 0, 12:20, 4:12] = 1.0  # an 8x8 square about the centre
    out = apply_augmentations(batch, only(log_scale=0.5 / LOG_SCALE_UNIT))  # e^0.5 = 1.65x
    area = float(((out + 1) / 2).sum())
    assert area == pytest.approx(64 * 1.6487**2, rel=0.05)


def test_gamma_and_contrast_change_intensity_only():
    batch = images(1)
    # log_gamma -1 is gamma e^-0.15 on [0, 1] intensities: every pixel as computed, brighter.
    brighter = apply_augmentations(batch, only(log_gamma=-1.0))
    expected = ((batch + 1) / 2) ** torch.exp(torch.tensor(-LOG_GAMMA_UNIT)) * 2 - 1
    torch.testing.assert_close(brighter, expected)
    assert (brighter >= batch - 1e-6).all()
    flatter = apply_augmentations(batch, only(contrast=-1.0))  # contrast 0.9 about the mean
    assert float(flatter.std()) == pytest.approx(float(batch.std()) * (1 - CONTRAST_UNIT), rel=1e-4)
    assert float(flatter.mean()) == pytest.approx(float(batch.mean()), abs=1e-5)


def test_samples_respect_the_ranges_and_draw_no_flip_unless_allowed():
    config = AugmentConfig(
        max_shift=0.02, max_rotation_degrees=3, max_scale=0.1, max_gamma=0.2, max_contrast=0.05
    )
    parameters = sample_augmentations(4000, config, torch.Generator().manual_seed(3))
    assert parameters.shape == (4000, len(AUGMENTATION_PARAMETERS))
    assert parameters.dtype == torch.float32
    column = {name: parameters[:, i] for name, i in INDEX.items()}
    assert (column["flip"] == 0).all()
    assert column["shift_y"].abs().max() * SHIFT_UNIT <= 0.02 + 1e-7
    assert column["shift_x"].abs().max() * SHIFT_UNIT <= 0.02 + 1e-7
    assert column["rotation"].abs().max() * ROTATION_UNIT <= 3 + 1e-5
    scale = torch.exp(column["log_scale"] * LOG_SCALE_UNIT)
    assert scale.max() <= 1.1 + 1e-6 and scale.min() >= 1 / 1.1 - 1e-6
    gamma = torch.exp(column["log_gamma"] * LOG_GAMMA_UNIT)
    assert gamma.max() <= 1.2 + 1e-6 and gamma.min() >= 1 / 1.2 - 1e-6
    assert column["contrast"].abs().max() * CONTRAST_UNIT <= 0.05 + 1e-7
    # The draws fill their ranges rather than sitting at zero.
    limits = parameter_limits(config)
    assert (parameters[:, :-1].abs().amax(dim=0) > 0.95 * limits[:-1]).all()


def test_flips_are_drawn_about_half_the_time_when_allowed():
    config = AugmentConfig(flip_left_right=True)
    flips = sample_augmentations(2000, config, torch.Generator().manual_seed(4))[:, INDEX["flip"]]
    assert set(flips.unique().tolist()) == {0.0, 1.0}
    assert 0.45 < float(flips.mean()) < 0.55


def test_default_ranges_stay_within_unit_values_and_draws_repeat_for_a_seed():
    limits = parameter_limits(AugmentConfig(flip_left_right=True))
    assert (limits <= 1.0).all() and (limits > 0.5).all()
    first = sample_augmentations(5, AugmentConfig(), torch.Generator().manual_seed(7))
    again = sample_augmentations(5, AugmentConfig(), torch.Generator().manual_seed(7))
    other = sample_augmentations(5, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_parameters_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="do not fit images"):
        apply_augmentations(images(2), torch.zeros((3, len(AUGMENTATION_PARAMETERS))))
