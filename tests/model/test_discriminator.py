import pytest
import torch

from mri_vqvae.model.discriminator import PatchDiscriminator


@pytest.mark.parametrize(("height", "width"), [(64, 32), (256, 128), (96, 160)])
def test_patch_logits_keep_the_slices_aspect(height: int, width: int):
    discriminator = PatchDiscriminator(in_channels=1, channels=8, num_layers=3)
    logits = discriminator(torch.randn(2, 1, height, width))
    # Three halvings, then two 4x4 convolutions that each take one pixel off every side.
    assert logits.shape == (2, 1, height // 8 - 2, width // 8 - 2)


def test_each_image_is_judged_on_its_own():
    # GroupNorm, not batch norm: an image's logits do not depend on the rest of its batch,
    # so DDP ranks with different shards judge an image alike.
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(channels=8, num_layers=2).train()
    images = torch.randn(4, 1, 64, 32)
    torch.testing.assert_close(discriminator(images)[:1], discriminator(images[:1]))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminator(channels=8, num_layers=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        PatchDiscriminator(channels=8)(torch.randn(1, 64, 32))
