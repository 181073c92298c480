import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae.config import DataConfig
from mri_vqvae.data import dataset
from mri_vqvae.data.dataset import (
    hipmri_split_dirs,
    list_slices,
    load_split,
    postprocess,
    preprocess,
    resolve_split_files,
)
from mri_vqvae.data.nifti import DataError


def write(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return path


def noise(seed: int, shape=(40, 24)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) * 500 + 20


def test_hipmri_layout_ignores_mask_folders(phantom_root: Path):
    dirs = hipmri_split_dirs(phantom_root)
    assert {k: v.name for k, v in dirs.items()} == {
        "train": "keras_slices_train",
        "val": "keras_slices_validate",
        "test": "keras_slices_test",
    }
    files = resolve_split_files(phantom_root)
    assert all(f.name.startswith("case_") for split in files.values() for f in split)
    assert [len(files[s]) for s in ("train", "val", "test")] == [24, 8, 8]


def test_missing_split_and_empty_or_mask_folders(tmp_path: Path):
    (tmp_path / "keras_slices_train").mkdir()
    with pytest.raises(DataError, match="keras_slices_validate"):
        hipmri_split_dirs(tmp_path)
    with pytest.raises(DataError, match=r"holds no \.nii"):
        list_slices(tmp_path / "keras_slices_train")
    mask = tmp_path / "keras_slices_seg_train"
    write(mask, "seg_1.nii.gz", noise(0))
    with pytest.raises(DataError, match="segmentation mask folder"):
        list_slices(mask)
    with pytest.raises(ValueError, match="val, test"):
        resolve_split_files(None, train=tmp_path / "keras_slices_train")


def test_split_tensor_shape_range_and_names(tmp_path: Path):
    files = [write(tmp_path, f"s{i}.nii.gz", noise(i)) for i in range(3)]
    slices = load_split(files, DataConfig(image_size=(32, 16)))
    assert slices.images.shape == (3, 1, 32, 16)
    assert slices.batch([0, 2]).dtype == torch.float32
    assert slices.images.min() >= -1 and slices.images.max() <= 1
    native = load_split(files, DataConfig(image_size=(40, 24)))
    # At native size each slice spans the whole range (float16 storage rounds a little).
    torch.testing.assert_close(native.images.amin(dim=(1, 2, 3)).float(), -torch.ones(3))
    torch.testing.assert_close(native.images.amax(dim=(1, 2, 3)).float(), torch.ones(3))
    assert slices.names == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert slices.original_shapes == [(40, 24)] * 3


def test_second_load_comes_from_cache(tmp_path: Path, monkeypatch):
    files = [write(tmp_path, f"s{i}.nii.gz", noise(i)) for i in range(3)]
    config = DataConfig(image_size=(32, 16))
    first = load_split(files, config)

    def refuse(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(dataset, "read_slice", refuse)
    second = load_split(files, config)
    torch.testing.assert_close(first.images, second.images)
    assert second.names == first.names
    # A changed setting is a different cache entry, so it must decode (and here, refuse).
    with pytest.raises(AssertionError, match="decoded"):
        load_split(files, DataConfig(image_size=(48, 16)))


def test_a_slice_rewritten_with_the_same_size_and_time_is_decoded_again(tmp_path: Path):
    files = [write(tmp_path, f"s{i}.nii", noise(i)) for i in range(2)]  # .nii: a fixed size
    config = DataConfig(image_size=None)
    first = load_split(files, config)
    stat = files[0].stat()
    write(tmp_path, "s0.nii", noise(7))  # new pixels, same shape and type
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync leave it
    assert (files[0].stat().st_size, files[0].stat().st_mtime_ns) == (
        stat.st_size,
        stat.st_mtime_ns,
    )
    second = load_split(files, config)
    assert not torch.equal(first.images[0], second.images[0])
    torch.testing.assert_close(first.images[1], second.images[1])


def test_bad_file_is_named_or_skipped(tmp_path: Path):
    files = [write(tmp_path, f"s{i}.nii.gz", noise(i)) for i in range(3)]
    bad = tmp_path / "s1.nii.gz"
    bad.write_bytes(b"not nifti")
    with pytest.raises(DataError, match=r"s1\.nii\.gz"):
        load_split(files, DataConfig(image_size=(32, 16)))
    slices = load_split(files, DataConfig(image_size=(32, 16), skip_bad_files=True))
    assert slices.names == ["s0.nii.gz", "s2.nii.gz"]
    assert len(slices.skipped) == 1 and "s1.nii.gz" in slices.skipped[0]


def test_all_files_bad_is_an_error_even_when_skipping(tmp_path: Path):
    bad = tmp_path / "a.nii.gz"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="no usable slices"):
        load_split([bad], DataConfig(skip_bad_files=True))


def test_mixed_sizes_need_resizing(tmp_path: Path):
    files = [write(tmp_path, "a.nii.gz", noise(0)), write(tmp_path, "b.nii.gz", noise(1, (48, 24)))]
    with pytest.raises(DataError, match=r"b.nii.gz.*data.image_size"):
        load_split(files, DataConfig(image_size=None))
    slices = load_split(files, DataConfig(image_size=(32, 16)))
    assert slices.original_shapes == [(40, 24), (48, 24)]


def test_preprocess_then_postprocess_restores_the_slice():
    pixels = noise(4).astype(np.float32)
    image = preprocess(pixels, None)
    torch.testing.assert_close(image.amin(), torch.tensor(-1.0))
    torch.testing.assert_close(image.amax(), torch.tensor(1.0))
    restored = postprocess(image, pixels.shape, float(pixels.min()), float(pixels.max()))
    np.testing.assert_allclose(restored, pixels, rtol=1e-5, atol=1e-3)
    resized = postprocess(preprocess(pixels, (80, 48)), pixels.shape, pixels.min(), pixels.max())
    assert resized.shape == pixels.shape
