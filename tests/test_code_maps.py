"""Code maps with augmented copies (issue 15): order, cache and the identity."""

import pytest
import torch

from mri_vqvae import code_maps as code_maps_module
from mri_vqvae.code_maps import CodeMaps, code_maps_for, encode_augmented_copies, encode_slices
from mri_vqvae.config import AugmentConfig
from mri_vqvae.data.augment import AUGMENTATION_PARAMETERS, apply_augmentations
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.model import VQVAE
from tests.helpers import tiny_model_config, vqvae_handle

CPU = torch.device("cpu")
SIZE = (32, 16)  # non-square on purpose
GRID = (8, 4)  # 4x smaller
A = len(AUGMENTATION_PARAMETERS)


def tiny_vqvae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE.from_config(tiny_model_config()).eval()


def smooth_slices(count: int = 5) -> SliceSet:
    # Blurred noise: structure a few pixels wide, so small shifts change some codes, not all.
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((count, 1, SIZE[0] // 4, SIZE[1] // 4), generator=generator)
    images = torch.nn.functional.interpolate(noise, size=SIZE, mode="bilinear") * 2 - 1
    names = [f"case_slice_{i}.nii.gz" for i in range(count)]
    return SliceSet(images.half(), names, [SIZE] * count, torch.zeros(count, 2))


def test_plain_rows_of_an_augmented_split_are_the_unaugmented_maps(tmp_path, monkeypatch):
    from mri_vqvae import runtime

    # float32 encoding, so the copies can be checked against a plain float32 encode below.
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: False)
    model, slices = tiny_vqvae(), smooth_slices(5)
    plain = code_maps_for(
        slices, vqvae=vqvae_handle(model, "a" * 64), cache_file=tmp_path / "plain.pt"
    )
    augment = AugmentConfig(copies=2, seed=3)
    codes = code_maps_for(
        slices,
        vqvae=vqvae_handle(model, "a" * 64),
        cache_file=tmp_path / "aug.pt",
        batch_size=2,
        augment=augment,
    )
    assert codes.indices.shape == (15, *GRID)
    assert torch.equal(codes.indices[:5], plain.indices)
    assert codes.names == plain.names * 3
    assert torch.equal(codes.slice_positions, plain.slice_positions.repeat(3))
    assert torch.equal(codes.source, torch.arange(5).repeat(3))
    assert codes.augmentation.shape == (15, A) and codes.augmentation.dtype == torch.float32
    assert (codes.augmentation[:5] == 0).all()
    assert codes.augmentation[5:].ne(0).any(dim=1).all()
    assert codes.maps_per_slice == 3
    kept = codes.plain()
    assert torch.equal(kept.indices, plain.indices) and kept.names == plain.names
    # Every copy is the encoding of its slice changed by its own parameters.
    for row in (5, 9, 10, 14):
        image = slices.batch([int(codes.source[row])])
        changed = apply_augmentations(image, codes.augmentation[row : row + 1])
        assert torch.equal(model.encode_to_indices(changed)[0], codes.indices[row])


def test_identity_parameters_give_exactly_the_plain_codes():
    model, slices = tiny_vqvae(), smooth_slices(5)
    zeros = torch.zeros((10, A))
    images = slices.batch(slice(None))
    assert torch.equal(apply_augmentations(images, zeros[:5]), images)
    copies = encode_augmented_copies(model, slices, zeros, CPU, batch_size=2)
    assert torch.equal(copies, encode_slices(model, slices, CPU, batch_size=2).repeat(2, 1, 1))


def test_copies_are_augmented_one_batch_at_a_time(monkeypatch):
    seen = []

    def recording(images, parameters):
        seen.append(images.shape[0])
        return apply_augmentations(images, parameters)

    monkeypatch.setattr(code_maps_module, "apply_augmentations", recording)
    parameters = torch.full((15, A), 0.1)
    encode_augmented_copies(tiny_vqvae(), smooth_slices(5), parameters, CPU, batch_size=2)
    assert seen == [2, 2, 1] * 3
    with pytest.raises(ValueError, match="not one or more copies of 5 slices"):
        encode_augmented_copies(tiny_vqvae(), smooth_slices(5), parameters[:7], CPU)


def test_augmented_cache_is_reused_for_the_same_settings_and_rebuilt_for_others(tmp_path):
    slices, cache = smooth_slices(4), tmp_path / "codes" / "train.pt"
    augment = AugmentConfig(copies=1)
    first = code_maps_for(
        slices, vqvae=vqvae_handle(tiny_vqvae(), "a" * 64), cache_file=cache, augment=augment
    )
    # Another model with the same hash: the stored maps come back, parameters and all.
    other = tiny_vqvae(seed=9)
    again = code_maps_for(
        slices,
        vqvae=vqvae_handle(other, "a" * 64),
        cache_file=cache,
        augment=AugmentConfig(copies=1),
    )
    assert torch.equal(again.indices, first.indices)
    assert torch.equal(again.augmentation, first.augmentation)
    assert torch.equal(again.source, first.source)
    # Any augment setting changed: encoded again, here by the other model.
    for changed in (
        AugmentConfig(copies=1, max_rotation_degrees=2),
        AugmentConfig(copies=1, seed=1),
        AugmentConfig(copies=2),
    ):
        fresh = code_maps_for(
            slices, vqvae=vqvae_handle(other, "a" * 64), cache_file=cache, augment=changed
        )
        assert torch.equal(fresh.indices[:4], encode_slices(other, slices, CPU))
    # Drawn from the seed alone: the same settings give the same parameters on a fresh encode.
    fresh = code_maps_for(
        slices, vqvae=vqvae_handle(other, "a" * 64), cache_file=tmp_path / "b.pt", augment=augment
    )
    assert torch.equal(fresh.augmentation, first.augmentation)


def test_without_copies_the_augment_ranges_leave_the_plain_cache_alone(tmp_path):
    slices, cache = smooth_slices(3), tmp_path / "train.pt"
    first = code_maps_for(slices, vqvae=vqvae_handle(tiny_vqvae(), "a" * 64), cache_file=cache)
    stamp = torch.load(cache, weights_only=True)["stamp"]
    assert "augment" not in stamp
    no_copies = AugmentConfig(copies=0, max_shift=0.2)
    again = code_maps_for(
        slices,
        vqvae=vqvae_handle(tiny_vqvae(seed=9), "a" * 64),
        cache_file=cache,
        augment=no_copies,
    )
    assert torch.equal(again.indices, first.indices)
    assert again.augmentation is None and again.source is None


def test_code_maps_built_positionally_are_plain():
    codes = CodeMaps(torch.zeros((3, *GRID), dtype=torch.long), ["a", "b", "c"], torch.zeros(3), 16)
    assert torch.equal(codes.augmentation_parameters, torch.zeros((3, A)))
    assert torch.equal(codes.source_slices, torch.arange(3))
    assert codes.maps_per_slice == 1
    assert codes.changed_share_by_copy() == []
    assert torch.equal(codes.plain().indices, codes.indices)


def test_the_share_of_codes_changed_by_each_copy_is_logged(tmp_path, caplog):
    slices = smooth_slices(5)
    augment = AugmentConfig(copies=2, max_shift=0.1)
    with caplog.at_level("INFO", logger="mri_vqvae.code_maps"):
        codes = code_maps_for(
            slices,
            vqvae=vqvae_handle(tiny_vqvae(), "a" * 64),
            cache_file=tmp_path / "t.pt",
            batch_size=2,
            augment=augment,
        )
    shares = codes.changed_share_by_copy()
    assert len(shares) == 2 and all(0 < share <= 1 for share in shares)
    assert "2 augmented copies per slice" in caplog.text and "copy 2" in caplog.text


def test_a_prior_run_augments_only_the_training_split(phantom_root, tmp_path):
    from pathlib import Path

    from mri_vqvae.code_maps import encode_splits
    from mri_vqvae.config import Config, DataConfig
    from mri_vqvae.data.dataset import DataSources
    from mri_vqvae.trained import TrainedVQVAE

    config = Config(data=DataConfig(image_size=(64, 32)), model=tiny_model_config())
    vqvae = TrainedVQVAE(
        model=tiny_vqvae(),
        config=config,
        path=Path("vqvae.pt"),
        sha256="a" * 64,
        texture=None,
        data_reference=None,
    )
    codes = encode_splits(
        vqvae=vqvae,
        splits=DataSources(root=phantom_root).load(config.data),
        cache_folder=tmp_path / "codes",
        augment=AugmentConfig(copies=2),
    )
    assert len(codes["train"]) == 3 * 24 and codes["train"].maps_per_slice == 3
    for split in ("val", "test"):
        assert len(codes[split]) == 8 and codes[split].augmentation is None
