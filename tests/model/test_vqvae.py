import pytest
import torch

from mri_vqvae.config import ModelConfig, load_config
from mri_vqvae.model import VQVAE
from tests.helpers import tiny_model_config


def tiny(num_downsamplings: int = 2, **changes) -> VQVAE:
    multipliers = (1, 2, 2, 2)[:num_downsamplings]
    return VQVAE.from_config(tiny_model_config(channel_multipliers=multipliers, **changes))


@pytest.mark.parametrize("architecture", ["resnet", "seed"])
@pytest.mark.parametrize(
    ("size", "depth"), [((64, 32), 2), ((64, 64), 3), ((32, 16), 1), ((48, 16), 3)]
)
def test_shapes(size, depth, architecture):
    model = tiny(depth, architecture=architecture)
    images = torch.randn(3, 1, *size)
    output = model(images)
    latent_size = (size[0] // 2**depth, size[1] // 2**depth)
    assert output.reconstruction.shape == images.shape
    assert output.indices.shape == (3, *latent_size) and output.indices.dtype == torch.int64
    assert model.encode(images).shape == (3, 8, *latent_size)
    assert output.quantization_loss.ndim == 0
    assert 1.0 <= output.perplexity.item() <= 16.0


def test_seed_preset_builds_the_seeds_architecture():
    model = VQVAE.from_config(load_config(preset="seed").model)
    convs = [m for m in model.encoder.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs[:3]] == [
        (1, 64, (4, 4), (2, 2)),
        (64, 128, (4, 4), (2, 2)),
        (128, 128, (4, 4), (2, 2)),
    ]
    ups = [m for m in model.decoder.upsamplings if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(128, 128), (128, 64), (64, 1)]
    assert model.quantizer.codebook.shape == (512, 128)
    assert model(torch.randn(1, 1, 256, 128)).indices.shape == (1, 32, 16)


def test_index_round_trip_equals_forward_in_eval_mode():
    model = tiny().eval()
    images = torch.randn(2, 1, 64, 32)
    with torch.no_grad():
        indices = model.encode_to_indices(images)
        torch.testing.assert_close(indices, model(images).indices)
        torch.testing.assert_close(model.decode_indices(indices), model(images).reconstruction)


def test_eval_mode_leaves_the_codebook_alone():
    model = tiny().eval()
    before = model.quantizer.codebook.clone()
    model(torch.randn(2, 1, 64, 32))
    torch.testing.assert_close(model.quantizer.codebook, before, rtol=0, atol=0)


def test_from_config_matches_sizes():
    config = ModelConfig(channels=8, num_embeddings=64, embedding_dim=4, channel_multipliers=(1, 2))
    model = VQVAE.from_config(config)
    assert model.quantizer.codebook.shape == (64, 4)
    assert model.downsampling_factor == 4


def test_indivisible_image_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny().encode(torch.randn(1, 1, 62, 32))


@pytest.mark.parametrize("activation", ["tanh", "none"])
def test_output_bound_follows_the_setting(activation):
    model = tiny(output_activation=activation)
    with torch.no_grad():
        # Scaling the decoder's last layer drives its raw output far outside [-1, 1].
        model.decoder.levels[-1][-1].weight.mul_(1e3)
        reconstruction = model(torch.randn(2, 1, 64, 32)).reconstruction
    if activation == "tanh":
        assert reconstruction.abs().max() <= 1
    else:
        assert reconstruction.abs().max() > 1


def test_resnet_levels_follow_the_channel_multipliers():
    model = VQVAE.from_config(tiny_model_config(channels=4, channel_multipliers=(1, 2, 3)))
    downsamplings = [level[0] for level in model.encoder.levels]
    assert [(conv.in_channels, conv.out_channels) for conv in downsamplings] == [
        (1, 4),
        (4, 8),
        (8, 12),
    ]
    assert model.encode(torch.randn(1, 1, 64, 32)).shape == (1, 8, 8, 4)
