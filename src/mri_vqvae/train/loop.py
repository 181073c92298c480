"""The one training loop, for both stages. :func:`fit` owns epochs, the time budget, the
learning-rate schedule, stop signals, mid-epoch checkpoints with exact resume, the non-finite
guard, the free-disk check, DDP agreement and the logs (CSV, JSONL, TensorBoard); a stage is a
small :class:`TrainingTask` (a loss on a batch, a validation, previews, extra checkpoint
state), as minGPT's ``Trainer`` knows nothing of GPT.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mri_vqvae.checkpoint import (
    Checkpoint,
    Progress,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from mri_vqvae.config import Config, LoopConfig, save_config
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup
from mri_vqvae.errors import UserError
from mri_vqvae.files import RunFolder, write_text_atomic
from mri_vqvae.runtime import gradient_scaler
from mri_vqvae.train.schedule import learning_rate
from mri_vqvae.train.tensorboard import TensorBoardLog

logger = logging.getLogger(__name__)

# Columns every stage's metrics.csv carries after its own, in this order.
LOOP_COLUMNS = (
    "train_skipped_steps",
    "lr",
    "epoch_seconds",
    "elapsed_seconds",
    "stopped_by_time_budget",
)


# The key under which a float16 run's loss-scaler state rides in a checkpoint's extras.
GRADIENT_SCALER_STATE = "gradient_scaler"


class TrainingTask:
    """What a stage gives the loop. Subclasses set the attributes in ``__init__`` and
    implement the methods; the loop calls nothing else.

    Attributes:
        kind: the checkpoint kind, ``"vqvae"`` or ``"prior"``.
        config: the whole run's settings, saved in every checkpoint.
        settings: the loop's section of ``config`` (``train`` or ``prior_train``).
        model: the module whose weights are saved; ``trainer`` is what a step calls (the model,
            or it wrapped in DDP or ``torch.compile``).
        optimizer: its optimiser; the loop sets its learning rate each step.
        metric_columns: every column of ``metrics.csv``, in order: ``epoch`` and
            ``global_step``, the stage's own and :data:`LOOP_COLUMNS`, placed where the stage
            wants them.
        score_column: the validation column whose lowest value makes ``best.pt``.
        epoch_name: how log lines name an epoch ("epoch", "prior epoch").
        sum_names: the names of the sums :meth:`step_sums` returns, in the order the loop
            keeps them.
        device: where the batches are made.
        global_step: the steps taken before the current one; the loop sets it before each
            :meth:`loss` (for terms that start at a given step).
    """

    kind: str
    config: Config
    settings: LoopConfig
    model: torch.nn.Module
    trainer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    metric_columns: tuple[str, ...]
    score_column: str
    epoch_name: str = "epoch"
    sum_names: tuple[str, ...]
    device: torch.device
    global_step: int = 0

    def __len__(self) -> int:
        """The number of training examples (the loop draws batches of their indices)."""
        raise NotImplementedError

    def begin_epoch(self, restored: dict[str, Any] | None) -> None:
        """Enter training mode and reset the epoch's own sums (or take them from ``restored``,
        what :meth:`epoch_state` returned before a mid-epoch checkpoint: every process's sums,
        which only the main process takes back)."""
        raise NotImplementedError

    def loss(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The loss to minimise on this process's examples ``rows``, and what
        :meth:`step_sums` needs of the forward pass."""
        raise NotImplementedError

    def step_sums(self, rows: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        """Sums over the step's examples after an applied step, by the names of
        :attr:`sum_names` (each a float64 scalar); the loop sums them over processes and
        passes every step's to :meth:`train_metrics` as :class:`StepSums`."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each applied optimisation step (the moving average of the weights
        follows them here)."""

    def epoch_state(self, processes: ProcessGroup) -> dict[str, Any]:
        """The epoch's own running state beyond the step sums, summed over processes (every
        process calls it), for a mid-epoch checkpoint."""
        return {}

    def train_metrics(
        self, sums: StepSums, history: list[dict[str, Any]], processes: ProcessGroup
    ) -> dict[str, Any]:
        """The epoch's training columns from every applied step's sums (``history``: the rows
        of the epochs before; every process calls it)."""
        raise NotImplementedError

    def validate(self, processes: ProcessGroup) -> dict[str, Any]:
        """The validation columns (every process calls it)."""
        raise NotImplementedError

    def describe(self, row: dict[str, Any]) -> str:
        """One log line for an epoch's row."""
        raise NotImplementedError

    def score(self, row: dict[str, Any]) -> float:
        """The epoch's score for choosing ``best.pt`` (lowest wins): ``row[score_column]``."""
        return row[self.score_column]

    def after_epoch(
        self, epoch: int, global_step: int, last: bool, board: TensorBoardLog | None
    ) -> None:
        """Previews and pictures after an epoch (``last``: the run's last); main process only."""

    def extras(self) -> dict[str, Any]:
        """What the stage's checkpoints hold beyond weights, optimiser and progress."""
        return {}

    def restore(self, extras: dict[str, Any]) -> None:
        """Take back what :meth:`extras` saved, on resuming."""

    def finish(self, history: list[dict[str, Any]]) -> None:
        """The run's closing pictures (main process only)."""


@dataclass(frozen=True)
class StepSums:
    """Every applied step's sums of an epoch, ``values (steps, S)`` float64, by column name."""

    names: tuple[str, ...]
    values: torch.Tensor

    def column(self, name: str) -> torch.Tensor:
        """One sum for every step, ``(steps,)``."""
        return self.values[:, self.names.index(name)]

    def total(self, name: str) -> float:
        """One sum over the whole epoch."""
        return float(self.column(name).sum())


@dataclass
class FitResult:
    """Where a training run left its outputs, and what it measured. ``wrote_best``: whether
    this call wrote ``best.pt`` (a resumed run that never improved on it did not)."""

    run_dir: Path
    history: list[dict]
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_by_time_budget: bool
    wrote_best: bool = False


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint to resume from was written first."""

    def __init__(self, signal_number: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(
            f"{name} received: stopped before step {step + 1} of epoch {epoch}; {checkpoint} "
            "holds the run so far (resume with --resume)"
        )


class NonFiniteTraining(UserError):
    """Too many steps in a row had a non-finite loss or gradient; the run stopped."""


class StopRequest:
    """Turns SIGINT and SIGTERM into a request the training loop honours at its next step.
    A second signal while one is pending stops at once, as the default would."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        logger.warning(
            "%s received: stopping after this step and writing a checkpoint (send it again to "
            "stop at once)",
            signal.Signals(signal_number).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only there can it listen
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def optimisation_step(
    trainer: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    *,
    grad_clip_norm: float | None,
    loss_scale: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
) -> bool:
    """Backpropagate ``loss`` (times ``loss_scale``), clip the gradient norm and step; returns
    whether the update was applied. A non-finite gradient norm (from a non-finite loss, or an
    overflow) skips it: the parameters and optimiser state stay as they were. A distributed
    run passes its shard's share of the batch times the number of processes as
    ``loss_scale``, so the averaged gradients are the whole batch's even when shards differ.
    With a float16 ``scaler`` the loss is scaled for the backward pass and the gradients
    unscaled before clipping; an overflow also lowers the scale for the next step."""
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is None:
        scaled.backward()
    else:
        scaler.scale(scaled).backward()
        scaler.unscale_(optimizer)  # clipping and the finiteness check see true gradients
    max_norm = grad_clip_norm if grad_clip_norm is not None else math.inf
    # Gradients are averaged over processes before this, so every process decides alike.
    norm = torch.nn.utils.clip_grad_norm_(trainer.parameters(), max_norm)
    applied = bool(torch.isfinite(norm))
    # The scaler's step would skip an overflow by itself, but a finite gradient whose norm
    # overflows float32 must be skipped too, so the clipped norm decides for both.
    if applied and scaler is not None:
        scaler.step(optimizer)
    elif applied:
        optimizer.step()
    if scaler is not None:
        scaler.update()  # lowers the scale after an overflow, raises it after enough steps
    if not applied:
        optimizer.zero_grad(set_to_none=True)
    return applied


def write_metric_logs(history: list[dict], run: RunFolder, columns: tuple[str, ...]) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` (``columns``) with one row per epoch,
    each replaced whole (a full disk leaves the previous logs, not an empty file)."""
    write_text_atomic(run.metrics_jsonl, "".join(json.dumps(row) + "\n" for row in history))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run.metrics_csv, table.getvalue())


# best.pt, last.pt and the temporary file of the one being replaced.
_CHECKPOINTS_KEPT = 3


def check_run_folder(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse a run folder that cannot be written or lacks room for the checkpoints a run
    keeps, before any training."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
    except OSError as err:
        raise UserError(
            f"{run_dir}: cannot write to the run folder ({err.strerror or err})"
        ) from err
    finally:
        with contextlib.suppress(OSError):  # the folder itself may not exist
            probe.unlink(missing_ok=True)
    # Weights plus Adam's two moments, float32, and a margin for the rest of a checkpoint.
    tensors = sum(t.numel() for t in model.parameters()) * 3 + sum(
        b.numel() for b in model.buffers()
    )
    checkpoint_bytes = tensors * 4 * 1.1 + (1 << 20)
    needed = checkpoint_bytes * _CHECKPOINTS_KEPT + (16 << 20)  # and pictures and logs
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(
            f"{run_dir}: only {free / 2**20:.0f} MiB free; a run needs about "
            f"{needed / 2**20:.0f} MiB ({_CHECKPOINTS_KEPT} checkpoints of "
            f"{checkpoint_bytes / 2**20:.0f} MiB, pictures and logs); free some space or "
            "choose another --out"
        )


def _stacked(step_sums: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """The per-step sums as a new ``(steps, width)`` tensor (``(0, width)`` before any)."""
    if step_sums:
        return torch.stack(step_sums)
    return torch.zeros(0, width, dtype=torch.float64, device=device)


def _restored_sums(partial: dict[str, Any], names: tuple[str, ...]) -> torch.Tensor:
    """A mid-epoch checkpoint's step sums, ``(steps, len(names))``, column by column by name;
    a sum the checkpoint lacks (the task sums more figures now) is zero."""
    saved = partial["step_sums"]
    saved_names = partial.get("sum_names") or names[: saved.shape[1]]
    columns = [
        saved[:, saved_names.index(name)]
        if name in saved_names
        else saved.new_zeros(saved.shape[0])
        for name in names
    ]
    return torch.stack(columns, dim=1)


class _Fit:
    """One call of :func:`fit`: the state that changes as training goes."""

    def __init__(
        self,
        task: TrainingTask,
        run: RunFolder,
        processes: ProcessGroup,
        resume: Checkpoint | None,
    ) -> None:
        self.task, self.run, self.processes = task, run, processes
        self.settings = task.settings
        self.main = processes.is_main
        self.progress = Progress()
        self.batch_size = self.settings.batch_size
        self.steps_per_epoch = math.ceil(len(task) / self.batch_size)
        self.total_steps = self.steps_per_epoch * self.settings.epochs
        self.budget_seconds = (
            self.settings.max_minutes * 60 if self.settings.max_minutes is not None else None
        )
        self.partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's epoch so far
        self.scaler = gradient_scaler(task.device, self.settings.precision)
        if resume is not None:
            task.optimizer.load_state_dict(resume.optimizer_state)
            task.restore(resume.extras)
            if self.scaler is not None and GRADIENT_SCALER_STATE in resume.extras:
                self.scaler.load_state_dict(resume.extras[GRADIENT_SCALER_STATE])
            self.progress = resume.progress
            self.progress.history = list(self.progress.history)
            if self.progress.rng_state is not None:
                restore_rng_state(self.progress.rng_state)
            if self.progress.mid_epoch:
                self.partial = self.progress.epoch_progress
        history = self.progress.history
        self.elapsed_before = history[-1].get("elapsed_seconds", 0.0) if history else 0.0
        if self.partial is not None:
            self.elapsed_before += self.partial["seconds"]
        self.started = time.monotonic()
        self.out_of_time = False
        self.lr = self.settings.lr
        self.board: TensorBoardLog | None = None
        self.wrote_best = False
        self.skipped_in_a_row = 0

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, path: Path, epoch_done: int, step_in_epoch: int = 0, partial=None) -> None:
        if not self.main:
            return
        progress = self.progress
        progress.epoch, progress.step_in_epoch, progress.epoch_progress = (
            epoch_done,
            step_in_epoch,
            partial,
        )
        progress.rng_state = capture_rng_state()
        task = self.task
        extras = task.extras()
        if self.scaler is not None:
            extras = {**extras, GRADIENT_SCALER_STATE: self.scaler.state_dict()}
        save_checkpoint(
            Checkpoint(
                kind=task.kind,
                config=task.config,
                model_state=task.model.state_dict(),
                optimizer_state=task.optimizer.state_dict(),
                progress=progress,
                extras=extras,
            ),
            path,
        )

    def epoch_so_far(self, seconds: float) -> dict[str, Any]:
        """The epoch so far, summed over processes, as a mid-epoch checkpoint stores it.
        Every process must call it (it sums across them)."""
        sums = _stacked(self.step_sums, len(self.task.sum_names), self.task.device)
        return {
            "step_sums": self.processes.sum(sums).cpu(),
            "sum_names": list(self.task.sum_names),
            "seconds": seconds,
            "skipped_steps": self.skipped,
            "skipped_in_a_row": self.skipped_in_a_row,
            "task": self.task.epoch_state(self.processes),
        }

    # -- one epoch --------------------------------------------------------------------------

    def begin_epoch(self, epoch: int) -> int:
        """Reset the epoch's sums (or restore a mid-epoch checkpoint's); returns the first
        step to take."""
        self.epoch_start = time.monotonic()
        self.step_sums: list[torch.Tensor] = []
        # The count of non-finite steps in a row runs on across epochs: an epoch shorter than
        # max_nonfinite_steps must not reset it, or a run that never has a finite step would
        # never stop.
        self.skipped, self.seconds_before = 0, 0.0
        partial, self.partial = self.partial, None
        self.task.begin_epoch(partial["task"] if partial is not None else None)
        if partial is None:
            return 0
        self.seconds_before, self.skipped = partial["seconds"], partial["skipped_steps"]
        self.skipped_in_a_row = partial.get("skipped_in_a_row", 0)
        saved = _restored_sums(partial, self.task.sum_names).to(self.task.device)
        if not self.main:
            # The saved sums are every process's, so only the main process takes them back;
            # the others hold as many zero rows, so every process's stack of step sums has
            # the same shape when they are summed across processes.
            saved = torch.zeros_like(saved)
        self.step_sums = list(saved.unbind(0))
        return self.progress.step_in_epoch

    def agreed_clock(self, stop: StopRequest) -> tuple[float, int]:
        """The share of the time budget used and any stop signal, agreed by every process
        (the slowest clock and any signal win)."""
        time_used = (
            (time.monotonic() - self.started) / self.budget_seconds if self.budget_seconds else 0.0
        )
        stop_signal = float(stop.signal_number or 0)
        if self.processes.enabled:
            agreed = self.processes.max(
                torch.tensor([time_used, stop_signal], device=self.task.device)
            ).tolist()
            time_used, stop_signal = agreed
        return time_used, int(stop_signal)

    def seconds_in_epoch(self) -> float:
        return self.seconds_before + time.monotonic() - self.epoch_start

    def take_step(self, batch: torch.Tensor, epoch: int, step: int, time_used: float) -> Any:
        """One optimisation step on this process's share of ``batch``; returns the loss."""
        task, processes = self.task, self.processes
        mine = processes.shard(batch)
        self.lr = learning_rate(
            self.settings, self.progress.global_step, self.total_steps, time_used
        )
        for group in task.optimizer.param_groups:
            group["lr"] = self.lr
        task.global_step = self.progress.global_step
        loss, output = task.loss(mine)
        loss_scale = len(mine) * processes.world_size / len(batch)
        applied = optimisation_step(
            task.trainer,
            task.optimizer,
            loss,
            grad_clip_norm=self.settings.grad_clip_norm,
            loss_scale=loss_scale,
            scaler=self.scaler,
        )
        self.progress.global_step += 1
        if applied:
            self.skipped_in_a_row = 0
            task.after_step()
            sums = task.step_sums(mine, output)
            self.step_sums.append(torch.stack([sums[name] for name in task.sum_names]))
        elif self.is_scaler_overflow(loss):
            self.skipped += 1
            logger.debug("float16 gradient overflow: step skipped, loss scale lowered")
        else:
            self.count_skipped(epoch, step)
        return loss

    def is_scaler_overflow(self, loss: torch.Tensor) -> bool:
        """Whether a skipped step was the float16 loss scaler's routine overflow (a finite
        loss on every process, and a scale of at least 1, which the scaler has just lowered)
        rather than a fault that counts towards ``max_nonfinite_steps``. Every process must
        call it, and every one decides alike. The quantiser's EMA codebook has followed the
        step's latents all the same: a few such steps move it a little, not the weights."""
        if self.scaler is None:
            return False
        not_finite = torch.tensor(
            [0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=self.task.device
        )
        if self.processes.enabled:
            not_finite = self.processes.max(not_finite)
        return not_finite.item() == 0 and self.scaler.get_scale() >= 1.0

    def count_skipped(self, epoch: int, step: int) -> None:
        """Log a skipped non-finite step; too many in a row stop the run."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        global_step = self.progress.global_step
        logger.warning(
            "epoch %d step %d (global step %d): loss or gradient not finite; step skipped "
            "(%d in a row)",
            epoch,
            step + 1,
            global_step,
            self.skipped_in_a_row,
        )
        if self.skipped_in_a_row < self.settings.max_nonfinite_steps:
            return
        last = self.run.last_checkpoint
        kept = f"{last} is the last checkpoint" if last.exists() else "no checkpoint was written"
        raise NonFiniteTraining(
            f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient, the "
            f"last at epoch {epoch} step {step + 1} (global step {global_step}); training "
            f"stopped and {kept}. Lower {self.settings.SECTION}.lr, check the data for corrupt "
            f"slices, or use {self.settings.SECTION}.precision=float32"
        )

    def run_epoch(self, epoch: int, stop: StopRequest) -> None:
        """The steps of one epoch, in an order that depends on (seed, epoch) only, so a run
        resumed anywhere sees the batches one that never stopped would, whatever the number
        of processes."""
        first_step = self.begin_epoch(epoch)
        if first_step and self.main:
            logger.info("resuming at step %d of epoch %d", first_step + 1, epoch)
        order = torch.randperm(
            len(self.task),
            generator=torch.Generator().manual_seed(self.settings.seed * 100003 + epoch),
        )
        bar = tqdm(
            range(first_step, self.steps_per_epoch),
            initial=first_step,
            total=self.steps_per_epoch,
            desc=f"{self.task.kind} epoch {epoch}/{self.settings.epochs}",
            unit="batch",
            leave=False,
            disable=None if self.main else True,
        )
        with contextlib.closing(bar):
            for step in bar:
                time_used, stop_signal = self.agreed_clock(stop)
                if stop_signal:
                    partial = self.epoch_so_far(self.seconds_in_epoch())
                    self.save(self.run.last_checkpoint, epoch - 1, step, partial)
                    raise TrainingInterrupted(stop_signal, self.run.last_checkpoint, epoch, step)
                batch = order[step * self.batch_size : (step + 1) * self.batch_size]
                if len(batch) < self.processes.world_size:
                    continue  # a last batch too small to give every process an example
                loss = self.take_step(batch, epoch, step, time_used)
                if self.main and step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if time_used >= 1:
                    self.out_of_time = True
                    return
                every = self.settings.checkpoint_every
                if (
                    every
                    and self.progress.global_step % every == 0
                    and step + 1 < self.steps_per_epoch
                ):
                    partial = self.epoch_so_far(self.seconds_in_epoch())
                    self.save(self.run.last_checkpoint, epoch - 1, step + 1, partial)

    def end_epoch(self, epoch: int) -> None:
        """Validate, log, preview and checkpoint a finished (or budget-ended) epoch."""
        task, processes, progress = self.task, self.processes, self.progress
        stacked = _stacked(self.step_sums, len(task.sum_names), task.device)
        sums = StepSums(task.sum_names, processes.sum(stacked))
        row = {"epoch": epoch, "global_step": progress.global_step}
        row.update(task.train_metrics(sums, progress.history, processes))
        row.update(task.validate(processes))
        row.update(
            {
                "train_skipped_steps": self.skipped,
                "lr": self.lr,
                "epoch_seconds": self.seconds_in_epoch(),
                "elapsed_seconds": self.elapsed_before + time.monotonic() - self.started,
                "stopped_by_time_budget": self.out_of_time,
            }
        )
        progress.history.append({column: row[column] for column in task.metric_columns})
        score = task.score(row)
        improved = score < progress.best_score
        progress.best_score = min(progress.best_score, score)
        if self.main:
            write_metric_logs(progress.history, self.run, task.metric_columns)
            skipped = f" | {self.skipped} step(s) skipped as non-finite" if self.skipped else ""
            logger.info("%s %d: %s%s", task.epoch_name, epoch, task.describe(row), skipped)
            last = epoch == self.settings.epochs or self.out_of_time
            task.after_epoch(epoch, progress.global_step, last, self.board)
            if self.board is not None:
                self.board.epoch(row)
                self.board.flush()
        self.save(self.run.last_checkpoint, epoch)
        if improved:
            self.save(self.run.best_checkpoint, epoch)
            self.wrote_best = True

    def __call__(self) -> FitResult:
        task, settings = self.task, self.settings
        if self.main and settings.tensorboard:
            self.board = TensorBoardLog(self.run.path, resume_step=self.progress.global_step)
        closing = contextlib.closing(self.board) if self.board else contextlib.nullcontext()
        with StopRequest() as stop, closing:
            for epoch in range(self.progress.epoch + 1, settings.epochs + 1):
                self.run_epoch(epoch, stop)
                self.end_epoch(epoch)
                if self.out_of_time:
                    if self.main:
                        logger.info(
                            "time budget of %s minutes reached in epoch %d",
                            settings.max_minutes,
                            epoch,
                        )
                    break
        if self.main and self.progress.history:
            task.finish(self.progress.history)
        self.processes.barrier()  # no process leaves before the main one has written all
        run = self.run
        history = self.progress.history
        return FitResult(
            run_dir=run.path,
            history=history,
            best_checkpoint=run.best_checkpoint,
            last_checkpoint=run.last_checkpoint,
            stopped_by_time_budget=self.out_of_time,
            wrote_best=self.wrote_best and self.main,
        )


def fit(
    task: TrainingTask,
    run_dir: str | Path,
    processes: ProcessGroup = SINGLE_PROCESS,
    resume: Checkpoint | None = None,
) -> FitResult:
    """Train ``task`` for ``task.settings.epochs`` (or until ``max_minutes``), writing
    ``run_dir``: ``config.yaml``, ``metrics.csv``/``metrics.jsonl`` (a row per epoch),
    ``last.pt`` after every epoch and ``best.pt`` when the validation score improves.

    A time budget ends training mid-epoch; that epoch is still validated, logged and
    checkpointed. ``checkpoint_every`` also writes ``last.pt`` inside epochs; ``resume``
    continues from any checkpoint, mid-epoch ones included, exactly where it was written.
    SIGINT and SIGTERM stop at the next step after writing ``last.pt``
    (:class:`TrainingInterrupted`). A step whose loss or gradient is not finite is skipped;
    ``max_nonfinite_steps`` of them in a row raise :class:`NonFiniteTraining`. In a
    distributed run every process calls this; each takes its share of every batch, so the
    run follows the steps one process would, and only the main process writes files.
    """
    run = RunFolder(Path(run_dir))
    missing = [column for column in LOOP_COLUMNS if column not in task.metric_columns]
    if missing:  # a task's mistake, not the user's
        raise TypeError(f"{type(task).__name__}.metric_columns lacks {missing}")
    if len(task) < processes.world_size:
        raise UserError(
            f"{len(task)} training example(s) cannot be shared by {processes.world_size} "
            "processes; start fewer"
        )
    if task.settings.batch_size < processes.world_size:
        raise UserError(
            f"{task.settings.SECTION}.batch_size {task.settings.batch_size} cannot give each "
            f"of {processes.world_size} processes an example; raise it or start fewer"
        )
    if processes.is_main:
        check_run_folder(run.path, task.model)
        save_config(task.config, run.config_file)
    return _Fit(task, run, processes, resume)()
