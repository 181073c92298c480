"""Shared fixtures: a tiny phantom dataset and a tiny model configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset


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
