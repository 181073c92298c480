"""Data that changes under a resume, odd headers and native sizes, through ``train`` and
``train_prior``: a run resumed on other slices is refused naming the run and what differs;
slices with unusable voxel sizes train; native slices the model cannot take are refused in
one line naming a slice, its size and the multiple needed."""

import gzip
import io
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae.checkpoint import (
    load_checkpoint,
    load_prior_checkpoint,
    read_data_reference,
    read_training_data,
    save_checkpoint,
)
from mri_vqvae.cli.main import main
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.data.fingerprint import TRAINING_DATA, SplitFingerprint
from mri_vqvae.data.nifti import DataError
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import build_prior
from mri_vqvae.train.vqvae import train_vqvae
from tests.helpers import tiny_config, train_args
from tests.train.test_prior import (
    GRID,
    NUM_CODES,
    fit_prior,
    patterned_codes,
    prior_config,
    saved_vqvae,
)

TRAIN = "keras_slices_train"


def copy_data(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def set_header_field(path: Path, name: str, index: int, value: float) -> None:
    """Edit one header value in the file's bytes, as a careless converter might write it."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    header[name][index] = value
    path.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock) :]))


def test_resuming_on_other_training_slices_is_refused(phantom_root: Path, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    saved = read_training_data(load_checkpoint(run / "last.pt"), run / "last.pt")
    assert saved["train"].num_files == 24 and saved["val"].num_files == 8
    # Another data set: the same layout, one training slice left out and one changed.
    other = copy_data(phantom_root, tmp_path / "other")
    slices = sorted((other / TRAIN).iterdir())
    slices[0].unlink()
    set_header_field(slices[1], "pixdim", 1, 0.5)
    capsys.readouterr()
    assert main(train_args(other, run, "--resume", "--epochs", "2")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error  # one line
    assert f"--resume: {run} was trained on 24 slices in {phantom_root / TRAIN}" in error
    assert f"the train split given holds 23 in {other / TRAIN}" in error
    assert "22 of them among those" in error and "validated" not in error
    assert load_checkpoint(run / "last.pt").progress.epoch == 1  # nothing was trained


def test_resuming_on_the_same_slices_moved_goes_on(phantom_root: Path, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    moved = copy_data(phantom_root, tmp_path / "moved")
    assert main(train_args(moved, run, "--resume", "--epochs", "2")) == 0
    assert load_checkpoint(run / "last.pt").progress.epoch == 2
    # A checkpoint from before fingerprints were kept resumes, with a warning.
    checkpoint = load_checkpoint(run / "last.pt")
    del checkpoint.extras[TRAINING_DATA]
    save_checkpoint(checkpoint, run / "last.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        assert main(train_args(moved, run, "--resume", "--epochs", "3")) == 0
    assert "records no fingerprint of its training slices" in caplog.text
    assert read_training_data(load_checkpoint(run / "last.pt"), run) is not None


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0, -1.0])
def test_slices_with_unusable_voxel_sizes_train(phantom_root: Path, tmp_path, caplog, value):
    data = copy_data(phantom_root, tmp_path / "data")
    for i, path in enumerate(sorted((data / TRAIN).iterdir())):
        set_header_field(path, "pixdim", 1 + i % 3, value)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        assert main(train_args(data, run, "--epochs", "1")) == 0
    reference = read_data_reference(load_checkpoint(run / "best.pt"), run / "best.pt")
    assert np.isfinite(reference.geometry.zooms).all() and min(reference.geometry.zooms) > 0
    assert np.isfinite(reference.geometry.affine).all()
    if not np.isfinite(value):  # nibabel itself takes 0 as 1 and -1 as 1
        # The phantom's slices are stored 2D: pixdim[3] (every third slice's) is not read.
        assert "train: 16 of 24 slices have header voxel sizes" in caplog.text


def test_native_slices_of_sides_the_model_cannot_halve_are_refused(tmp_path, capsys):
    root = tmp_path / "data"
    for folder in (TRAIN, "keras_slices_validate", "keras_slices_test"):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            image = nib.Nifti1Image(np.random.rand(66, 30).astype(np.float32), np.eye(4))
            nib.save(image, str(root / folder / f"s{i}.nii.gz"))
    assert main(train_args(root, tmp_path / "run", "--size", "native")) == 2
    error = capsys.readouterr().err
    assert f"{root / TRAIN / 's0.nii.gz'}: the training slices are 66x30" in error
    assert "divisible by 4" in error and "--size 64x32" in error
    assert not (tmp_path / "run" / "last.pt").exists()


def test_validation_slices_the_model_cannot_halve_are_refused(tmp_path: Path):
    def slices(height: int, width: int) -> SliceSet:
        images = torch.zeros(2, 1, height, width, dtype=torch.float16)
        return SliceSet(images, ["a", "b"], [(height, width)] * 2, torch.zeros(2, 2))

    with pytest.raises(DataError, match=r"^a: the validation slices are 62x32.*divisible by 4"):
        train_vqvae(
            VQVAE.from_config(tiny_config().model),
            train_set=slices(64, 32),
            val_set=slices(62, 32),
            config=tiny_config(),
            run_dir=tmp_path / "run",
            device=torch.device("cpu"),
        )
    assert not (tmp_path / "run").exists()


def test_a_prior_resumed_on_other_slices_is_refused(tmp_path: Path, caplog):
    vqvae = saved_vqvae(tmp_path / "vqvae.pt")
    train, val = patterned_codes(8, 1), patterned_codes(8, 2)
    given = {"train": SplitFingerprint.of_files("/a/train", ["01", "02"])}

    def run(epochs: int, training_data, resume=None):
        torch.manual_seed(0)
        config = prior_config(epochs=epochs, sample_every=0)
        prior = build_prior(config.prior, NUM_CODES, GRID)
        out = tmp_path / "prior"
        return fit_prior(
            prior, train, val, config, out, vqvae, training_data=training_data, resume=resume
        )

    run(1, given)
    last = load_prior_checkpoint(tmp_path / "prior" / "last.pt")
    assert read_training_data(last, "last.pt") == given
    other = {"train": SplitFingerprint.of_files("/b/train", ["02", "03", "04"])}
    with pytest.raises(ValueError, match=r"was trained on 2 slices in /a/train .* 1 of them"):
        run(2, other, resume=last)
    assert run(2, given, resume=last).history[-1]["epoch"] == 2
    # A prior from before fingerprints were kept resumes, with a warning.
    last = load_prior_checkpoint(tmp_path / "prior" / "last.pt")
    last = replace(last, extras={k: v for k, v in last.extras.items() if k != TRAINING_DATA})
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        assert run(3, other, resume=last).history[-1]["epoch"] == 3
    assert "records no fingerprint" in caplog.text
