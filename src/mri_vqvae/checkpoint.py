"""Self-describing checkpoints: weights, configuration, progress and versions in one file.

Files are read with ``torch.load(weights_only=True)``, which refuses to unpickle arbitrary
objects, so loading a checkpoint never runs code from it. Everything stored is therefore plain:
tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_vqvae import __version__
from mri_vqvae.config import Config, ConfigError, config_from_dict
from mri_vqvae.data.fingerprint import TRAINING_DATA, SplitFingerprint, fingerprints_from_plain
from mri_vqvae.data.labels import LabelVocabulary
from mri_vqvae.data.reference import DataReference
from mri_vqvae.errors import UserError, shown
from mri_vqvae.files import LAST_CHECKPOINT, save_atomic
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import ConditionSizes, Prior, build_prior
from mri_vqvae.model.texture import ResidualTexture

# 3: one format for both kinds (kind, config tree, weights, progress, extras). Files of
# earlier formats are refused with their version named; retrain, or use the release that
# wrote them.
FORMAT_VERSION = 3
KINDS = ("vqvae", "prior")


logger = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint file cannot be used; the message names the file and the reason."""


@dataclass
class Progress:
    """Where a run stands: what the loop needs to continue it exactly."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    # The best validation score so far (lower is better: loss, or bits per code).
    best_score: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    rng_state: dict[str, Any] | None = None
    # Written inside an epoch: the steps of epoch ``epoch + 1`` already taken (the sampler's
    # position: the epoch's order is a function of the seed and the epoch), and that partial
    # epoch's running sums; 0 and None at an epoch's end.
    step_in_epoch: int = 0
    epoch_progress: dict[str, Any] | None = None

    @property
    def mid_epoch(self) -> bool:
        return self.step_in_epoch > 0


@dataclass
class Checkpoint:
    """A checkpoint file's contents, for either stage. ``kind`` is ``"vqvae"`` or
    ``"prior"``; ``extras`` holds what only that kind needs (a prior: its grid, codebook size
    and the VQ-VAE file it models; a VQ-VAE: its per-step losses and, from runs that
    recorded it, the training data's reference under :data:`DATA_REFERENCE`; either kind,
    from runs that recorded them, its splits' fingerprints under ``TRAINING_DATA``)."""

    kind: str
    config: Config
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    progress: Progress = field(default_factory=Progress)
    extras: dict[str, Any] = field(default_factory=dict)
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


def _read_payload(path: Path, kind: str | None, format_version: int) -> dict[str, Any]:
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
    if payload["format_version"] != format_version:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} (written by mri-vqvae "
            f"{payload.get('package_version', '?')}); this mri-vqvae {__version__} reads format "
            f"{format_version}: retrain, or use the release that wrote it"
        )
    found = payload.get("kind")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: is a {found} checkpoint, not a {kind} checkpoint")
    return payload


def _require_keys(payload: dict[str, Any], path: Path, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {', '.join(missing)}; not a whole mri-vqvae checkpoint (damaged or "
            "edited)"
        )


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write a checkpoint atomically (a kill leaves the previous file whole)."""
    progress = checkpoint.progress
    payload = {
        "kind": checkpoint.kind,
        "format_version": FORMAT_VERSION,
        "package_version": checkpoint.package_version,
        "torch_version": str(torch.__version__),
        "config": checkpoint.config.to_dict(),
        "model": checkpoint.model_state,
        "optimizer": checkpoint.optimizer_state,
        "progress": {
            "epoch": progress.epoch,
            "global_step": progress.global_step,
            "best_score": progress.best_score,
            "history": progress.history,
            "rng_state": progress.rng_state,
            "step_in_epoch": progress.step_in_epoch,
            "epoch_progress": progress.epoch_progress,
        },
        "extras": checkpoint.extras,
    }
    save_atomic(payload, Path(path))


_PROGRESS_KEYS = ("epoch", "global_step", "best_score", "history", "rng_state", "step_in_epoch")


# The sections of the configuration a checkpoint of each kind was made by. The others were only
# the defaults of the run that wrote it (sampling, sample measures), so a release that renamed
# one of their settings still reads the checkpoint, with those sections at its own defaults.
SECTIONS_USED = {
    "vqvae": ("data", "model", "train"),
    "prior": ("data", "model", "prior", "prior_train", "augment"),
}


def _checkpoint_config(values: Any, kind: Any, path: Path) -> Config:
    try:
        return config_from_dict(values)
    except ConfigError as err:
        problem = err
    used = SECTIONS_USED.get(kind)
    if not isinstance(values, dict) or used is None:
        raise CheckpointError(f"{path}: its configuration is not valid here: {problem}")
    kept = {}
    for section, settings in values.items():
        if section in used:
            kept[section] = settings
            continue
        try:
            config_from_dict({section: settings})
            kept[section] = settings
        except ConfigError as err:
            logger.info(
                "%s: its %s settings are another release's; using today's (%s)", path, section, err
            )
    try:
        return config_from_dict(kept)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its configuration is not valid here: {err}") from err


def _check_progress(progress: dict[str, Any], path: Path) -> None:
    """Refuse a progress record no run writes (an edited epoch of -3, say), which a resume
    would otherwise continue from."""
    for name in ("epoch", "global_step", "step_in_epoch"):
        value = progress.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
            raise CheckpointError(
                f"{path}: its progress gives {name} {shown(value)}, which no run reaches "
                "(damaged or edited)"
            )
    best = progress.get("best_score")
    if isinstance(best, bool) or not isinstance(best, int | float) or math.isnan(best):
        raise CheckpointError(
            f"{path}: its progress gives best_score {shown(best)} (damaged or edited)"
        )
    if not isinstance(progress.get("history"), list):
        raise CheckpointError(f"{path}: its progress has no list of epochs (damaged or edited)")


def load_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking its format, its kind
    (when ``kind`` is given) and its configuration."""
    path = Path(path)
    payload = _read_payload(path, kind, FORMAT_VERSION)
    _require_keys(payload, path, ("kind", "config", "model", "optimizer", "progress", "extras"))
    progress = payload["progress"]
    if not isinstance(progress, dict) or any(key not in progress for key in _PROGRESS_KEYS):
        raise CheckpointError(f"{path}: its progress record is incomplete (damaged or edited)")
    _check_progress(progress, path)
    config = _checkpoint_config(payload["config"], payload["kind"], path)
    return Checkpoint(
        kind=payload["kind"],
        config=config,
        model_state=payload["model"],
        optimizer_state=payload["optimizer"],
        progress=Progress(**{**progress, "epoch_progress": progress.get("epoch_progress")}),
        extras=payload["extras"],
        package_version=payload["package_version"],
    )


def load_weights(
    module: torch.nn.Module, checkpoint: Checkpoint, path: str | Path = "checkpoint"
) -> None:
    """Load a checkpoint's weights into ``module``, naming the file when they do not fit."""
    try:
        module.load_state_dict(checkpoint.model_state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the saved configuration ({err})"
        ) from err


def build_model(checkpoint: Checkpoint, path: str | Path = "checkpoint") -> VQVAE:
    """The model a checkpoint describes, with its weights loaded."""
    model = VQVAE.from_config(checkpoint.config.model)
    load_weights(model, checkpoint, path)
    return model


# The keys of a VQ-VAE checkpoint's extras: the reconstruction loss of every step so far, and
# its training slices' DataReference (plain values).
BATCH_LOSSES = "batch_losses"
DATA_REFERENCE = "data_reference"


def read_data_reference(checkpoint: Checkpoint, path: str | Path) -> DataReference | None:
    """The training data's reference a VQ-VAE checkpoint records; None for a checkpoint
    written before references were recorded (or trained on slices without headers)."""
    value = checkpoint.extras.get(DATA_REFERENCE)
    if value is None:
        return None
    try:
        return DataReference.from_plain(value)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: its {DATA_REFERENCE} is not what training records (damaged or edited: "
            f"{type(err).__name__}: {err})"
        ) from err


def read_training_data(
    checkpoint: Checkpoint, path: str | Path
) -> dict[str, SplitFingerprint] | None:
    """The fingerprints of the splits a checkpoint's run trained and validated on (either
    kind); None for a checkpoint written before they were recorded, or of a run on slices
    built in memory."""
    value = checkpoint.extras.get(TRAINING_DATA)
    if value is None:
        return None
    try:
        return fingerprints_from_plain(value)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: its {TRAINING_DATA} is not what training records (damaged or edited: "
            f"{type(err).__name__}: {err})"
        ) from err


# The key of a VQ-VAE's extras that holds its acquisition texture (ResidualTexture, plain).
TEXTURE = "texture"


def read_texture(checkpoint: Checkpoint, path: str | Path) -> ResidualTexture | None:
    """The acquisition texture a VQ-VAE checkpoint keeps; None for one trained without it
    (``train.texture_slices: 0``, or before textures were fitted)."""
    value = checkpoint.extras.get(TEXTURE)
    if value is None:
        return None
    try:
        return ResidualTexture.from_plain(value)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(
            f"{path}: its {TEXTURE} is not what training records (damaged or edited: "
            f"{type(err).__name__}: {err})"
        ) from err


def keep_texture(path: str | Path, texture: ResidualTexture) -> None:
    """Write ``texture`` into the VQ-VAE checkpoint at ``path`` (atomically; the weights and
    everything else stay as they are)."""
    checkpoint = load_checkpoint(path, "vqvae")
    checkpoint.extras[TEXTURE] = texture.to_plain()
    save_checkpoint(checkpoint, path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, which ties a prior to the exact VQ-VAE it was fit to."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_prior_checkpoint(path: str | Path) -> Checkpoint:
    """A prior's checkpoint, checking that it names its codebook, grid and VQ-VAE."""
    checkpoint = load_checkpoint(path, "prior")
    missing = [key for key in PRIOR_EXTRAS if key not in checkpoint.extras]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {', '.join(missing)}; not a whole prior checkpoint (a prior written "
            "before conditions and weight averaging: train it again)"
        )
    return checkpoint


def load_resume_point(run_dir: str | Path, kind: str) -> Checkpoint:
    """The ``last.pt`` of the run in ``run_dir``, of ``kind``, to continue it from."""
    last = Path(run_dir) / LAST_CHECKPOINT
    if not last.exists():
        raise ConfigError(f"--resume: {run_dir} holds no run to continue ({last} missing)")
    return load_prior_checkpoint(last) if kind == "prior" else load_checkpoint(last, kind)


@dataclass(frozen=True)
class TrainingConditions:
    """The slice positions ``(N,)`` and labels ``(N, L)`` of a prior's plain training maps
    (None where it is not conditioned on them), so that sampling without a given condition
    draws it from the training distribution."""

    position: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class PriorExtras:
    """What a prior's checkpoint records beside its weights: the maps it models and the
    VQ-VAE file they came from, what it is conditioned on, and the moving average of its
    weights (None where the run kept none)."""

    num_embeddings: int
    grid_shape: tuple[int, int]
    vqvae_sha256: str
    vqvae_path: str
    condition_sizes: ConditionSizes = field(default_factory=ConditionSizes)
    label_vocabulary: LabelVocabulary = ()
    training_conditions: TrainingConditions = field(default_factory=TrainingConditions)
    ema: dict[str, Any] | None = None

    def to_plain(self) -> dict[str, Any]:
        """Plain values and tensors, as a checkpoint holds them."""
        return {
            "num_embeddings": self.num_embeddings,
            "grid_shape": list(self.grid_shape),
            "vqvae_sha256": self.vqvae_sha256,
            "vqvae_path": self.vqvae_path,
            "condition_sizes": self.condition_sizes.to_dict(),
            "label_vocabulary": [[name, list(values)] for name, values in self.label_vocabulary],
            "training_conditions": {
                "position": self.training_conditions.position,
                "labels": self.training_conditions.labels,
            },
            "ema": self.ema,
        }

    @classmethod
    def from_plain(cls, extras: dict[str, Any], path: str | Path = "checkpoint") -> PriorExtras:
        """Undo :meth:`to_plain`, naming ``path`` when the values are not what it wrote."""
        try:
            conditions = extras["training_conditions"]
            return cls(
                num_embeddings=int(extras["num_embeddings"]),
                grid_shape=tuple(int(side) for side in extras["grid_shape"]),
                vqvae_sha256=str(extras["vqvae_sha256"]),
                vqvae_path=str(extras["vqvae_path"]),
                condition_sizes=ConditionSizes.from_dict(extras["condition_sizes"]),
                label_vocabulary=tuple(
                    (str(name), tuple(str(v) for v in values))
                    for name, values in extras["label_vocabulary"]
                ),
                training_conditions=TrainingConditions(
                    conditions["position"], conditions["labels"]
                ),
                ema=extras["ema"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: its prior records are not what training writes (damaged or edited: "
                f"{type(err).__name__}: {err})"
            ) from err


# What a prior's checkpoint records beside its weights (PriorExtras's fields).
PRIOR_EXTRAS = tuple(f.name for f in fields(PriorExtras))


def build_prior_model(checkpoint: Checkpoint, path: str | Path = "checkpoint") -> Prior:
    """The prior a checkpoint describes, with the weights sampling uses: the moving average
    of the training weights where the run kept one, else the training weights."""
    extras = PriorExtras.from_plain(checkpoint.extras, path)
    prior = build_prior(
        checkpoint.config.prior,
        extras.num_embeddings,
        extras.grid_shape,
        extras.condition_sizes,
    )
    if extras.ema is not None:
        checkpoint = replace(checkpoint, model_state=extras.ema["weights"])
    load_weights(prior, checkpoint, path)
    return prior
