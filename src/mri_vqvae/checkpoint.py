"""Self-describing checkpoints: weights, configuration, progress and versions in one file.

Files are read with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary
objects, so loading a checkpoint never runs code from it. Everything stored is therefore plain:
tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae import __version__
from mri_vqvae.config import Config, ConfigError, config_from_dict
from mri_vqvae.model import VQVAE

# 2: model settings became channels + channel_multipliers (architecture, quantiser options).
FORMAT_VERSION = 2


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file."""

    config: Config
    model_state: dict[str, torch.Tensor]
    epoch: int = 0  # epochs completed
    global_step: int = 0
    optimizer_state: dict[str, Any] | None = None
    best_val_loss: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    batch_losses: list[float] = field(default_factory=list)
    rng_state: dict[str, Any] | None = None
    package_version: str = __version__


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states as plain values."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write atomically: a temporary file, flushed and renamed, so a kill leaves the old one."""
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "package_version": checkpoint.package_version,
        "torch_version": str(torch.__version__),
        "config": checkpoint.config.to_dict(),
        "model": checkpoint.model_state,
        "optimizer": checkpoint.optimizer_state,
        "epoch": checkpoint.epoch,
        "global_step": checkpoint.global_step,
        "best_val_loss": checkpoint.best_val_loss,
        "history": checkpoint.history,
        "batch_losses": checkpoint.batch_losses,
        "rng_state": checkpoint.rng_state,
    }
    partial = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(partial, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking its format and config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next(
            (line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
            str(err).splitlines()[0] if str(err) else "",
        )
        raise CheckpointError(
            f"{path}: refused, it holds objects other than plain tensors and values, which "
            f"could run code when loaded ({reason})"
        ) from err
    except Exception as err:  # corrupt files fail in many ways deep inside torch.load
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not an mri-vqvae checkpoint")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} (written by mri-vqvae "
            f"{payload.get('package_version', '?')}); this mri-vqvae {__version__} reads "
            f"format {FORMAT_VERSION}"
        )
    try:
        config = config_from_dict(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its configuration is not valid here: {err}") from err
    return Checkpoint(
        config=config,
        model_state=payload["model"],
        epoch=payload["epoch"],
        global_step=payload["global_step"],
        optimizer_state=payload["optimizer"],
        best_val_loss=payload["best_val_loss"],
        history=payload["history"],
        batch_losses=payload["batch_losses"],
        rng_state=payload["rng_state"],
        package_version=payload["package_version"],
    )


def build_model(checkpoint: Checkpoint, path: str | Path = "checkpoint") -> VQVAE:
    """The model a checkpoint describes, with its weights loaded."""
    model = VQVAE.from_config(checkpoint.config.model)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the saved configuration ({err})"
        ) from err
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VQVAE, Config]:
    """Rebuild the trained model from a checkpoint file alone, in eval mode."""
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint, path).to(device)
    model.eval()
    return model, checkpoint.config
