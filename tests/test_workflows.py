"""The workflows are the library's whole commands: a notebook gets what the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest

from mri_vqvae import workflows
from mri_vqvae.config import load_config
from mri_vqvae.errors import UserError
from tests.helpers import TINY_MODEL

pytestmark = pytest.mark.slow


def test_a_run_and_its_evaluation_from_the_library_with_default_arguments(
    phantom_root: Path, tmp_path: Path
):
    data = workflows.DataSources(root=phantom_root)
    overrides = ["data.image_size=[64, 32]", "train.epochs=1", "train.batch_size=8"]
    overrides += ["train.device=cpu", "train.report=false", "train.seed=7", *TINY_MODEL]
    result = workflows.train_vqvae_run(tmp_path / "run", data, load_config(overrides=overrides))
    assert result is not None and result.best_checkpoint.is_file()
    summary = workflows.evaluate_checkpoint(result.best_checkpoint, data, tmp_path / "eval")
    assert summary["n_images"] == 8
    with pytest.raises(UserError, match="already holds"):
        workflows.evaluate_checkpoint(result.best_checkpoint, data, tmp_path / "eval")
