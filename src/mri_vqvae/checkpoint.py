"""Self-describing checkpoints: weights, configuration, progress and versions in one file.

Files are read with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary
objects, so loading a checkpoint never runs code from it. Everything stored is therefore plain:
tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae import __version__
from mri_vqvae.config import (
    Config,
    ConfigError,
    PriorRunConfig,
    config_from_dict,
    prior_config_from_dict,
)
from mri_vqvae.errors import UserError
from mri_vqvae.files import replaced_atomically
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import Prior, build_prior

# 2: model settings became channels + channel_multipliers (architecture, quantiser options).
FORMAT_VERSION = 2
PRIOR_FORMAT_VERSION = 1


class CheckpointError(UserError):
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
    # Written inside an epoch: the steps of epoch ``epoch + 1`` already taken (the sampler's
    # position: the epoch's order is a function of the seed and the epoch), and that partial
    # epoch's running sums; 0 and None at an epoch's end.
    step_in_epoch: int = 0
    epoch_progress: dict[str, Any] | None = None

    @property
    def mid_epoch(self) -> bool:
        return self.step_in_epoch > 0


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


def write_atomic(payload: dict[str, Any], path: Path) -> None:
    """A temporary file, flushed and renamed into place, so a kill leaves the old one whole."""
    with replaced_atomically(path) as partial, open(partial, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _read_payload(path: Path, kind: str, format_version: int) -> dict[str, Any]:
    """A checkpoint's payload, refusing anything but plain values, another kind of checkpoint
    or another format."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        hint = f" ({', '.join(found[:4])} there)" if found else ""
        raise CheckpointError(
            f"{path}: is a folder; pass the checkpoint file inside it, e.g. {path / 'best.pt'}"
            f"{hint}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else is not (or no longer) a checkpoint.
        raise CheckpointError(
            f"{path}: not an mri-vqvae checkpoint, or a damaged one (not a PyTorch zip archive: "
            "truncated, corrupt, or another kind of file)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(
                f"{path}: not an mri-vqvae checkpoint, or a damaged one (its contents cannot "
                "be read as one)"
            ) from err
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        # torch's own message goes on to suggest ways to load it anyway; only the object is
        # named here.
        raise CheckpointError(
            f"{path}: refused, it holds objects other than plain tensors and values, which "
            f"could run code when loaded ({named.group(1) if named else 'an unknown object'}); "
            "mri-vqvae never loads such files"
        ) from err
    except Exception as err:  # corrupt files fail in many ways deep inside torch.load
        first_line = next(iter(str(err).splitlines()), "")
        raise CheckpointError(
            f"{path}: not an mri-vqvae checkpoint, or a damaged one ({type(err).__name__}: "
            f"{first_line})"
        ) from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not an mri-vqvae checkpoint")
    # VQ-VAE checkpoints written before priors existed carry no kind.
    found = payload.get("kind", "vqvae")
    if found != kind:
        raise CheckpointError(f"{path}: is a {found} checkpoint, not a {kind} checkpoint")
    if payload["format_version"] != format_version:
        raise CheckpointError(
            f"{path}: {kind} checkpoint format {payload['format_version']} (written by "
            f"mri-vqvae {payload.get('package_version', '?')}); this mri-vqvae {__version__} "
            f"reads format {format_version}"
        )
    return payload


def _require_keys(payload: dict[str, Any], path: Path, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {', '.join(missing)}; not a whole mri-vqvae checkpoint (damaged or "
            "edited)"
        )


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write a VQ-VAE checkpoint atomically."""
    payload = {
        "kind": "vqvae",
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
        "step_in_epoch": checkpoint.step_in_epoch,
        "epoch_progress": checkpoint.epoch_progress,
    }
    write_atomic(payload, Path(path))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking its format and config."""
    path = Path(path)
    payload = _read_payload(path, "vqvae", FORMAT_VERSION)
    _require_keys(payload, path, ("config", "model", "epoch", "global_step", "optimizer"))
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
        best_val_loss=payload.get("best_val_loss", float("inf")),
        history=payload.get("history", []),
        batch_losses=payload.get("batch_losses", []),
        rng_state=payload.get("rng_state", None),
        package_version=payload.get("package_version", "?"),
        # Absent from checkpoints written before mid-epoch checkpoints existed.
        step_in_epoch=payload.get("step_in_epoch", 0),
        epoch_progress=payload.get("epoch_progress"),
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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, which ties a prior to the exact VQ-VAE it was fit to."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PriorCheckpoint:
    """The contents of a prior checkpoint: the prior, and the VQ-VAE whose codes it models."""

    config: PriorRunConfig
    model_state: dict[str, torch.Tensor]
    num_embeddings: int
    grid_shape: tuple[int, int]
    vqvae_sha256: str
    vqvae_path: str
    epoch: int = 0
    global_step: int = 0
    optimizer_state: dict[str, Any] | None = None
    best_val_nll: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    rng_state: dict[str, Any] | None = None
    package_version: str = __version__
    # Written when a signal stops training inside an epoch: the steps of epoch ``epoch + 1``
    # already taken and that partial epoch's sums; 0 and None at an epoch's end.
    step_in_epoch: int = 0
    epoch_progress: dict[str, Any] | None = None

    @property
    def mid_epoch(self) -> bool:
        return self.step_in_epoch > 0


def save_prior_checkpoint(checkpoint: PriorCheckpoint, path: str | Path) -> None:
    """Write a prior checkpoint atomically."""
    payload = {
        "kind": "prior",
        "format_version": PRIOR_FORMAT_VERSION,
        "package_version": checkpoint.package_version,
        "torch_version": str(torch.__version__),
        "config": checkpoint.config.to_dict(),
        "model": checkpoint.model_state,
        "num_embeddings": checkpoint.num_embeddings,
        "grid_shape": list(checkpoint.grid_shape),
        "vqvae_sha256": checkpoint.vqvae_sha256,
        "vqvae_path": checkpoint.vqvae_path,
        "optimizer": checkpoint.optimizer_state,
        "epoch": checkpoint.epoch,
        "global_step": checkpoint.global_step,
        "best_val_nll": checkpoint.best_val_nll,
        "history": checkpoint.history,
        "rng_state": checkpoint.rng_state,
        "step_in_epoch": checkpoint.step_in_epoch,
        "epoch_progress": checkpoint.epoch_progress,
    }
    write_atomic(payload, Path(path))


def load_prior_checkpoint(path: str | Path) -> PriorCheckpoint:
    """Read a checkpoint written by :func:`save_prior_checkpoint`."""
    path = Path(path)
    payload = _read_payload(path, "prior", PRIOR_FORMAT_VERSION)
    _require_keys(
        payload,
        path,
        ("config", "model", "num_embeddings", "grid_shape", "vqvae_sha256", "epoch", "optimizer"),
    )
    try:
        config = prior_config_from_dict(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its configuration is not valid here: {err}") from err
    return PriorCheckpoint(
        config=config,
        model_state=payload["model"],
        num_embeddings=payload["num_embeddings"],
        grid_shape=tuple(payload["grid_shape"]),
        vqvae_sha256=payload["vqvae_sha256"],
        vqvae_path=payload.get("vqvae_path", "?"),
        epoch=payload["epoch"],
        global_step=payload.get("global_step", 0),
        optimizer_state=payload["optimizer"],
        best_val_nll=payload.get("best_val_nll", float("inf")),
        history=payload.get("history", []),
        rng_state=payload.get("rng_state", None),
        package_version=payload.get("package_version", "?"),
        step_in_epoch=payload.get("step_in_epoch", 0),
        epoch_progress=payload.get("epoch_progress"),
    )


def build_prior_model(checkpoint: PriorCheckpoint, path: str | Path = "checkpoint") -> Prior:
    """The prior a checkpoint describes, with its weights loaded."""
    prior = build_prior(checkpoint.config.prior, checkpoint.num_embeddings, checkpoint.grid_shape)
    try:
        prior.load_state_dict(checkpoint.model_state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the saved configuration ({err})"
        ) from err
    return prior


def check_prior_matches(checkpoint: PriorCheckpoint, prior_path: Path, vqvae_path: Path) -> None:
    """Refuse a VQ-VAE file other than the one the prior was trained on: another codebook
    gives the prior's codes other meanings."""
    found = file_sha256(vqvae_path)
    if found != checkpoint.vqvae_sha256:
        raise CheckpointError(
            f"{prior_path}: this prior was trained on the codes of the VQ-VAE "
            f"{checkpoint.vqvae_path} (sha256 {checkpoint.vqvae_sha256[:12]}...), but "
            f"{vqvae_path} has sha256 {found[:12]}...; pass the VQ-VAE checkpoint it was "
            "trained with"
        )


def load_prior(
    path: str | Path, vqvae_path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Prior, PriorCheckpoint]:
    """Rebuild a trained prior in eval mode, after checking it belongs to ``vqvae_path``."""
    path = Path(path)
    checkpoint = load_prior_checkpoint(path)
    check_prior_matches(checkpoint, path, Path(vqvae_path))
    prior = build_prior_model(checkpoint, path).to(device)
    prior.eval()
    return prior, checkpoint
