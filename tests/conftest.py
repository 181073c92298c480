"""Shared fixtures: a tiny phantom dataset and a tiny model configuration."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from mri_vqvae.config import Config, DataConfig, ModelConfig, TrainConfig
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset

TINY_SIZE = (64, 32)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test caches decoded splits in its own folder, never in the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MRI_VQVAE_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A HipMRI-layout phantom: 3 train cases, 1 val, 1 test; 1 week of 8 slices of 64x32."""
    root = tmp_path_factory.mktemp("phantom")
    spec = PhantomSpec(
        train_cases=3, val_cases=1, test_cases=1, weeks=1, slices=8, height=64, width=32, seed=3
    )
    write_phantom_dataset(root, spec)
    return root


def tiny_model_config(**changes) -> ModelConfig:
    values = dict(
        channels=8,
        channel_multipliers=(1, 2),
        residual_hidden_channels=8,
        num_residual_layers=1,
        embedding_dim=8,
        num_embeddings=16,
    )
    values.update(changes)
    return ModelConfig(**values)


def tiny_config(**train_changes) -> Config:
    # The end-of-run validation and report are tested on their own (tests/test_report.py).
    train = dict(
        epochs=2, batch_size=8, lr=2e-3, num_preview_images=4, device="cpu", seed=1, report=False
    )
    train.update(train_changes)
    return Config(
        data=DataConfig(image_size=TINY_SIZE), model=tiny_model_config(), train=TrainConfig(**train)
    )


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
