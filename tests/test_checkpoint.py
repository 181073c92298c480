import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mri_vqvae.checkpoint import (
    Checkpoint,
    CheckpointError,
    Progress,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.trained import TrainedVQVAE
from tests.helpers import tiny_config


def saved(tmp_path: Path) -> tuple[Path, VQVAE]:
    config = tiny_config()
    model = VQVAE.from_config(config.model)
    path = tmp_path / "model.pt"
    checkpoint = Checkpoint("vqvae", config, model.state_dict(), progress=Progress(epoch=3))
    save_checkpoint(checkpoint, path)
    return path, model


def test_model_rebuilds_from_the_file_alone(tmp_path: Path):
    path, model = saved(tmp_path)
    loaded = TrainedVQVAE.load(path)
    assert loaded.config == tiny_config()
    images = torch.randn(2, 1, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(images).reconstruction, model.eval()(images).reconstruction
        )
    assert load_checkpoint(path).progress.epoch == 3
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MARKER'], 'w').write('ran')",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match=r"refused.*could run code.*\(exec\)") as caught:
        load_checkpoint(path)
    assert not marker.exists()
    # torch's own advice (load it anyway, or allow-list the object) is never passed on.
    assert "weights_only" not in str(caught.value) and "safe_globals" not in str(caught.value)


def test_other_format_version_is_explained(tmp_path: Path):
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an mri-vqvae checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "pickle.pt")


def test_weights_of_another_architecture_are_explained(tmp_path: Path):
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["num_embeddings"] = 32
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        TrainedVQVAE.load(path)


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(), random.random())
    torch.testing.assert_close(first[0], second[0])
    assert first[1:] == second[1:]


def test_one_format_for_both_kinds_and_the_kind_is_checked(tmp_path: Path):
    path, _ = saved(tmp_path)
    assert load_checkpoint(path).kind == "vqvae"
    with pytest.raises(CheckpointError, match="is a vqvae checkpoint, not a prior checkpoint"):
        load_checkpoint(path, "prior")


def test_a_checkpoint_of_the_previous_format_gets_a_version_error(tmp_path: Path):
    # Format 2 wrote the VQ-VAE's progress at the top level and had no kind.
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    old = {key: payload[key] for key in ("config", "model", "optimizer")}
    torch.save({**old, "format_version": 2, "epoch": 3, "package_version": "0.1.0"}, path)
    with pytest.raises(CheckpointError, match=r"format 2 .*reads format 3: retrain"):
        TrainedVQVAE.load(path)


def test_an_edited_progress_record_is_named(tmp_path: Path):
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["progress"]["global_step"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="progress record is incomplete"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epoch", -3),
        ("epoch", "3"),
        ("epoch", True),
        ("epoch", 2**70),
        ("global_step", -1),
        ("step_in_epoch", 1.5),
        ("best_score", float("nan")),
        ("best_score", "low"),
        ("history", "none"),
    ],
)
def test_a_progress_no_run_writes_is_refused_not_resumed(tmp_path: Path, field, value):
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["progress"][field] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"model\.pt: its progress (gives {field}|has no)"):
        load_checkpoint(path)


def test_settings_the_checkpoint_was_not_made_by_may_be_another_releases(tmp_path: Path):
    # A VQ-VAE trained before the sample measures' settings were renamed still loads; the
    # sections it was made by are still checked.
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["sample_metrics"] = {"folds": 4, "seed": 3}
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded.config.model == tiny_config().model
    assert loaded.config.sample_metrics.seed == 0  # today's defaults, not a half-read section
    payload["config"]["model"]["no_such_setting"] = 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="no_such_setting"):
        load_checkpoint(path)


@pytest.mark.parametrize("losses", [{"a": 1}, ["x"], [True], "0.1", None])
def test_edited_batch_losses_in_a_resumed_checkpoint_are_named(losses):
    from mri_vqvae.train.vqvae import read_batch_losses

    with pytest.raises(CheckpointError, match=r"last\.pt: its batch_losses is not a list"):
        read_batch_losses({"batch_losses": losses}, Path("run/last.pt"))
    assert read_batch_losses({"batch_losses": [1, 0.5]}, Path("last.pt")) == [1.0, 0.5]
