"""Every option and override of the command line: numbers range-checked when parsed, explicit
overrides winning over flags wherever they stand, and messages that name what differs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mri_vqvae.cli.main import _loop_flags, _settings_overrides, main, resume_command
from mri_vqvae.cli.options import parse_args
from mri_vqvae.config import load_config
from tests.helpers import train_args

BAD_NUMBERS = [
    ("train", "--epochs", "0"),
    ("train", "--batch-size", "0"),
    ("train", "--lr", "-1"),
    ("train", "--lr", "nan"),
    ("train", "--max-minutes", "inf"),
    ("train", "--checkpoint-every", "0"),
    ("train", "--seed", "-1"),
    ("train", "--size", "4x4"),
    ("evaluate", "--batch-size", "0"),
    ("train-prior", "--epochs", "0"),
    ("train-prior", "--lr", "0"),
    ("train-prior", "--max-minutes", "-5"),
    ("sample", "--n", "0"),
    ("sample", "--temperature", "inf"),
    ("sample", "--temperature", "nan"),
    ("sample", "--temperature", "0"),
    ("sample", "--top-k", "0"),
    ("sample", "--top-p", "0"),
    ("sample", "--top-p", "1.5"),
    ("sample", "--slice-position", "2"),
    ("sample", "--batch-size", "0"),
    ("evaluate-samples", "--reference-slices", "0"),
    ("demo-data", "--slices", "0"),
    ("demo-data", "--train-cases", "x"),
    ("demo-data", "--size", "100000x100000"),
    ("demo-data", "--workers", "0"),
    ("demo-data", "--workers", "65"),
]


@pytest.mark.parametrize(("command", "option", "value"), BAD_NUMBERS)
def test_every_numeric_option_is_range_checked_when_parsed(
    command: str, option: str, value: str, tmp_path: Path, capsys
):
    out, checkpoint = tmp_path / "out", str(tmp_path / "model.pt")
    required = {
        "train": ["--data", str(tmp_path), "--out", str(out)],
        "evaluate": ["--checkpoint", checkpoint, "--out", str(out)],
        "train-prior": ["--vqvae", checkpoint, "--out", str(out)],
        "sample": ["--vqvae", checkpoint, "--prior", checkpoint, "--out", str(out)],
        "evaluate-samples": ["--samples", str(tmp_path), "--out", str(out)],
        "demo-data": [str(out)],
    }[command]
    assert main([command, *required, option, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and value in err, err
    assert not out.exists()


def test_demo_data_writes_on_every_core_unless_told(tmp_path: Path):
    import os

    default = parse_args(["demo-data", str(tmp_path / "p")]).workers
    assert default == min(len(os.sched_getaffinity(0)), 64) >= 1
    assert parse_args(["demo-data", str(tmp_path / "p"), "--workers", "3"]).workers == 3


def test_explicit_overrides_win_over_flags_wherever_they_stand():
    args = parse_args(
        [
            "train",
            "--data",
            "d",
            "model.channels=16",
            "--out",
            "o",
            "--size",
            "32x16",
            "data.image_size=[64, 32]",
            "--epochs",
            "3",
            "train.epochs=5",
        ]
    )
    overrides = _settings_overrides(args, {**_loop_flags("train"), "size": "data.image_size"})
    config = load_config(None, overrides)
    assert tuple(config.data.image_size) == (64, 32)
    assert config.train.epochs == 5 and config.model.channels == 16
    assert overrides[-3:] == ["model.channels=16", "data.image_size=[64, 32]", "train.epochs=5"]


def test_a_training_run_records_the_override_not_the_flag(phantom_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert (
        main(
            train_args(
                phantom_root, run, "--epochs", "1", "--size", "32x16", "data.image_size=[64, 32]"
            )
        )
        == 0
    )
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] == [64, 32]


def test_every_preset_is_a_choice_of_train(tmp_path: Path):
    for preset in ("8x", "4x", "8x-gan", "4x-gan", "seed"):
        args = parse_args(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                           "--preset", preset])  # fmt: skip
        assert args.preset == preset


def test_a_stray_argument_is_still_refused(tmp_path: Path, capsys):
    assert main(["train", "--data", "d", "--out", str(tmp_path / "o"), "stray"]) == 2
    assert "override 'stray' must look like section.key=value" in capsys.readouterr().err
    assert (
        main(["reconstruct", "in.nii", "--checkpoint", "c", "--out", "o.nii", "model.channels=4"])
        == 2
    )
    assert "unrecognized arguments: model.channels=4" in capsys.readouterr().err


def test_the_resume_command_drops_what_only_a_new_run_takes():
    argv = ["train", "--data", "my data", "--out", "r", "--config", "c.yaml", "--overwrite"]
    assert resume_command(argv) == "mri-vqvae train --data 'my data' --out r --resume"
    assert resume_command(["train-prior", "--preset=seed", "--resume"]).endswith("prior --resume")


def test_resume_names_each_setting_it_cannot_change(phantom_root: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    resume = train_args(phantom_root, run, "--resume", "--size", "32x16")
    assert main([*resume, "model.embedding_dim=4"]) == 2
    err = capsys.readouterr().err
    assert "model.embedding_dim: 8 -> 4" in err and "data.image_size: [64, 32] -> [32, 16]" in err


def test_a_checkpoint_folder_or_damaged_file_is_named_as_such(
    phantom_root: Path, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    evaluate = [
        "evaluate",
        "--data",
        str(phantom_root),
        "--out",
        str(tmp_path / "e"),
        "--checkpoint",
    ]
    assert main([*evaluate, str(run)]) == 2
    assert f"is a folder; pass the checkpoint file inside it, e.g. {run / 'best.pt'}" in (
        capsys.readouterr().err
    )
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "best.pt").read_bytes()[:5000])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 20)
    for damaged in (truncated, noise):
        assert main([*evaluate, str(damaged)]) == 2
        err = capsys.readouterr().err
        assert "not an mri-vqvae checkpoint, or a damaged one" in err
        assert "weights_only" not in err and "could run code" not in err
    shutil.rmtree(run)
    assert not (tmp_path / "e").exists()
