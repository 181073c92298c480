"""Typed run configuration: frozen dataclasses, strict YAML loading and dotted overrides.

A run is fully described by one :class:`Config`. It is saved beside every run and inside every
checkpoint, so any result can be reproduced from its files alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the setting."""


@dataclass(frozen=True)
class DataConfig:
    """Where the slices are and how they are preprocessed."""

    # (height, width) every slice is resized to; None keeps the native size (all must agree).
    image_size: tuple[int, int] | None = (256, 128)
    skip_bad_files: bool = False
    # Where decoded splits are cached; None uses $MRI_VQVAE_CACHE or ~/.cache/mri-vqvae.
    cache_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        size = self.image_size
        if size is not None and (len(size) != 2 or any(side < 16 for side in size)):
            raise ConfigError(f"data.image_size must be two sides of 16 pixels or more, not {size}")


@dataclass(frozen=True)
class ModelConfig:
    """VQ-VAE sizes. The defaults are the seed's architecture."""

    in_channels: int = 1
    hidden_channels: int = 128
    residual_hidden_channels: int = 32
    num_residual_layers: int = 2
    num_downsamplings: int = 3
    embedding_dim: int = 128
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    # "ema": codebook follows exponential moving averages of its assigned encoder outputs
    # (van den Oord et al. 2017, appendix); "loss": codebook learned by the codebook loss.
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        positive = (
            "in_channels",
            "hidden_channels",
            "residual_hidden_channels",
            "num_downsamplings",
            "embedding_dim",
            "num_embeddings",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_residual_layers < 0:
            raise ConfigError(
                f"model.num_residual_layers must be >= 0, got {self.num_residual_layers}"
            )
        if self.hidden_channels < 2:
            raise ConfigError("model.hidden_channels must be at least 2")
        if self.commitment_cost < 0:
            raise ConfigError(f"model.commitment_cost must be >= 0, got {self.commitment_cost}")
        if self.codebook_update not in ("ema", "loss"):
            raise ConfigError(
                f"model.codebook_update must be 'ema' or 'loss', got {self.codebook_update!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_epsilon <= 0:
            raise ConfigError(f"model.ema_epsilon must be > 0, got {self.ema_epsilon}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. The defaults are the seed's: Adam 1e-3, batch 32, 20 epochs, MSE."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    # Wall-clock budget in minutes; None trains for all epochs.
    max_minutes: float | None = None
    num_preview_images: int = 8
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
        if self.num_preview_images < 1:
            raise ConfigError("train.num_preview_images must be at least 1")


@dataclass(frozen=True)
class Config:
    """The whole run: data, model and training settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.image_size is not None:
            factor = 2**self.model.num_downsamplings
            for side in self.data.image_size:
                if side % factor:
                    raise ConfigError(
                        f"data.image_size {tuple(self.data.image_size)} is not divisible by "
                        f"2**model.num_downsamplings = {factor}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML/JSON-safe values."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type, turning lists into tuples and ints into floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {annotation!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(
            f"unknown setting{where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(err)) from err


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain values; unknown keys are an error."""
    return _build(Config, values, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or the defaults) and apply ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        values = loaded or {}
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of nested ``values`` with each ``a.b=value`` override set (values read as YAML)."""
    result = _to_plain(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    return result


def save_config(config: Config, path: str | Path) -> None:
    """Write the configuration as YAML, loadable by :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
