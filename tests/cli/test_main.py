"""The whole chain through the command line on a tiny phantom: demo-data, train, evaluate,
reconstruct, resume; and bad input answered with a named error and exit status 2."""

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from mri_vqvae import __version__
from mri_vqvae.cli.main import main
from mri_vqvae.files import MARKER_FILE
from tests.helpers import TINY_MODEL, TINY_PRIOR, free_port, train_args


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    assert (
        main(
            [
                "-q",
                "demo-data",
                str(root),
                "--train-cases",
                "2",
                "--val-cases",
                "1",
                "--test-cases",
                "1",
                "--weeks",
                "1",
                "--slices",
                "8",
                "--size",
                "64x32",
            ]
        )
        == 0
    )
    return root


def check_evaluation_folder(folder: Path) -> None:
    """What ``evaluate`` writes for the tiny run's 8 test slices."""
    for name in (
        "metrics.json",
        "per_image_metrics.csv",
        "ssim_scores_test_set.png",
        "best_image.png",
        "worst_image.png",
        "reconstructed_images.png",
        "textured_reconstructions.png",
    ):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in (
        "ssim_mean",
        "ssim_std",
        "ssim_min",
        "ssim_max",
        "psnr_mean",
        "foreground_ssim_mean",
        "foreground_psnr_mean",
        "ssim_seed_protocol_mean",
        "codebook_usage",
        "perplexity",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["n_images"] == 8
    # The acquisition texture fitted at the end of training is scored beside the plain mean.
    assert math.isfinite(metrics["textured_ssim_mean"])
    assert metrics["textured_psnr_mean"] != metrics["psnr_mean"]
    assert "skipped" in metrics["two_sample"]  # 8 test slices: too few for the classifier
    # The texture restores the power the decoder drops: a smaller spectrum gap than the mean's.
    spectrum = metrics["power_spectrum"]
    gap = "largest_gap_db_up_to_half_nyquist"
    assert spectrum["textured"][gap] < spectrum[gap]
    assert len(metrics["power_spectrum"]["textured_reconstructions"]) == len(
        metrics["power_spectrum"]["real"]
    )
    assert metrics["best_image"].startswith("case_") and metrics["worst_image"].endswith(".nii.gz")
    rows = (folder / "per_image_metrics.csv").read_text().splitlines()
    assert rows[0] == "file,ssim,psnr,foreground_ssim,foreground_psnr,ssim_seed_protocol"
    assert len(rows) == 9


def check_reconstruction(source: Path, out: Path) -> None:
    """A reconstruction keeps its input's shape, affine and intensity range."""
    original, written = nib.load(str(source)), nib.load(str(out))
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    values = written.get_fdata()
    assert np.isfinite(values).all()
    assert original.get_fdata().min() - 1e-3 <= values.min() <= values.max()
    assert values.max() <= original.get_fdata().max() + 1e-3


@pytest.mark.slow
def test_train_evaluate_reconstruct(demo: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(train_args(demo, run)) == 0
    assert (run / "best.pt").is_file() and (
        run / "reconstructions" / "val" / "epoch_2.png"
    ).is_file()

    assert (
        main(
            [
                "-q",
                "evaluate",
                "--data",
                str(demo),
                "--checkpoint",
                str(run / "best.pt"),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert "; with the acquisition texture -, " in capsys.readouterr().out  # 8 slices: no test
    check_evaluation_folder(tmp_path / "eval")

    source = sorted((demo / "keras_slices_test").iterdir())[0]
    out = tmp_path / "recon.nii.gz"
    assert (
        main(
            [
                "-q",
                "reconstruct",
                str(source),
                "--checkpoint",
                str(run / "best.pt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    check_reconstruction(source, out)

    capsys.readouterr()
    assert main(train_args(demo, run)) == 2  # a finished run is never overwritten
    assert "--resume" in capsys.readouterr().err
    assert main([*train_args(demo, run), "--resume", "--epochs", "3"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.slow
def test_a_corrupt_slice_is_named_or_skipped(demo: Path, tmp_path: Path, capsys, caplog):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    bad = data / "keras_slices_train" / "case_000_week_0_slice_3.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(train_args(data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "case_000_week_0_slice_3.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()
    assert main([*train_args(data, tmp_path / "run"), "--skip-bad-files"]) == 0
    assert "skipped 1 of 16" in caplog.text and "slice_3.nii.gz" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["train.epochs=0"], "train.epochs"),
        (["model.num_codes=3"], "num_codes"),
        (["--size", "62x32"], "divisible"),
    ],
)
def test_bad_settings_fail_before_work(demo: Path, tmp_path: Path, capsys, args, message):
    assert main([*train_args(demo, tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_data_and_checkpoint(tmp_path: Path, capsys):
    assert main(train_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    assert "nowhere" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--test",
                str(tmp_path),
                "--checkpoint",
                str(tmp_path / "x.pt"),
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "x.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mri-vqvae"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("demo-data", "train", "evaluate", "reconstruct", "report"):
        assert command in result.stdout


def test_python_m_mri_vqvae_runs_the_command_line(monkeypatch, capsys):
    """`python -m mri_vqvae` in this process: the quick check's stand-in for the slow tests
    that start it as a subprocess."""
    monkeypatch.setattr(sys, "argv", ["mri_vqvae", "--version"])
    # No process group was joined, so run() ends with a plain SystemExit.
    monkeypatch.delitem(sys.modules, "mri_vqvae.distributed", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("mri_vqvae", run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"mri-vqvae {__version__}"


@pytest.mark.slow
def test_seed_preset_trains_the_seeds_recipe_at_a_tiny_size(demo: Path, tmp_path: Path):
    run = tmp_path / "seed"
    tiny_seed = [
        "model.channels=8",
        "model.channel_multipliers=[1, 2]",
        "model.residual_hidden_channels=8",
        "model.embedding_dim=8",
        "model.num_embeddings=16",
    ]
    args = train_args(demo, run, "--preset", "seed", "--epochs", "1", "--precision", "float32")
    args = [a for a in args if a not in TINY_MODEL] + tiny_seed
    assert main([*args, "--memory-format", "contiguous"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "float32"  # flags reach the settings
    assert saved["train"]["memory_format"] == "contiguous"
    assert saved["model"]["architecture"] == "seed"  # from the preset
    assert saved["model"]["codebook_update"] == "loss"
    assert saved["train"]["lr_schedule"] == "constant"
    assert saved["model"]["channels"] == 8  # an override wins over the preset
    assert saved["train"]["epochs"] == 1  # and so does a flag


@pytest.mark.slow
def test_train_prior_sample_and_evaluate_samples(demo: Path, tmp_path: Path, capsys):
    run, prior, samples = tmp_path / "run", tmp_path / "prior", tmp_path / "samples"
    assert main(train_args(demo, run)) == 0
    vqvae = str(run / "best.pt")
    prior_args = ["-q", "train-prior", "--vqvae", vqvae, "--data", str(demo), "--device", "cpu"]
    # One augmented copy per training slice: the whole path with issue 15's augmentation.
    augmented = [*TINY_PRIOR, "augment.copies=1"]
    assert main([*prior_args, "--out", str(prior), "--epochs", "2", *augmented]) == 0
    for name in ("best.pt", "last.pt", "metrics.csv", "nll_curves.png", "prior_summary.json"):
        assert (prior / name).is_file(), name
    assert sorted(p.name for p in (prior / "codes").iterdir()) == ["test.pt", "train.pt", "val.pt"]
    summary = json.loads((prior / "prior_summary.json").read_text())
    assert summary["val_unigram_bits"] > 0 and math.isfinite(summary["test_nll_bits"])
    assert summary["train_maps_per_slice"] == 2
    assert "bits/code" in capsys.readouterr().out

    sample_args = ["-q", "sample", "--vqvae", vqvae, "--prior", str(prior / "best.pt")]
    assert main([*sample_args, "--n", "8", "--out", str(samples), "--top-k", "8"]) == 0
    assert len(list(samples.glob("sample_*.nii.gz"))) == 8
    assert (samples / "samples.png").is_file()
    # A second sample run never writes over the first.
    assert main([*sample_args, "--n", "2", "--out", str(samples)]) == 2
    assert "already holds a sample folder" in capsys.readouterr().err
    # Sampling settings come from the one tree too: a --config file, then flags win.
    settings = tmp_path / "sample.yaml"
    settings.write_text("sample:\n  num_samples: 5\n  top_k: 4\n  seed: 3\n")
    from_file = tmp_path / "from_file"
    assert main([*sample_args, "--config", str(settings), "--n", "3", "--out", str(from_file)]) == 0
    drawn = json.loads((from_file / "samples.json").read_text())
    assert len(list(from_file.glob("sample_*.nii.gz"))) == 3
    assert (drawn["seed"], drawn["settings"]["top_k"]) == (3, 4)

    assert json.loads((samples / "samples.json").read_text())["texture"]["applied"]
    # --no-texture writes the decoder's mean of the same codes: the same seed draws the same
    # maps, and only the texture tells the two folders' slices apart.
    smooth = tmp_path / "smooth"
    assert (
        main([*sample_args, "--n", "8", "--out", str(smooth), "--top-k", "8", "--no-texture"]) == 0
    )
    assert not json.loads((smooth / "samples.json").read_text())["texture"]["applied"]
    assert torch.equal(
        torch.load(smooth / "codes.pt")["codes"], torch.load(samples / "codes.pt")["codes"]
    )
    first = [
        nib.load(str(f)).get_fdata()
        for f in (samples / "sample_0000.nii.gz", smooth / "sample_0000.nii.gz")
    ]
    assert not np.allclose(*first)

    check_sample_measures(samples, demo)
    check_a_conditioned_prior(demo, tmp_path, vqvae, prior_args, capsys)


def check_sample_measures(samples: Path, demo: Path) -> None:
    """evaluate-samples on 8 textured samples of the tiny run."""
    judge = ["-q", "evaluate-samples", "--samples", str(samples), "--data", str(demo)]
    assert main([*judge, "--reference-slices", "32", "--device", "cpu"]) == 0
    metrics = json.loads((samples / "evaluation" / "sample_metrics.json").read_text())
    # Textured samples meet reconstructions as the decoder's mean of their codes (noise on
    # both sides would blunt the classifier) and real slices as written.
    assert metrics["texture"]["samples_textured"]
    assert metrics["texture"]["against_reconstructions"].startswith("the decoder's mean")
    assert metrics["num_samples"] == 8 and metrics["num_held_out"] == 16
    assert metrics["protocol"]["name"] == metrics["settings"]["protocol"] == "frozen-v3"
    for test in ("samples_vs_train_reconstructions", "samples_vs_held_out_real"):
        result = metrics["two_sample"][test]
        assert 0 <= result["accuracy"] <= 1 and result["images_per_set"] == 8
    assert 0 < metrics["nearest_train_ssim_samples"]["max"] <= 1
    for name in ("closest_to_training.png", "nearest_training_ssim.png", "memorisation.csv"):
        assert (samples / "evaluation" / name).is_file(), name


def check_a_conditioned_prior(demo: Path, tmp_path: Path, vqvae: str, prior_args, capsys):
    """A masked prior conditioned on slice position and a label from a conditions.csv:
    conditions drawn, given, guided, and a label table changed under a resumed prior."""
    names = sorted(p.name for p in demo.glob("keras_slices_*/*.nii*"))
    rows = [f"{name},{'even' if i % 2 else 'odd'}" for i, name in enumerate(names)]
    (demo / "conditions.csv").write_text("file,parity\n" + "\n".join(rows) + "\n")
    conditioned = tmp_path / "conditioned"
    extra = ["--condition-on-slice-position", "--condition-label", "parity", "--architecture"]
    extra += ["masked", "prior_train.sample_every=0"]
    assert main([*prior_args, "--out", str(conditioned), "--epochs", "1", *extra, *TINY_PRIOR]) == 0
    conditioned_args = ["-q", "sample", "--vqvae", vqvae, "--prior", str(conditioned / "last.pt")]
    # Without conditions given, they are drawn from the training slices'.
    assert main([*conditioned_args, "--n", "3", "--out", str(tmp_path / "drawn")]) == 0
    drawn = json.loads((tmp_path / "drawn" / "samples.json").read_text())["conditions"]
    assert len(drawn["slice_position"]) == 3
    assert set(drawn["labels"]["parity"]) <= {"even", "odd"}
    at_apex = [*conditioned_args, "--n", "2", "--out", str(tmp_path / "apex")]
    guided = ["--slice-position", "0.1", "--label", "parity=even", "--guidance", "2"]
    assert main([*at_apex, *guided, "--decoding-steps", "3"]) == 0
    written = json.loads((tmp_path / "apex" / "samples.json").read_text())
    assert written["conditions"]["slice_position"] == [0.1, 0.1]
    assert written["conditions"]["labels"]["parity"] == ["even", "even"]
    assert written["conditions"]["given_labels"] == {"parity": "even"}
    assert (written["settings"]["guidance"], written["settings"]["decoding_steps"]) == (2.0, 3)
    assert main([*at_apex, "--overwrite", "--label", "parity=prime"]) == 2
    assert "no value 'prime'" in capsys.readouterr().err
    # A resumed prior refuses labels whose values changed under it.
    table = demo / "conditions.csv"
    table.write_text(table.read_text().replace(",odd", ",uneven"))
    resume = ["-q", "train-prior", "--vqvae", vqvae, "--data", str(demo), "--out"]
    assert main([*resume, str(conditioned), "--resume", "prior_train.epochs=2"]) == 2
    assert "label indices would change meaning" in capsys.readouterr().err


def test_train_prior_refuses_an_existing_prior_and_a_bad_vqvae(demo: Path, tmp_path: Path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    args = ["-q", "train-prior", "--vqvae", str(junk), "--data", str(demo), "--out"]
    assert main([*args, str(tmp_path / "prior")]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not (tmp_path / "prior").exists()  # a failed command leaves no empty folder
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "last.pt").write_bytes(b"")
    assert main([*args, str(tmp_path / "taken")]) == 2
    assert "not a folder mri-vqvae wrote" in capsys.readouterr().err
    (tmp_path / "taken" / MARKER_FILE).write_text('{"kind": "prior"}')
    assert main([*args, str(tmp_path / "taken")]) == 2
    assert "already holds a prior run" in capsys.readouterr().err
    assert (tmp_path / "taken" / "last.pt").read_bytes() == b""


@pytest.mark.slow
def test_torchrun_trains_with_two_cpu_processes(demo: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    args = train_args(demo, run, "--precision", "float32")[1:]  # torchrun's own output stays
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "mri_vqvae",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1  # only rank 0 reports
    assert "process 1 of 2" in result.stderr
    assert "Grad strides do not match" not in result.stderr  # DDP's buckets fit the weights
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header and two epochs, written once
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "float32"
    assert (run / "best.pt").is_file() and (run / "reconstructions" / "val").is_dir()


@pytest.mark.slow
def test_torchrun_trains_a_prior_with_two_cpu_processes(demo: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert main(train_args(demo, run, "--epochs", "1")) == 0
    prior = tmp_path / "prior"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}
    args = ["train-prior", "--vqvae", str(run / "best.pt"), "--data", str(demo), "--out"]
    args += [str(prior), "--device", "cpu", "--epochs", "2", *TINY_PRIOR]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(free_port()), "-m", "mri_vqvae", *args]
    result = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("prior folder:") == 1  # only rank 0 reports
    assert (prior / "metrics.csv").read_text().count("\n") == 3  # header and two epochs
    assert json.loads((prior / "prior_summary.json").read_text())["test_nll_bits"] > 0
