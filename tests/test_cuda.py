"""The CUDA path: tiny runs of every command on the GPU in each training precision, an exact
resume there, and GPU checkpoints that load on a CPU. Skipped without CUDA; on a machine with a
GPU, ``make gpu-check`` runs them (``pytest -m cuda``) before the throughput rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.cli.main import main
from mri_vqvae.train.loop import GRADIENT_SCALER_STATE
from tests.helpers import TINY_PRIOR, train_args

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PRECISIONS = ["float32", "bfloat16", "float16"]


def on_gpu(args: list[str]) -> list[str]:
    """A tiny CPU command line of tests.helpers moved to the GPU."""
    return [("cuda" if a == "cpu" and args[i - 1] == "--device" else a) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu") / "data"
    args = ["-q", "demo-data", str(root), "--train-cases", "2", "--val-cases", "1"]
    args += ["--test-cases", "1", "--weeks", "1", "--slices", "8", "--size", "64x32"]
    assert main(args) == 0
    return root


def skip_without_bfloat16(precision: str) -> None:
    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_command_runs_on_the_gpu(demo: Path, tmp_path: Path, precision: str):
    skip_without_bfloat16(precision)
    run, prior, samples = tmp_path / "run", tmp_path / "prior", tmp_path / "samples"
    assert main(on_gpu(train_args(demo, run, "--precision", precision))) == 0
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint.config.train.precision == precision
    history = checkpoint.progress.history
    assert len(history) == 2 and all(math.isfinite(row["train_loss"]) for row in history)
    # 4 steps, all in the learning rate's warm-up: a working run, not a trained one.
    assert all(-1 <= row["val_ssim"] <= 1 for row in history)
    # float16 runs keep their loss scale, so a resumed run scales as the first did.
    assert (GRADIENT_SCALER_STATE in checkpoint.extras) == (precision == "float16")

    evaluation = tmp_path / "evaluation"
    evaluate = ["-q", "evaluate", "--data", str(demo), "--checkpoint", str(run / "best.pt")]
    assert main([*evaluate, "--out", str(evaluation), "--device", "cuda"]) == 0
    scores = json.loads((evaluation / "metrics.json").read_text())
    assert -1 <= scores["ssim_mean"] <= 1 and scores["n_images"] == 8

    train_prior = ["-q", "train-prior", "--vqvae", str(run / "best.pt"), "--data", str(demo)]
    train_prior += ["--out", str(prior), "--epochs", "2", "--device", "cuda"]
    assert main([*train_prior, "--precision", precision, *TINY_PRIOR]) == 0
    summary = json.loads((prior / "prior_summary.json").read_text())
    assert math.isfinite(summary["test_nll_bits"])

    sample = ["-q", "sample", "--vqvae", str(run / "best.pt"), "--prior", str(prior / "best.pt")]
    sample += ["--n", "6", "--out", str(samples), "--device", "cuda"]
    assert main([*sample, f"sample.precision={precision}"]) == 0
    assert len(list(samples.glob("sample_*.nii.gz"))) == 6
    judge = ["-q", "evaluate-samples", "--samples", str(samples), "--data", str(demo)]
    assert main([*judge, "--reference-slices", "16", "--device", "cuda"]) == 0
    metrics = json.loads((samples / "evaluation" / "sample_metrics.json").read_text())
    assert 0 <= metrics["two_sample"]["samples_vs_train_reconstructions"]["accuracy"] <= 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_gpu_run_resumed_ends_as_one_never_stopped(
    demo: Path, tmp_path: Path, precision: str, monkeypatch
):
    skip_without_bfloat16(precision)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # A constant learning rate, so a run of 1 epoch then 2 follows the schedule of one of 2.
    settings = ["--precision", precision, "train.lr_schedule=constant"]
    assert main(on_gpu(train_args(demo, straight, *settings))) == 0
    first = on_gpu(train_args(demo, stopped, *settings))
    first[first.index("--epochs") + 1] = "1"
    assert main(first) == 0
    assert main(on_gpu(train_args(demo, stopped, *settings, "--resume"))) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(stopped / "last.pt")
    assert a.progress.global_step == b.progress.global_step
    for name, weight in a.model_state.items():
        # GPU kernels may add in another order from run to run; a resume that lost the
        # optimiser's moments or the loss scale would be far further off than this.
        assert torch.allclose(weight.float(), b.model_state[name].float(), atol=1e-3), name
    if precision == "float16":
        assert a.extras[GRADIENT_SCALER_STATE] == b.extras[GRADIENT_SCALER_STATE]


def test_a_gpu_checkpoint_reconstructs_on_a_cpu_alike(demo: Path, tmp_path: Path, monkeypatch):
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.model import VQVAE

    run = tmp_path / "run"
    assert main(on_gpu(train_args(demo, run, "--precision", "float32"))) == 0
    checkpoint = load_checkpoint(run / "best.pt")  # mapped to the CPU
    model = VQVAE.from_config(checkpoint.config.model)
    model.load_state_dict(checkpoint.model_state)
    images = load_splits(resolve_split_files(demo), checkpoint.config.data, ("val",))["val"]
    batch = images.batch(list(range(len(images))))
    # Ampere and later GPUs multiply float32 in TF32 by default, 10 mantissa bits: off here,
    # so both devices compute in float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.no_grad():
        on_cpu = model.eval()(batch)
        on_cuda = model.cuda()(batch.cuda())
    assert torch.equal(on_cpu.indices, on_cuda.indices.cpu())
    assert torch.allclose(on_cpu.reconstruction, on_cuda.reconstruction.cpu(), atol=1e-3)
