"""What many tests share: tiny configurations, command lines and waits. Fixtures live in
conftest.py; plain helpers live here, so tests import them from one place."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from mri_vqvae.config import Config, DataConfig, ModelConfig, PriorConfig, TrainConfig
from mri_vqvae.model.prior import ConditionSizes, PriorConditions, build_prior

TINY_SIZE = (64, 32)


@contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO at ``path`` whose readers are let go: should the code under test open it to
    read, a writer opens and closes it at once, so the reader sees an empty file and the test
    fails instead of waiting forever."""
    os.mkfifo(path)
    done = threading.Event()

    def release_readers() -> None:
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as err:  # ENXIO: no reader yet
                if err.errno != errno.ENXIO:
                    return
            done.wait(0.05)

    thread = threading.Thread(target=release_readers, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


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
    # The end-of-run validation and report are tested on their own (tests/report/test_page.py).
    train = dict(
        epochs=2, batch_size=8, lr=2e-3, num_preview_images=4, device="cpu", seed=1, report=False
    )
    train.update(train_changes)
    return Config(
        data=DataConfig(image_size=TINY_SIZE), model=tiny_model_config(), train=TrainConfig(**train)
    )


def join_test_group(rank: int, world_size: int, port: int):
    """Join a CPU (Gloo) group as ``torchrun`` would have set it up, one thread a process;
    returns the process group and device."""
    from mri_vqvae.distributed import join_process_group

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    return join_process_group("cpu")


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# JSON is valid YAML, so lists and booleans survive the trip through an override.
TINY_MODEL = [
    f"model.{key}={json.dumps(value)}" for key, value in asdict(tiny_model_config()).items()
]


def train_args(data: Path, out: Path, *extra: str, report: bool = False) -> list[str]:
    """A tiny ``train`` command line; the end-of-run report (a few seconds) only if asked."""
    return [
        "-q",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--size",
        "64x32",
        "--device",
        "cpu",
        *extra,
        *TINY_MODEL,
        f"train.report={str(report).lower()}",
    ]


TINY_PRIOR = [
    "prior.width=32",
    "prior.num_layers=2",
    "prior.num_heads=4",
    "prior_train.batch_size=8",
]


def cli_command(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny run of tests/cli/test_main.py in its own process: 4 images a step, a
    checkpoint after each."""
    args = train_args(data, out, "--batch-size", "4", "--checkpoint-every", "1", *extra)
    return [sys.executable, "-m", "mri_vqvae", *args]


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


NUM_CODES = 16


def tiny_prior(architecture: str, grid=(4, 3), conditional=False, sizes=None):
    """A small prior of ``architecture``; ``conditional`` conditions it on slice position,
    ``sizes`` (a ConditionSizes) on whatever it names."""
    torch.manual_seed(0)
    transformer = architecture in ("transformer", "masked")
    config = PriorConfig(
        architecture=architecture,
        width=32 if transformer else 16,
        num_layers=2 if transformer else 3,
        num_heads=4,
        dropout=0.0,
        condition_on_slice_position=conditional,
    )
    if sizes is None:
        sizes = ConditionSizes(position=conditional)
    return build_prior(config, NUM_CODES, grid, sizes).eval()


def positions(*values: float) -> PriorConditions:
    """Conditions holding only slice positions."""
    return PriorConditions(position=torch.tensor(values))


def prior_extras(num_embeddings: int, grid: tuple[int, int], sha256: str, path: str) -> dict:
    """The extras of an unconditioned prior's checkpoint without a moving average."""
    from mri_vqvae.checkpoint import PriorExtras

    return PriorExtras(num_embeddings, grid, sha256, path).to_plain()


def tiny_splits(root: Path) -> dict:
    """The train, val and test splits of a phantom folder at the tiny size."""
    from mri_vqvae.data.dataset import load_splits, resolve_split_files

    return load_splits(resolve_split_files(root), DataConfig(image_size=TINY_SIZE))


def fit_vqvae(model, data: dict, config: Config, out: Path, **options):
    """``train_vqvae`` of ``model`` on the ``train`` and ``val`` splits of ``data`` into
    ``out``, on the CPU unless ``options`` name a ``device`` (and ``resume``, ``processes``)."""
    from mri_vqvae.train.vqvae import train_vqvae

    options.setdefault("device", torch.device("cpu"))
    return train_vqvae(
        model, train_set=data["train"], val_set=data["val"], config=config, run_dir=out, **options
    )


def train_tiny_vqvae(config: Config, data: dict, out: Path, resume=None):
    """A fresh seeded VQ-VAE trained on ``data`` into ``out`` on the CPU (resumed from the
    checkpoint ``resume`` if given); returns the loop's result."""
    from mri_vqvae.model import VQVAE

    torch.manual_seed(config.train.seed)
    model = VQVAE.from_config(config.model)
    if resume is not None:
        model.load_state_dict(resume.model_state)
    return fit_vqvae(model, data, config, out, resume=resume)


def tiny_model_files(folder: Path, vqvae_extras: dict) -> tuple[Path, Path]:
    """A tiny untrained VQ-VAE (64x32 slices) whose checkpoint holds ``vqvae_extras``, and an
    unconditioned transformer prior over its 16x8 maps, saved in ``folder``."""
    from dataclasses import replace

    from mri_vqvae.checkpoint import BATCH_LOSSES, Checkpoint, file_sha256, save_checkpoint
    from mri_vqvae.model import VQVAE

    config = tiny_config()
    torch.manual_seed(0)
    vqvae_path, prior_path = folder / "vqvae.pt", folder / "prior.pt"
    vqvae = VQVAE.from_config(config.model)
    extras = {BATCH_LOSSES: [], **vqvae_extras}
    save_checkpoint(Checkpoint("vqvae", config, vqvae.state_dict(), extras=extras), vqvae_path)
    settings = PriorConfig(width=32, num_layers=2, num_heads=4, dropout=0.0)
    sha = file_sha256(vqvae_path)
    prior = tiny_prior("transformer", (16, 8))
    save_checkpoint(
        Checkpoint(
            "prior",
            replace(config, prior=settings),
            prior.state_dict(),
            extras=prior_extras(vqvae.num_embeddings, (16, 8), sha, str(vqvae_path)),
        ),
        prior_path,
    )
    return vqvae_path, prior_path


def vqvae_handle(model, sha256: str = "a" * 64):
    """A handle on an in-memory VQ-VAE, as if loaded from a file with that ``sha256``."""
    from mri_vqvae.trained import TrainedVQVAE

    return TrainedVQVAE(
        model=model.eval(),
        config=Config(model=tiny_model_config()),
        path=Path("vqvae.pt"),
        sha256=sha256,
        texture=None,
        data_reference=None,
    )
