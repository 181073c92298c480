"""Bad input, tried systematically: header fields fuzzed against the NIfTI reader, and files
and folders a lab's disk really holds, through the loader and the command line."""

from __future__ import annotations

import os
import resource
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mri_vqvae.cli.main import main
from mri_vqvae.data.dataset import list_slices
from mri_vqvae.data.nifti import DataError, read_slice

# NIfTI-1 header fields (offset, struct format) a corrupt or hostile file may carry.
INT16_FIELDS = {
    "dim0": 40,
    "dim1": 42,
    "dim2": 44,
    "dim3": 46,
    "dim4": 48,
    "datatype": 70,
    "bitpix": 72,
}
FLOAT32_FIELDS = {"pixdim1": 80, "vox_offset": 108, "scl_slope": 112, "scl_inter": 116}


def valid_nifti_bytes() -> bytes:
    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(rng.random((32, 16)).astype(np.float32), np.eye(4))
    return image.to_bytes()


VALID = valid_nifti_bytes()

header_edits = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(sorted(INT16_FIELDS)), st.integers(-(2**15), 2**15 - 1)),
        st.tuples(
            st.sampled_from(sorted(FLOAT32_FIELDS)),
            st.floats(width=32, allow_nan=True, allow_infinity=True),
        ),
        st.tuples(st.integers(0, 347), st.integers(0, 255)),  # any header byte
    ),
    min_size=1,
    max_size=4,
)


def edited(edits) -> bytes:
    data = bytearray(VALID)
    for field, value in edits:
        if isinstance(field, int):
            data[field] = value
        elif field in INT16_FIELDS:
            struct.pack_into("<h", data, INT16_FIELDS[field], value)
        else:
            struct.pack_into("<f", data, FLOAT32_FIELDS[field], value)
    return bytes(data)


@pytest.mark.slow
@settings(
    max_examples=400,
    deadline=2000,  # a hang or a huge read fails the example
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(edits=header_edits)
def test_fuzzed_headers_load_correctly_or_raise_the_projects_error(tmp_path: Path, edits):
    path = tmp_path / "fuzzed.nii"
    path.write_bytes(edited(edits))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        result = read_slice(path)
    except DataError as err:
        assert err.path == path and str(path) in str(err)
    else:
        assert result.pixels.ndim == 2 and result.pixels.dtype == np.float32
        assert np.isfinite(result.pixels).all() and result.pixels.size <= 2**26
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, "reading one fuzzed header allocated over 512 MiB"


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def header_with(**fields) -> bytes:
    return edited(list(fields.items()))


def good(path: Path, array=None) -> Path:
    array = np.random.default_rng(1).random((32, 16)) if array is None else array
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


BAD_FILES = {
    "empty": (lambda p: write_raw(p, b""), "NIfTI"),
    "random bytes": (lambda p: write_raw(p, np.random.default_rng(2).bytes(2048)), "NIfTI"),
    "truncated gzip": (
        lambda p: write_raw(p, good(p.with_name("src.nii.gz")).read_bytes()[:300]),
        "truncated|corrupt|NIfTI",
    ),
    "negative dims": (lambda p: write_raw(p, header_with(dim1=-32)), "negative"),
    "terabyte dims": (
        lambda p: write_raw(p, header_with(dim0=3, dim1=30000, dim2=30000, dim3=30000)),
        "too large",
    ),
    "3D": (lambda p: good(p, np.random.default_rng(3).random((32, 16, 3))), "3D image"),
    "4D": (lambda p: good(p, np.random.default_rng(3).random((32, 16, 2, 2))), "4D image"),
    "NaN": (lambda p: good(p, np.full((32, 16), np.nan, np.float32)), "NaN"),
    "Inf": (lambda p: good(p, np.where(np.eye(32, 16) > 0, np.inf, 1.0)), "infinite"),
    "constant": (lambda p: good(p, np.ones((32, 16))), "constant"),
    "symlink loop": (lambda p: os.symlink(p.name, p), "symbolic link"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_each_bad_file_gets_a_named_error(tmp_path: Path, kind: str):
    make, problem = BAD_FILES[kind]
    suffix = ".nii" if kind in ("negative dims", "terabyte dims") else ".nii.gz"
    path = tmp_path / f"bad{suffix}"
    make(path)
    with pytest.raises(DataError, match=problem) as caught:
        read_slice(path)
    assert caught.value.path == path


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float64])
def test_integer_and_float64_slices_load_as_float32(tmp_path: Path, dtype):
    array = (np.arange(32 * 16).reshape(32, 16) % 200).astype(dtype)
    result = read_slice(good(tmp_path / "x.nii.gz", array))
    assert result.pixels.dtype == np.float32
    np.testing.assert_array_equal(result.pixels, array.astype(np.float32))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_named(tmp_path: Path):
    path = good(tmp_path / "locked.nii.gz")
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        read_slice(path)


def test_a_symlink_loop_in_a_folder_is_listed_and_refused(tmp_path: Path):
    good(tmp_path / "a.nii.gz")
    os.symlink("loop.nii.gz", tmp_path / "loop.nii.gz")
    files = list_slices(tmp_path)
    assert [f.name for f in files] == ["a.nii.gz", "loop.nii.gz"]
    with pytest.raises(DataError, match="symbolic link"):
        read_slice(files[1])


def hipmri(root: Path, bad: str | None = None) -> Path:
    """A tiny HipMRI-layout folder of good slices, with one bad file added to the test split."""
    rng = np.random.default_rng(4)
    for folder, count in (
        ("keras_slices_train", 8),
        ("keras_slices_validate", 2),
        ("keras_slices_test", 2),
    ):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            good(
                root / folder / f"case_{index:03d}_week_0_slice_{index}.nii.gz",
                rng.random((64, 32)),
            )
    if bad is not None:
        make, _ = BAD_FILES[bad]
        make(root / "keras_slices_test" / "zz_bad.nii.gz")
    return root


TINY = [
    "model.channels=8",
    "model.channel_multipliers=[1, 2]",
    "model.embedding_dim=4",
    "model.num_embeddings=16",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny VQ-VAE checkpoint, for the commands that need one."""
    root = tmp_path_factory.mktemp("good")
    hipmri(root / "data")
    run = root / "run"
    args = [
        "-q",
        "train",
        "--data",
        str(root / "data"),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--size",
        "64x32",
        "--device",
        "cpu",
        *TINY,
        "train.report=false",  # no report for the later commands to bring up to date
    ]
    assert main(args) == 0
    return run / "best.pt"


@pytest.mark.parametrize("kind", ["random bytes", "NaN", "3D", "symlink loop", "terabyte dims"])
def test_every_command_names_a_bad_slice_and_keeps_what_it_wrote(
    tmp_path: Path, trained: Path, kind: str, capsys
):
    data = hipmri(tmp_path / "data", bad=kind)
    bad_file = data / "keras_slices_test" / "zz_bad.nii.gz"
    previous = tmp_path / "eval" / "metrics.json"
    previous.parent.mkdir()
    previous.write_text("{}")  # an earlier result in the output folder
    commands = {
        "evaluate": [
            "evaluate",
            "--data",
            str(data),
            "--checkpoint",
            str(trained),
            "--out",
            str(tmp_path / "eval"),
            "--overwrite",  # even so, nothing is removed before the data has loaded
        ],
        "train-prior": [
            "train-prior",
            "--vqvae",
            str(trained),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "prior"),
        ],
        "reconstruct": [
            "reconstruct",
            str(bad_file),
            "--checkpoint",
            str(trained),
            "--out",
            str(tmp_path / "recon.nii.gz"),
        ],
    }
    for name, args in commands.items():
        assert main(["-q", *args]) == 2, name
        err = capsys.readouterr().err
        assert "zz_bad.nii.gz" in err and "error" in err, (name, err)
    assert previous.read_text() == "{}"
    assert not (tmp_path / "recon.nii.gz").exists()
    # With --skip-bad-files, evaluation goes on without the bad slice.
    assert main(["-q", *commands["evaluate"], "--skip-bad-files"]) == 0
    assert "zz_bad" not in (tmp_path / "eval" / "per_image_metrics.csv").read_text()


def test_a_mask_folder_or_missing_split_is_named(tmp_path: Path, trained: Path, capsys):
    data = hipmri(tmp_path / "data")
    (data / "keras_slices_seg_test").mkdir()
    args = ["-q", "evaluate", "--checkpoint", str(trained), "--out", str(tmp_path / "e")]
    assert main([*args, "--test", str(data / "keras_slices_seg_test")]) == 2
    assert "mask folder" in capsys.readouterr().err
    (data / "keras_slices_validate").rename(data / "elsewhere")
    assert main(["-q", "train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "keras_slices_validate" in capsys.readouterr().err
