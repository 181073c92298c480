"""Native-size slices (data.image_size unset): every split must be the training split's size,
checked on the headers before any split is decoded, and again on what was decoded."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import SPLITS, load_splits, resolve_split_files
from mri_vqvae.data.nifti import DataError

FOLDERS = {
    "train": "keras_slices_train",
    "val": "keras_slices_validate",
    "test": "keras_slices_test",
}


def write_root(root: Path, shapes: dict[str, tuple[int, int]], count: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, shape in shapes.items():
        folder = root / FOLDERS[split]
        folder.mkdir(parents=True)
        for i in range(count):
            image = nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4))
            nib.save(image, str(folder / f"case_{i}_slice_{i}.nii.gz"))
    return root


# Each split other than train, at a size of its own, with every set of splits decoded.
MISMATCHES = [
    pytest.param(odd, loaded, id=f"{odd}-differs-loading-{'+'.join(loaded)}")
    for odd in ("val", "test")
    for loaded in (("train", "val"), SPLITS)
]


@pytest.mark.parametrize(("odd", "loaded"), MISMATCHES)
def test_splits_of_other_native_sizes_are_refused_before_decoding(
    tmp_path: Path, odd: str, loaded: tuple[str, ...]
):
    shapes = {split: (64, 32) for split in SPLITS}
    shapes[odd] = (48, 48)
    root = write_root(tmp_path / "data", shapes)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as refused:
        load_splits(
            resolve_split_files(root), DataConfig(image_size=None, cache_dir=str(cache)), loaded
        )
    message = str(refused.value)
    assert str(root / FOLDERS[odd]) in message
    assert f"the {odd} split's slices are 48x48 but the training split's are 64x32" in message
    assert "--size 64x32" in message
    assert not cache.exists()  # refused from the headers: nothing was decoded


def test_a_size_seen_only_after_decoding_is_refused_too(tmp_path: Path):
    # The first validation file is bad and skipped; the others are of another size.
    root = write_root(tmp_path / "data", {"train": (64, 32), "test": (64, 32)})
    val = root / FOLDERS["val"]
    val.mkdir()
    (val / "a_bad.nii.gz").write_bytes(b"not a nifti file")
    nib.save(
        nib.Nifti1Image(np.random.rand(48, 48).astype(np.float32), np.eye(4)), str(val / "b.nii")
    )
    config = DataConfig(image_size=None, skip_bad_files=True, use_cache=False)
    with pytest.raises(DataError, match="the val split's slices are 48x48"):
        load_splits(resolve_split_files(root), config, ("train", "val"))


ONE_SIZE = dict.fromkeys(SPLITS, (64, 32))
MIXED_SIZES = {"train": (64, 32), "val": (48, 48), "test": (32, 64)}


@pytest.mark.parametrize("shapes", [ONE_SIZE, MIXED_SIZES], ids=["one-size", "mixed-sizes"])
def test_one_native_size_or_a_resize_is_accepted(tmp_path: Path, shapes):
    root = write_root(tmp_path / "data", shapes)
    files = resolve_split_files(root)
    if shapes is ONE_SIZE:
        loaded = load_splits(files, DataConfig(image_size=None, use_cache=False))
        assert {s.image_size for s in loaded.values()} == {(64, 32)}
    loaded = load_splits(files, DataConfig(image_size=(32, 16), use_cache=False))
    assert {s.image_size for s in loaded.values()} == {(32, 16)}
