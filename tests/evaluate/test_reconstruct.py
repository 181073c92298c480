"""One slice through a native-size VQ-VAE: sides its downsampling cannot halve are named."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.config import Config, DataConfig
from mri_vqvae.data.nifti import DataError
from mri_vqvae.evaluate.reconstruct import reconstruct_file
from mri_vqvae.model import VQVAE
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import tiny_model_config


def native_vqvae() -> TrainedVQVAE:
    config = Config(model=tiny_model_config(), data=DataConfig(image_size=None))
    return TrainedVQVAE(
        model=VQVAE.from_config(config.model).eval(),
        config=config,
        path=Path("vqvae.pt"),
        sha256="a" * 64,
        texture=None,
        data_reference=None,
    )


def write(path: Path, height: int, width: int) -> Path:
    pixels = np.random.default_rng(0).random((height, width)).astype(np.float32)
    nib.save(nib.Nifti1Image(pixels, np.eye(4)), str(path))
    return path


def test_a_slice_a_native_model_cannot_halve_is_named_not_a_traceback(tmp_path: Path):
    vqvae = native_vqvae()
    odd = write(tmp_path / "odd.nii.gz", 66, 30)
    with pytest.raises(DataError, match=r"odd\.nii\.gz: the given slices are 66x30.*divisible"):
        reconstruct_file(vqvae, odd, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
    even = write(tmp_path / "even.nii.gz", 64, 32)
    out = reconstruct_file(vqvae, even, tmp_path / "out.nii.gz")
    assert nib.load(str(out)).shape == (64, 32)
