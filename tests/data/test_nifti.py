import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.data.nifti import DataError, read_slice, write_slice


def save(array: np.ndarray, path: Path, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def ramp(height=32, width=16, dtype=np.float32) -> np.ndarray:
    return np.arange(height * width, dtype=np.float64).reshape(height, width).astype(dtype)


def test_reads_a_2d_slice_with_its_affine(tmp_path: Path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    result = read_slice(save(ramp(), tmp_path / "a.nii.gz", affine))
    np.testing.assert_array_equal(result.pixels, ramp())
    np.testing.assert_array_equal(result.affine, affine)
    assert result.pixels.dtype == np.float32


def test_singleton_axis_counts_as_2d(tmp_path: Path):
    result = read_slice(save(ramp()[:, :, None], tmp_path / "a.nii"))
    assert result.pixels.shape == (32, 16)


def test_integer_data_is_read_as_float(tmp_path: Path):
    result = read_slice(save(ramp(dtype=np.int16), tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(result.pixels, ramp())


def test_rgb_becomes_luma(tmp_path: Path):
    rgb = np.zeros((32, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 100, 50, 10
    rgb[0, 0] = (0, 0, 0)
    result = read_slice(save(rgb, tmp_path / "rgb.nii.gz"))
    assert result.pixels[1, 1] == pytest.approx(0.299 * 100 + 0.587 * 50 + 0.114 * 10, abs=1e-3)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: save(np.ones((32, 16, 4), np.float32) * np.arange(4), p), "3D image"),
        (lambda p: save(ramp()[..., None, None] * np.ones((1, 1, 2, 2)), p), "4D image"),
        (lambda p: save(np.where(ramp() > 5, ramp(), np.nan).astype(np.float32), p), "NaN"),
        (lambda p: save(np.where(ramp() > 5, ramp(), np.inf).astype(np.float32), p), "infinite"),
        (lambda p: save(np.full((32, 16), 7.0, np.float32), p), "constant"),
        (lambda p: save(ramp(4, 16), p), "too small"),
        (lambda p: p.write_bytes(b""), "NIfTI"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "NIfTI"),
    ],
    ids=["3d", "4d", "nan", "inf", "constant", "tiny", "empty", "random-bytes"],
)
def test_bad_files_raise_data_error_naming_file(tmp_path: Path, make, problem: str):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(DataError, match=problem) as caught:
        read_slice(path)
    assert caught.value.path == path
    assert str(path) in str(caught.value)


def test_truncated_gzip(tmp_path: Path):
    good = save(np.random.default_rng(0).random((64, 64)).astype(np.float32), tmp_path / "g.nii.gz")
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t\.nii\.gz"):
        read_slice(truncated)


def test_gzip_of_not_nifti(tmp_path: Path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"hello, not an image" * 40))
    with pytest.raises(DataError, match=r"text\.nii\.gz"):
        read_slice(path)


def test_missing_file_and_folder(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        read_slice(tmp_path / "missing.nii.gz")
    folder = tmp_path / "dir.nii.gz"
    folder.mkdir()
    with pytest.raises(DataError, match="folder"):
        read_slice(folder)


def test_write_keeps_affine_and_header_and_float_values(tmp_path: Path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    source = save(ramp(dtype=np.int16), tmp_path / "in.nii.gz", affine)
    header = nib.load(str(source)).header
    values = ramp() + 0.25
    write_slice(values, tmp_path / "out.nii.gz", affine, header)
    written = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(written.get_fdata(), values)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.header.get_zooms() == header.get_zooms()


def test_write_refuses_a_non_nifti_name(tmp_path: Path):
    with pytest.raises(DataError, match="must end in"):
        write_slice(ramp(), tmp_path / "out.png")
