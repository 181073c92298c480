"""Sample files that fit beside the training slices: their geometry, shape and intensity scale
come from the VQ-VAE's record of its training data; an old VQ-VAE without one falls back to
[0, 1] images and says so."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae import workflows
from mri_vqvae.checkpoint import DATA_REFERENCE, CheckpointError
from mri_vqvae.config import Config, DataConfig, SampleConfig
from mri_vqvae.data.dataset import list_slices, load_split
from mri_vqvae.data.nifti import read_slice
from mri_vqvae.data.reference import DataReference, data_reference
from mri_vqvae.errors import InputError
from mri_vqvae.evaluate.samples import sample_files
from mri_vqvae.files import SAMPLES, OutputError, OutputFolder
from mri_vqvae.generate.samples import NO_REFERENCE, SampleRun, draw_samples, write_samples
from mri_vqvae.records import RecordError
from mri_vqvae.records.samples import SampleMetadata
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE
from tests.data.test_reference import oblique_affine, write_training_slice
from tests.helpers import TINY_SIZE, tiny_model_files


@pytest.fixture
def training_reference(tmp_path: Path) -> tuple[DataReference, Path]:
    """The reference of three 48x24 int16 slices in [0, 3000] (resized to 64x32 at load), and
    one of their files."""
    files = [
        write_training_slice(tmp_path / "train" / f"s{i}.nii.gz", i, oblique_affine())
        for i in range(3)
    ]
    slices = load_split(files, DataConfig(image_size=TINY_SIZE, use_cache=False))
    return data_reference(slices), files[0]


def decoded_run(folder: Path, reference: DataReference, count: int = 3) -> tuple[SampleRun, Path]:
    """``count`` samples of tiny untrained models whose VQ-VAE records ``reference``, as
    ``sample`` draws them, with random images in [-1, 1] in place of the decoded ones; and
    the VQ-VAE's file."""
    vqvae_path, prior_path = tiny_model_files(folder, {DATA_REFERENCE: reference.to_plain()})
    vqvae = TrainedVQVAE.load(vqvae_path)
    prior = TrainedPrior.load(prior_path, vqvae=vqvae)
    run = draw_samples(vqvae=vqvae, prior=prior, settings=SampleConfig(num_samples=count))
    images = torch.rand(count, 1, *TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return replace(run, images=images), vqvae_path


def test_samples_carry_the_training_slices_geometry_and_scale(training_reference, tmp_path):
    reference, training_file = training_reference
    run, _ = decoded_run(tmp_path, reference)
    out = write_samples(run, tmp_path / "samples", reference)
    training = nib.load(str(training_file))
    sample = nib.load(str(out / "sample_0001.nii.gz"))
    # Decoded at 64x32, written back at the training slices' native 48x24 (stored 48x24x1).
    assert sample.shape == training.shape == (48, 24, 1)
    np.testing.assert_allclose(sample.affine, training.affine, atol=1e-5)
    assert sample.header.get_zooms() == training.header.get_zooms()
    assert sample.header.get_xyzt_units()[0] == "mm"
    assert int(sample.header["sform_code"]) == int(training.header["sform_code"]) == 1
    assert sample.get_data_dtype() == np.float32
    pixels = read_slice(out / "sample_0001.nii.gz").pixels
    low, high = reference.intensity_range
    assert low <= pixels.min() and pixels.max() <= high + 1e-3
    assert pixels.max() > 1000  # the training scale, not [0, 1]
    summary = SampleMetadata.read(out / "samples.json")
    assert "pixel_range" not in json.loads((out / "samples.json").read_text())
    assert summary.geometry.shape == (48, 24) and summary.geometry.resized
    assert summary.geometry.source.startswith("the most common geometry among 3 training")
    assert summary.intensities.range == reference.intensity_range
    assert "median" in summary.intensities.source


def test_samples_at_native_size_load_as_evaluate_samples_loads_them(training_reference, tmp_path):
    reference, _ = training_reference
    run, _ = decoded_run(tmp_path, reference)
    out = write_samples(run, tmp_path / "samples", reference)
    # evaluate-samples reads the folder at the VQ-VAE's image size, each slice min-max
    # scaled as a training slice is, whatever its intensity scale on disk.
    loaded = load_split(list_slices(out), DataConfig(image_size=TINY_SIZE, use_cache=False))
    assert loaded.images.shape == (3, 1, *TINY_SIZE) and not loaded.skipped
    assert loaded.images.min() >= -1 and loaded.images.max() <= 1
    assert (loaded.images.amax(dim=(1, 2, 3)) - loaded.images.amin(dim=(1, 2, 3))).min() > 1


SETTINGS = Config(sample=SampleConfig(num_samples=2, device="cpu"))


def test_sample_uses_the_reference_the_vqvae_recorded(training_reference, tmp_path):
    reference, training_file = training_reference
    vqvae, prior = tiny_model_files(tmp_path, {DATA_REFERENCE: reference.to_plain()})
    workflows.sample(vqvae, prior, tmp_path / "samples", SETTINGS)
    sample = nib.load(str(tmp_path / "samples" / "sample_0000.nii.gz"))
    np.testing.assert_allclose(sample.affine, nib.load(str(training_file)).affine, atol=1e-5)
    assert sample.shape == (48, 24, 1) and sample.get_fdata().max() > 1


def test_an_old_vqvae_without_a_reference_falls_back_and_says_so(tmp_path, caplog):
    vqvae, prior = tiny_model_files(tmp_path, {})
    with caplog.at_level(logging.WARNING, logger="mri_vqvae"):
        workflows.sample(vqvae, prior, tmp_path / "samples", SETTINGS)
    assert "records no reference of its training slices" in caplog.text
    sample = nib.load(str(tmp_path / "samples" / "sample_0000.nii.gz"))
    assert sample.shape == TINY_SIZE
    np.testing.assert_array_equal(sample.affine, np.eye(4))
    pixels = sample.get_fdata()
    assert pixels.min() >= 0 and pixels.max() <= 1
    summary = SampleMetadata.read(tmp_path / "samples" / "samples.json")
    assert summary.geometry.source == summary.intensities.source == NO_REFERENCE
    assert summary.intensities.range == (0.0, 1.0)


def test_a_damaged_reference_names_the_checkpoint(tmp_path):
    vqvae, prior = tiny_model_files(tmp_path, {DATA_REFERENCE: {"geometry": "junk"}})
    with pytest.raises(CheckpointError, match=r"vqvae\.pt: its data_reference"):
        workflows.sample(vqvae, prior, tmp_path / "samples", SETTINGS)


def test_a_sample_folder_is_exactly_the_files_its_samples_json_lists(
    training_reference, tmp_path, caplog
):
    reference, training_file = training_reference
    run, _ = decoded_run(tmp_path, reference)
    out = write_samples(run, tmp_path / "samples", reference)
    metadata = SampleMetadata.read(out / "samples.json")
    assert metadata.files == ("sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz")
    # A stray slice (a user's, or one left by an earlier run) is not scored as a sample.
    (out / "sample_0099.nii.gz").write_bytes(training_file.read_bytes())
    (out / "scan.nii.gz").write_bytes(training_file.read_bytes())
    with caplog.at_level(logging.WARNING):
        listed = sample_files(out, metadata)
    assert [p.name for p in listed] == list(metadata.files)
    assert "ignoring 2 slice(s)" in caplog.text
    # A listed file gone is named, not silently scored as fewer samples.
    (out / "sample_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"lists sample_0001\.nii\.gz, missing"):
        sample_files(out, metadata)


def test_a_sample_folder_without_its_samples_json_was_not_finished(training_reference, tmp_path):
    reference, _ = training_reference
    run, _ = decoded_run(tmp_path, reference)
    with OutputFolder(tmp_path / "samples", SAMPLES) as folder:
        out = write_samples(run, folder.path, reference)
    (out / "samples.json").unlink()  # as a kill before the last write leaves it
    with pytest.raises(InputError, match="did not finish"):
        sample_files(out, None)
    # A folder of slices from elsewhere (no marker, no samples.json) is scored as it is.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.nii.gz").write_bytes((out / "sample_0000.nii.gz").read_bytes())
    assert [p.name for p in sample_files(elsewhere, None)] == ["a.nii.gz"]


@pytest.mark.parametrize(
    "files", [["../train/s0.nii.gz"], ["/etc/passwd"], ["sample_0000.nii"], ["x"]]
)
def test_samples_json_naming_files_outside_the_folder_is_refused(
    training_reference, tmp_path, files
):
    reference, _ = training_reference
    run, _ = decoded_run(tmp_path, reference, count=1)
    out = write_samples(run, tmp_path / "samples", reference)
    written = json.loads((out / "samples.json").read_text())
    (out / "samples.json").write_text(json.dumps({**written, "files": files}))
    with pytest.raises(RecordError, match="not a sample file's name"):
        SampleMetadata.read(out / "samples.json")


def test_samples_are_never_written_into_a_folder_of_the_users_slices(tmp_path):
    split = tmp_path / "keras_slices_train"
    split.mkdir()
    (split / "case_001.nii.gz").write_bytes(b"a user's scan")
    with pytest.raises(OutputError, match="only written into a new or empty folder"):
        OutputFolder(split, SAMPLES, overwrite=True)
    assert [p.name for p in split.iterdir()] == ["case_001.nii.gz"]
