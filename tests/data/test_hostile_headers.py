"""Slices whose headers give voxel sizes or affines that cannot place them (NaN, inf, 0, -1 in
pixdim, the sform rows or the qform): the voxels are good training data, so the slices are
kept with a usable geometry and one warning per split, or refused naming the file where
nibabel cannot open the header at all; never a traceback, never a NaN in the cache, the
reference or a written sample."""

import gzip
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import load_split
from mri_vqvae.data.nifti import DataError, SliceGeometry, read_slice, write_slice_in_geometry
from mri_vqvae.data.reference import DataReference, data_reference

BAD_VALUES = [np.nan, np.inf, -np.inf, 0.0, -1.0]
SPACING = (0.8, 0.6, 2.5)


def _edit(field: str, value: float, forms: tuple[int, int]):
    """A header edit: ``field`` (``name`` or ``name[index]``) set to ``value``, with the
    sform and qform codes ``forms`` so that nibabel builds its affine from that field."""

    def edit(header: nib.Nifti1Header) -> None:
        header["sform_code"], header["qform_code"] = forms
        name, _, index = field.partition("[")
        if index:
            header[name][int(index.rstrip("]"))] = value
        else:
            header[name] = value

    return edit


# Every voxel-size and affine field of the header, each read through the form that uses it:
# pixdim by all three (the sform ignores it but keeps it as the voxel size), the sform rows
# by the sform, the quaternion and offsets by the qform.
HOSTILE_FIELDS = [
    *[(f"pixdim[{i}]", forms) for i in (0, 1, 2, 3) for forms in ((1, 1), (0, 1), (0, 0))],
    *[(f"srow_{axis}[{i}]", (1, 0)) for axis in "xyz" for i in (0, 1, 2, 3)],
    *[(name, (0, 1)) for name in ("quatern_b", "quatern_d", "qoffset_x", "qoffset_z")],
]
CASES = [
    pytest.param(field, value, forms, id=f"{field}={value}-sform{forms[0]}-qform{forms[1]}")
    for field, forms in HOSTILE_FIELDS
    for value in BAD_VALUES
]


def write_hostile_slice(path: Path, seed: int, edit=None) -> Path:
    """A good 2D slice with an oblique, anisotropic affine whose raw header bytes are then
    edited (nibabel's own writer would repair or refuse the values)."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-40.0, 10.0, 5.0)
    pixels = np.random.default_rng(seed).random((32, 16, 1)).astype(np.float32)
    image = nib.Nifti1Image(pixels, affine)
    image.header.set_xyzt_units(xyz="mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    raw = image.to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    if edit is not None:
        edit(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock) :]))
    return path


def assert_usable(geometry: SliceGeometry) -> None:
    affine = np.asarray(geometry.affine)
    zooms = np.asarray(geometry.zooms)
    assert np.isfinite(affine).all() and np.linalg.matrix_rank(affine[:3, :3]) == 3
    assert np.isfinite(zooms).all() and (zooms > 0).all()


@pytest.mark.parametrize(("field", "value", "forms"), CASES)
def test_a_hostile_voxel_size_or_affine_is_kept_usable_or_named(
    tmp_path: Path, caplog, field, value, forms
):
    bad = write_hostile_slice(tmp_path / "train" / "bad.nii.gz", 0, _edit(field, value, forms))
    good = [write_hostile_slice(tmp_path / "train" / f"good{i}.nii.gz", i + 1) for i in range(2)]
    config = DataConfig(image_size=None, cache_dir=str(tmp_path / "cache"))
    try:
        read_slice(bad)
    except DataError as err:
        # nibabel cannot open some headers at all (an infinite quaternion is no rotation):
        # the file and the field are named, and data.skip_bad_files can leave it out.
        assert err.path == bad and field.startswith("quatern_"), err
        assert "qform quaternion" in err.problem
        return
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        decoded = load_split([bad, *good], config, label="train")
    cached = load_split([bad, *good], config, label="train")
    assert cached.geometries == decoded.geometries
    for geometry in decoded.geometries:
        assert_usable(geometry)
    repaired = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(repaired) <= 1  # one line for the split, whatever the number of slices
    if repaired:
        assert str(bad) in repaired[0].getMessage()
    # Samples are written in the reference's geometry: nibabel must be able to write it.
    reference = DataReference.from_plain(data_reference(decoded).to_plain())
    sample = tmp_path / "sample.nii.gz"
    write_slice_in_geometry(np.zeros(reference.shape, np.float32), sample, reference.geometry)
    assert np.isfinite(nib.load(str(sample)).affine).all()


@pytest.mark.parametrize(
    ("field", "value", "forms", "named"),
    [
        ("pixdim[1]", np.nan, (1, 1), "pixdim[1] (a voxel size) is nan"),
        ("pixdim[2]", np.inf, (1, 0), "pixdim[2] (a voxel size) is inf"),
        ("srow_x[0]", np.nan, (1, 0), "the affine from its sform"),
        ("srow_z[2]", 0.0, (1, 0), "singular"),
        ("qoffset_x", np.nan, (0, 1), "the affine from its qform"),
        ("pixdim[1]", np.nan, (0, 0), "the affine from its voxel sizes"),
    ],
)
def test_the_warning_names_the_file_and_the_field(
    tmp_path: Path, caplog, field, value, forms, named
):
    files = [
        write_hostile_slice(tmp_path / f"s{i}.nii.gz", i, _edit(field, value, forms))
        for i in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        slices = load_split(files, DataConfig(image_size=None, use_cache=False), label="train")
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert warning.startswith("train: 3 of 3 slices")
    assert f"{files[0]}: " in warning and named in warning
    for geometry in slices.geometries:
        assert_usable(geometry)


def test_a_bad_voxel_size_is_taken_from_a_good_affine(tmp_path: Path):
    path = write_hostile_slice(tmp_path / "s.nii.gz", 0, _edit("pixdim[1]", np.nan, (1, 1)))
    (geometry,) = load_split([path], DataConfig(image_size=None, use_cache=False)).geometries
    np.testing.assert_allclose(
        geometry.zooms, SPACING[:2] + (SPACING[2],)[: len(geometry.zooms) - 2], rtol=1e-6
    )
    assert (geometry.sform_code, geometry.qform_code, geometry.spatial_unit) == (1, 1, "mm")


def test_a_bad_affine_leaves_the_slice_unoriented_at_its_voxel_sizes(tmp_path: Path):
    path = write_hostile_slice(tmp_path / "s.nii.gz", 0, _edit("srow_y[1]", np.nan, (1, 0)))
    (geometry,) = load_split([path], DataConfig(image_size=None, use_cache=False)).geometries
    np.testing.assert_allclose(np.diag(geometry.affine)[:3], SPACING, rtol=1e-6)
    assert (geometry.sform_code, geometry.qform_code) == (0, 0)
