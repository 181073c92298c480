"""TensorBoard logs of a run (``train.tensorboard``, ``--tensorboard``): the per-epoch scalars
of ``metrics.jsonl`` and the preview image grids, through torch's own ``SummaryWriter``, so
``tensorboard --logdir RUN_DIR`` follows a run while it trains. Every x-axis is the global
optimisation step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mri_vqvae import plots
from mri_vqvae.config import ConfigError
from mri_vqvae.files import make_output_folder

LOG_FOLDER = "tensorboard"

# Columns of a metrics row that are bookkeeping, not measurements.
_NOT_LOGGED = frozenset({"global_step", "stopped_by_time_budget"})


def require_tensorboard() -> None:
    """Raise :class:`ConfigError` naming the setting if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:  # torch's module raises this when tensorboard is absent
        raise ConfigError(
            "train.tensorboard (--tensorboard) needs the tensorboard package: "
            "pip install 'mri-vqvae[tensorboard]' (or pip install tensorboard)"
        ) from err


def scalar_tag(column: str) -> str:
    """A metrics column's TensorBoard tag: ``val_ssim`` is ``val/ssim``, ``train_loss`` is
    ``train/loss``, anything else (``lr``, ``epoch_seconds``) goes under ``run/``."""
    for split in ("train", "val"):
        if column.startswith(f"{split}_"):
            return f"{split}/{column[len(split) + 1 :]}"
    return f"run/{column}"


def image_rows_grid(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of images, each ``(B, 1, H, W)`` in [-1, 1], as one ``(1, rows*H, B*W)`` image in
    [0, 1]: the layout of the preview PNGs (inputs above their reconstructions). A row shorter
    than the longest is filled out with black."""
    arrays = [row.detach().float().cpu().numpy() for row in rows]
    return torch.from_numpy(plots.mosaic(arrays, background=0.0))[None]


class TensorBoardLog:
    """A run's TensorBoard event files in ``RUN_DIR/tensorboard``.

    ``resume_step`` is the global step of the checkpoint a resumed run starts from: whatever
    an interrupted run logged after it is dropped, so the curves have no doubled stretch."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / LOG_FOLDER
        # torch writes its event files in place, so the folder must be the run's own.
        make_output_folder(self.log_dir)
        self._writer = SummaryWriter(
            str(self.log_dir), purge_step=resume_step + 1 if resume_step else None
        )

    def epoch(self, row: dict) -> None:
        """Every numeric column of an epoch's metrics row, at the row's global step."""
        step = int(row["global_step"])
        for column, value in row.items():
            if column in _NOT_LOGGED or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(scalar_tag(column), value, step)

    def step_values(self, tag: str, values: Sequence[float], last_step: int) -> None:
        """One value per optimisation step, the last of them at ``last_step``."""
        first = last_step - len(values) + 1
        for offset, value in enumerate(values):
            self._writer.add_scalar(tag, value, first + offset)

    def image_rows(self, tag: str, rows: Sequence[torch.Tensor], step: int) -> None:
        """Rows of images in [-1, 1] as one grid (see :func:`image_rows_grid`)."""
        self._writer.add_image(tag, image_rows_grid(rows), step, dataformats="CHW")

    def flush(self) -> None:
        """Write what is buffered to the event file."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
