"""A small, real stand-in task for the training loop (:mod:`mri_vqvae.train.loop`), so the loop
is tested once, apart from either stage: a two-layer MLP with dropout (so the restored random
state matters) regressing a fixed seeded synthetic dataset of 40 examples, with its own metric
columns, step sums, running epoch state, validation and checkpoint extras, and chosen examples
poisoned with NaN on request.

Run it as the CLI runs a stage, in its own process, to stop it with a signal::

    python -m tests.train.standin RUN_DIR --epochs 4 [--resume] [--checkpoint-every 1] ...
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mri_vqvae.checkpoint import Checkpoint, load_checkpoint
from mri_vqvae.config import Config, TrainConfig
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.errors import UserError
from mri_vqvae.train.loop import (
    LOOP_COLUMNS,
    FitResult,
    NonFiniteTraining,
    StepSums,
    TrainingInterrupted,
    TrainingTask,
    fit,
)

KIND = "standin"
MODULE = "tests.train.standin"
TRAIN_EXAMPLES, VAL_EXAMPLES, FEATURES, HIDDEN = 40, 12, 8, 16
DATA_SEED = 11


def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and validation inputs and targets: a fixed noisy nonlinear function of 8
    features, the same in every process."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    count = TRAIN_EXAMPLES + VAL_EXAMPLES
    inputs = torch.randn(count, FEATURES, generator=generator)
    weights = torch.randn(FEATURES, generator=generator)
    targets = torch.tanh(inputs @ weights) + 0.1 * torch.randn(count, generator=generator)
    return (
        inputs[:TRAIN_EXAMPLES].clone(),
        targets[:TRAIN_EXAMPLES].clone(),
        inputs[TRAIN_EXAMPLES:].clone(),
        targets[TRAIN_EXAMPLES:].clone(),
    )


def standin_config(**settings: Any) -> Config:
    """The stand-in's run settings: 40 examples in batches of 6, so 7 steps an epoch, the last
    of 4 examples."""
    values: dict[str, Any] = dict(
        epochs=2,
        batch_size=6,
        lr=0.03,
        warmup_steps=2,
        precision="float32",
        device="cpu",
        seed=3,
        report=False,
    )
    values.update(settings)
    return Config(train=TrainConfig(**values))


class StandinTask(TrainingTask):
    """Mean squared error of an MLP on the synthetic examples. Besides the step sums it keeps
    an epoch's running sum of its predictions (restored from a mid-epoch checkpoint through
    :meth:`epoch_state`) and, in its checkpoint extras, every applied step's loss (recorded by
    :meth:`after_step`)."""

    kind = KIND
    metric_columns = (
        "epoch",
        "global_step",
        "train_loss",
        "train_mean_abs_error",
        "train_mean_prediction",
        "examples_seen",
        "val_loss",
        *LOOP_COLUMNS,
    )
    score_column = "val_loss"
    epoch_name = "stand-in epoch"
    sum_names = ("loss", "abs_error", "examples")

    def __init__(
        self,
        config: Config,
        *,
        poison: Sequence[int] = (),
        step_seconds: float = 0.0,
        processes: ProcessGroup = SINGLE_PROCESS,
    ) -> None:
        self.config, self.settings = config, config.train
        self.device = torch.device("cpu")
        self.is_main = processes.is_main
        torch.manual_seed(self.settings.seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.25),
            torch.nn.Linear(HIDDEN, 1),
        )
        self.trainer = self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.settings.lr)
        self.train_x, self.train_y, self.val_x, self.val_y = dataset()
        if poison:
            self.train_x[list(poison)] = float("nan")
        self.step_seconds = step_seconds  # a pause a step, so a signal can land mid-run
        self.step_losses: list[float] = []
        self.prediction_sum = torch.zeros((), dtype=torch.float64)
        self.pending_loss: float | None = None

    def __len__(self) -> int:
        return TRAIN_EXAMPLES

    def begin_epoch(self, restored: dict[str, Any] | None) -> None:
        self.model.train()
        self.prediction_sum = torch.zeros((), dtype=torch.float64)
        if restored is not None and self.is_main:  # the saved sum is every process's
            self.prediction_sum = restored["prediction_sum"].clone()

    def loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        predictions = self.trainer(self.train_x[rows]).squeeze(1)
        errors = predictions - self.train_y[rows]
        loss = errors.pow(2).mean()
        self.pending_loss = float(loss.detach())
        return loss, (predictions.detach(), errors.detach())

    def after_step(self) -> None:
        self.step_losses.append(self.pending_loss)

    def step_sums(self, rows: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        predictions, errors = output
        self.prediction_sum += predictions.double().sum()
        errors = errors.double()
        return {
            "loss": errors.pow(2).sum(),
            "abs_error": errors.abs().sum(),
            "examples": torch.tensor(float(len(rows)), dtype=torch.float64),
        }

    def epoch_state(self, processes: ProcessGroup) -> dict[str, Any]:
        return {"prediction_sum": processes.sum(self.prediction_sum.clone())}

    def train_metrics(
        self, sums: StepSums, history: list[dict[str, Any]], processes: ProcessGroup
    ) -> dict[str, Any]:
        examples = sums.total("examples")
        per_example = 1 / examples if examples else math.nan
        prediction_sum = float(processes.sum(self.prediction_sum.clone()))
        return {
            "train_loss": sums.total("loss") * per_example,
            "train_mean_abs_error": sums.total("abs_error") * per_example,
            "train_mean_prediction": prediction_sum * per_example,
            "examples_seen": (history[-1]["examples_seen"] if history else 0) + int(examples),
        }

    @torch.no_grad()
    def validate(self, processes: ProcessGroup) -> dict[str, Any]:
        self.model.eval()
        predictions = self.model(self.val_x).squeeze(1)
        return {"val_loss": float((predictions - self.val_y).pow(2).mean())}

    def describe(self, row: dict[str, Any]) -> str:
        return f"train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f}"

    def extras(self) -> dict[str, Any]:
        return {"step_losses": list(self.step_losses)}

    def restore(self, extras: dict[str, Any]) -> None:
        self.step_losses = list(extras["step_losses"])


def train_standin(
    run_dir: str | Path,
    *,
    resume: Checkpoint | None = None,
    poison: Sequence[int] = (),
    step_seconds: float = 0.0,
    **settings: Any,
) -> FitResult:
    """A fresh stand-in (or one resumed from ``resume``) trained into ``run_dir`` with
    :func:`standin_config`'s settings changed by ``settings``."""
    task = StandinTask(standin_config(**settings), poison=poison, step_seconds=step_seconds)
    if resume is not None:
        task.model.load_state_dict(resume.model_state)
    return fit(task, run_dir, resume=resume)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the stand-in as the CLI trains a stage; returns the exit status (128 + the
    signal's number when SIGINT or SIGTERM stopped it, as the CLI does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tests.train.standin")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--max-nonfinite-steps", type=int, default=5)
    parser.add_argument("--poison", type=int, action="append", default=[])
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)  # the same sums in every process, and no contention
    resume = load_checkpoint(args.run_dir / "last.pt", KIND) if args.resume else None
    try:
        result = train_standin(
            args.run_dir,
            resume=resume,
            poison=args.poison,
            step_seconds=args.step_seconds,
            epochs=args.epochs,
            batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every,
            max_minutes=args.max_minutes,
            max_nonfinite_steps=args.max_nonfinite_steps,
        )
    except NonFiniteTraining as err:
        print(f"standin: error: {err}", file=sys.stderr)
        return 3
    except UserError as err:
        print(f"standin: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"standin: {stop}", file=sys.stderr)
        again = [*argv, "--resume"] if "--resume" not in argv else argv
        print(f"resume with: {shlex.join(['python', '-m', MODULE, *again])}", file=sys.stderr)
        return 128 + stop.signal_number
    print(f"standin: {len(result.history)} epoch(s), best {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
