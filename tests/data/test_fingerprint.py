"""A split's fingerprint: its files by the bytes they hold, taken from the hashes the cache
already computes, and the check that refuses to resume a run on other slices."""

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.config import DataConfig
from mri_vqvae.data import dataset
from mri_vqvae.data.dataset import list_slices, load_split
from mri_vqvae.data.fingerprint import (
    SplitFingerprint,
    check_resumed_data,
    fingerprints_from_plain,
    fingerprints_to_plain,
)
from mri_vqvae.errors import ConfigError


def write_slices(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = nib.Nifti1Image(rng.random((16, 8)).astype(np.float32), np.eye(4))
        nib.save(image, str(folder / f"case_{i}_slice_{i}.nii.gz"))
    return list_slices(folder)


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_file_is_hashed_once_for_the_cache_and_the_fingerprint(
    tmp_path: Path, monkeypatch, use_cache: bool
):
    files = write_slices(tmp_path / "train", 3)
    hashed = []
    real = dataset._content_digest
    monkeypatch.setattr(dataset, "_content_digest", lambda p: hashed.append(p) or real(p))
    config = DataConfig(image_size=None, use_cache=use_cache, cache_dir=str(tmp_path / "c"))
    first = load_split(files, config, label="train")
    assert sorted(hashed) == files
    second = load_split(files, config, label="train")  # from the cache when it is on
    assert first.fingerprint == second.fingerprint is not None
    assert first.fingerprint.num_files == 3
    assert first.fingerprint.folder == str(tmp_path / "train")


def test_the_fingerprint_follows_the_bytes_not_the_folder_or_names(tmp_path: Path):
    files = write_slices(tmp_path / "a", 3)
    config = DataConfig(image_size=None, use_cache=False)
    original = load_split(files, config).fingerprint
    moved = tmp_path / "b"
    moved.mkdir()
    for i, path in enumerate(reversed(files)):  # other names, in another order
        shutil.copy(path, moved / f"renamed_{i}.nii.gz")
    assert load_split(list_slices(moved), config).fingerprint.same_data(original)
    # One voxel changed in one file is other data.
    image = nib.load(str(files[1]))
    pixels = np.asarray(image.dataobj).copy()
    pixels[0, 0] += 1
    nib.save(nib.Nifti1Image(pixels, image.affine), str(files[1]))
    changed = load_split(files, config).fingerprint
    assert not changed.same_data(original)
    assert changed.shared_with(original) == 2


def test_fingerprints_survive_their_plain_form():
    prints = {"train": SplitFingerprint.of_files("/data/train", ["bb", "aa"])}
    assert fingerprints_from_plain(fingerprints_to_plain(prints)) == prints


@pytest.mark.parametrize(
    "plain",
    [
        [],
        {"train": []},
        {"train": {"folder": "x"}},
        {"train": {"folder": "x", "file_digests": "abc"}},
        {"train": {"folder": "x", "file_digests": [1, 2]}},
        {"train": {"folder": "x", "file_digests": ["../../etc"]}},
        {"train": {"folder": "x", "file_digests": ["a" * 1000]}},
    ],
)
def test_an_edited_record_of_fingerprints_is_refused(plain):
    with pytest.raises((KeyError, TypeError, ValueError)):
        fingerprints_from_plain(plain)


def fingerprint(folder: str, *digests: str) -> SplitFingerprint:
    return SplitFingerprint.of_files(folder, list(digests))


def test_resuming_on_other_slices_is_refused_naming_the_run_and_what_differs():
    saved = {"train": fingerprint("/a", "01", "02", "03"), "val": fingerprint("/v", "09")}
    given = {"train": fingerprint("/b", "02", "07"), "val": fingerprint("/v", "09")}
    with pytest.raises(ConfigError) as refused:
        check_resumed_data(saved, given, run="runs/x")
    message = str(refused.value)
    assert message.startswith("--resume: runs/x was trained on 3 slices in /a")
    assert "the train split given holds 2 in /b" in message
    assert "1 of them among those" in message
    assert saved["train"].digest in message and given["train"].digest in message
    assert "validated" not in message  # the validation split is the same
    assert "start a new run" in message


def test_resuming_on_the_same_bytes_elsewhere_goes_on(caplog):
    saved = {"train": fingerprint("/a", "01", "02")}
    with caplog.at_level(logging.INFO, logger="mri_vqvae"):
        check_resumed_data(saved, {"train": fingerprint("/b", "02", "01")}, run="runs/x")
    assert "read from /b now (/a then)" in caplog.text


def test_a_run_without_fingerprints_resumes_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        check_resumed_data(None, {"train": fingerprint("/b", "01")}, run="runs/old")
    assert "runs/old records no fingerprint of its training slices" in caplog.text
    caplog.clear()
    # Slices built in memory have none to compare: nothing to say.
    check_resumed_data(None, {}, run="runs/old")
    assert caplog.text == ""
