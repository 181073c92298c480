"""Faults and inputs found by an adversarial pass over the command line (docs/reliability.md):
each ends in one line naming the file or setting, never a traceback, a hang or wrong data."""

from __future__ import annotations

import errno
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mri_vqvae.checkpoint import CheckpointError, load_checkpoint
from mri_vqvae.cli.main import main
from mri_vqvae.code_maps import load_sample_codes
from mri_vqvae.config import ConfigError, ModelConfig, load_config
from mri_vqvae.data.dataset import list_slices, postprocess, preprocess
from mri_vqvae.data.nifti import DataError, read_slice, write_slice
from mri_vqvae.files import MARKER_FILE
from mri_vqvae.runtime import resolve_device
from mri_vqvae.train import loop
from tests.helpers import fifo, prior_extras, train_args


def test_a_fifo_among_the_slices_is_named_not_waited_on(tmp_path: Path):
    good = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(good, np.eye(4)), str(tmp_path / "a.nii.gz"))
    with fifo(tmp_path / "b.nii.gz"):
        assert [p.name for p in list_slices(tmp_path)] == ["a.nii.gz", "b.nii.gz"]
        with pytest.raises(DataError, match="not a regular file"):
            read_slice(tmp_path / "b.nii.gz")


def test_upper_case_suffixes_are_slices_too(tmp_path: Path):
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "A.NII.GZ"))
    assert [p.name for p in list_slices(tmp_path)] == ["A.NII.GZ"]
    np.testing.assert_array_equal(read_slice(tmp_path / "A.NII.GZ").pixels, image)
    write_slice(image, tmp_path / "B.NII.GZ")  # gzipped, as the name says, and readable
    assert (tmp_path / "B.NII.GZ").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_slice(tmp_path / "B.NII.GZ").pixels, image)


def test_values_near_the_float32_limit_survive_and_beyond_it_are_named(tmp_path: Path):
    extreme = np.random.default_rng(0).uniform(-3e38, 3e38, (16, 16)).astype(np.float32)
    image = preprocess(extreme, None)
    assert torch.isfinite(image).all() and image.min() == -1 and image.max() == 1
    back = postprocess(image, extreme.shape, float(extreme.min()), float(extreme.max()))
    assert np.isfinite(back).all()
    beyond = np.full((16, 16), 1e300)
    beyond[0, 0] = -1e300
    nib.save(nib.Nifti1Image(beyond, np.eye(4)), str(tmp_path / "f64.nii.gz"))
    with pytest.raises(DataError, match="beyond the range of 32-bit floats"):
        read_slice(tmp_path / "f64.nii.gz")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", "train.lr must be a finite number"),
        ("model.commitment_cost=.nan", "model.commitment_cost must be a finite number"),
        ("model.num_embeddings=100000000000", "model.num_embeddings must be at most 65536"),
    ],
)
def test_settings_that_cannot_train_are_refused(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_config_file_that_is_not_text_or_has_number_keys_is_named(tmp_path: Path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match=r"binary\.yaml is not a text file"):
        load_config(binary)
    numbered = tmp_path / "numbered.yaml"
    numbered.write_text("model:\n  1: 2\n")
    with pytest.raises(ConfigError, match="model: setting names must be words, got 1"):
        load_config(numbered)
    with pytest.raises(ValueError):
        ModelConfig(num_embeddings=2**16 + 1)


@pytest.mark.parametrize("name", ["meta", "mps", "cuda:3"])
def test_a_device_this_tool_cannot_use_is_refused(name: str):
    with pytest.raises(ValueError, match="--device"):
        resolve_device(name)


@pytest.mark.slow
def test_a_checkpoint_missing_its_parts_and_damaged_codes_are_named(
    phantom_root: Path, tmp_path: Path
):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    payload = torch.load(run / "best.pt", weights_only=True)
    del payload["optimizer"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks optimizer; not a whole mri-vqvae"):
        load_checkpoint(tmp_path / "partial.pt")
    (tmp_path / "codes.pt").write_bytes((run / "best.pt").read_bytes()[:3000])
    with pytest.raises(DataError, match="not the codes file that sample writes"):
        load_sample_codes(tmp_path / "codes.pt")


@pytest.mark.slow
def test_outputs_under_a_file_or_on_a_full_disk_end_in_one_line(
    phantom_root: Path, tmp_path: Path, monkeypatch, capsys
):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    scan = sorted((phantom_root / "keras_slices_test").iterdir())[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    reconstruct = ["reconstruct", str(scan), "--checkpoint", str(run / "best.pt"), "--out"]
    assert main([*reconstruct, str(blocker / "x.nii.gz")]) == 2
    assert "a_file is a file, not a folder" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(blocker / "r.html")]) == 2
    assert "a_file is a file, not a folder" in capsys.readouterr().err

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "metrics.csv"))

    monkeypatch.setattr(loop, "write_metric_logs", disk_full)
    assert main(train_args(phantom_root, run, "--epochs", "2", "--resume")) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device" in err and "--resume" in err
    assert "Traceback" not in err
    assert load_checkpoint(run / "last.pt").progress.epoch == 1  # the last checkpoint, whole


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ('{"vqvae": null}', "samples.json: vqvae: expected text, got None"),
        (
            '{"vqvae": "v.pt", "vqvae_sha256": 7}',
            "samples.json: vqvae_sha256: expected text, got 7",
        ),
        ("[1, 2]", "samples.json: expected a sample folder's samples.json (a JSON object)"),
        ('{"vqvae": "v.pt"', "samples.json: not valid JSON"),
        ('{"version": 99}', "of version 99, written by a newer mri-vqvae"),
    ],
)
def test_a_hand_edited_samples_json_is_named(metadata: str, message: str, tmp_path, capsys):
    (tmp_path / "samples.json").write_text(metadata)
    assert main(["evaluate-samples", "--samples", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_phantom_too_small_to_draw_is_one_line(tmp_path: Path, capsys):
    assert main(["demo-data", str(tmp_path / "p"), "--size", "8x8"]) == 2
    assert "phantom slices must be at least 32x16" in capsys.readouterr().err


def test_an_old_style_prior_section_is_named(tmp_path: Path, capsys):
    old = tmp_path / "old_prior.yaml"
    old.write_text("train:\n  epochs: 2\n  sample_every: 0\n")
    vqvae, out = str(tmp_path / "v.pt"), str(tmp_path / "prior")
    assert main(["train-prior", "--vqvae", vqvae, "--out", out, "--config", str(old)]) == 2
    assert "the prior's training settings are the prior_train section" in capsys.readouterr().err


def test_resuming_a_prior_with_a_missing_vqvae_is_one_line(tmp_path: Path, capsys):
    from mri_vqvae.checkpoint import Checkpoint, save_checkpoint
    from mri_vqvae.config import Config

    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / MARKER_FILE).write_text('{"kind": "prior"}')
    extras = prior_extras(16, (4, 4), "0", "v")
    save_checkpoint(Checkpoint("prior", Config(), {}, extras=extras), prior / "last.pt")
    missing = str(tmp_path / "missing.pt")
    assert main(["train-prior", "--vqvae", missing, "--out", str(prior), "--resume"]) == 2
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


def test_report_of_a_prior_folder_names_what_it_is(tmp_path: Path, capsys):
    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / MARKER_FILE).write_text('{"kind": "prior"}')
    (prior / "config.yaml").write_text("{}")
    (prior / "metrics.jsonl").write_text("")
    assert main(["report", str(prior)]) == 2
    assert "is a prior run folder, not a VQ-VAE run" in capsys.readouterr().err


@pytest.mark.slow
def test_ms_ssim_on_slices_too_small_is_refused_before_any_work(
    phantom_root: Path, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "train.ssim_loss=ms-ssim")) == 2
    assert "MS-SSIM needs image sides over 32 pixels" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()
