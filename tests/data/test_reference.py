"""The training data's reference: each slice's header geometry is kept (in the cache too), the
most common geometry wins, and the intensity range is the median of the slices' ranges."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import SliceSet, concat_slice_sets, load_split
from mri_vqvae.data.nifti import SliceGeometry
from mri_vqvae.data.reference import DataReference, data_reference


def oblique_affine(origin=(-90.0, 30.0, 12.0), spacing=(0.8, 0.6, 2.5)) -> np.ndarray:
    """A rotated, anisotropic voxel-to-world matrix, as a scanner's slice might carry."""
    angle = np.deg2rad(10)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def write_training_slice(
    path: Path, seed: int, affine: np.ndarray, shape=(48, 24, 1), low=0.0, high=3000.0
) -> Path:
    """A slice stored as a scanner would: int16 in millimetres, sform and qform set, with
    intensities spanning [low, high]."""
    rng = np.random.default_rng(seed)
    pixels = rng.random(shape)
    pixels = low + (pixels - pixels.min()) / (pixels.max() - pixels.min()) * (high - low)
    image = nib.Nifti1Image(pixels.round().astype(np.int16), affine)
    image.header.set_xyzt_units(xyz="mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def test_each_slice_keeps_its_header_geometry_through_the_cache(tmp_path: Path):
    affine = oblique_affine()
    files = [write_training_slice(tmp_path / f"s{i}.nii.gz", i, affine) for i in range(2)]
    config = DataConfig(image_size=(64, 32), cache_dir=str(tmp_path / "cache"))
    decoded = load_split(files, config)
    cached = load_split(files, config)
    assert cached.geometries == decoded.geometries and len(decoded.geometries) == 2
    geometry = decoded.geometries[0]
    header = nib.load(str(files[0])).header
    assert geometry.stored_shape == (48, 24, 1) and geometry.shape == (48, 24)
    np.testing.assert_allclose(geometry.affine, affine, atol=1e-5)
    assert geometry.zooms == tuple(float(z) for z in header.get_zooms())
    assert (geometry.spatial_unit, geometry.sform_code, geometry.qform_code) == ("mm", 1, 1)


def test_the_reference_is_the_training_slices_geometry_and_median_range(tmp_path: Path):
    affine = oblique_affine()
    ranges = [(0, 3000), (10, 2900), (200, 3000)]
    files = [
        write_training_slice(tmp_path / f"s{i}.nii.gz", i, affine, low=low, high=high)
        for i, (low, high) in enumerate(ranges)
    ]
    reference = data_reference(load_split(files, DataConfig(image_size=(64, 32))))
    assert reference is not None
    assert reference.shape == (48, 24) and reference.num_slices == 3
    assert (reference.geometry_count, reference.affine_count) == (3, 3)
    assert reference.intensity_range == (10.0, 3000.0)  # the medians of the minima and maxima
    assert "3 training slices" in reference.describe_geometry()
    # Plain values survive the trip into a checkpoint's extras and back.
    assert DataReference.from_plain(reference.to_plain()) == reference


def test_mixed_geometries_pick_the_most_common(tmp_path: Path):
    common, rare = oblique_affine(), np.diag([1.0, 1.0, 3.0, 1.0])
    moved = oblique_affine(origin=(-90.0, 30.0, 14.5))  # the next slice of the same volume
    slices = [
        write_training_slice(tmp_path / "a0.nii.gz", 0, common),
        write_training_slice(tmp_path / "a1.nii.gz", 1, moved),
        write_training_slice(tmp_path / "a2.nii.gz", 2, common),
        write_training_slice(tmp_path / "b0.nii.gz", 3, rare, shape=(40, 40)),
        write_training_slice(tmp_path / "b1.nii.gz", 4, rare, shape=(40, 40)),
    ]
    reference = data_reference(load_split(slices, DataConfig(image_size=(64, 32))))
    # Three slices share a shape, spacing and orientation (their origins differ along the
    # slice axis); two of them share the whole affine, which is the one kept.
    assert reference.shape == (48, 24)
    assert (reference.num_slices, reference.geometry_count, reference.affine_count) == (5, 3, 2)
    np.testing.assert_allclose(reference.geometry.affine, common, atol=1e-5)
    assert "3 share its shape" in reference.describe_geometry()


def test_a_split_without_headers_has_no_reference_and_joins_without_geometries(tmp_path):
    in_memory = SliceSet(
        torch.zeros(2, 1, 16, 16).half(), ["a", "b"], [(16, 16)] * 2, torch.ones(2, 2)
    )
    assert data_reference(in_memory) is None
    files = [write_training_slice(tmp_path / "s.nii.gz", 0, np.eye(4), shape=(16, 16))]
    read = load_split(files, DataConfig(image_size=(16, 16)))
    assert len(concat_slice_sets([read, read]).geometries) == 2
    assert concat_slice_sets([read, in_memory]).geometries == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda plain: plain["geometry"].update(affine=[[1.0, 0.0]]),
        lambda plain: plain["geometry"].update(stored_shape=[48, 24, 3]),
        lambda plain: plain["geometry"].update(zooms=[1.0]),
        lambda plain: plain.update(intensity_range=[5.0, 5.0]),
        lambda plain: plain.pop("num_slices"),
    ],
)
def test_an_edited_reference_is_refused(edit):
    geometry = SliceGeometry(
        (48, 24),
        ((1.0, 0, 0, 0), (0, 1.0, 0, 0), (0, 0, 1.0, 0), (0, 0, 0, 1.0)),
        (1.0, 1.0),
        "mm",
        1,
        1,
    )
    plain = DataReference(geometry, (0.0, 1.0), 1, 1, 1).to_plain()
    edit(plain)
    with pytest.raises((ValueError, KeyError, TypeError)):
        DataReference.from_plain(plain)
