"""Distributed data parallel training on 2 CPU processes (Gloo): the ranks stay identical and
follow the run one process makes with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mri_vqvae.checkpoint import load_checkpoint
from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import load_splits, resolve_split_files
from mri_vqvae.distributed import ProcessGroup, leave_process_group
from mri_vqvae.model import VQVAE
from tests.helpers import TINY_SIZE, fit_vqvae, free_port, join_test_group, tiny_config

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)

# 24 training slices in batches of 9: 9, 9 and 6 images, so the shards of the first two
# batches differ in size (5 and 4) and the loss scaling that evens them out is exercised.
BATCH_SIZE = 9


def distributed_config():
    # float32 on every machine, and more codes than the data fills with a restart threshold of
    # 1 step, so dead-code restarts (which gather latents from every rank) happen.
    config = tiny_config(epochs=2, batch_size=BATCH_SIZE, precision="float32")
    return replace(config, model=replace(config.model, num_embeddings=256, dead_code_steps=1))


def train_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ["MRI_VQVAE_CACHE"] = str(Path(out) / f"cache{rank}")
    processes, device = join_test_group(rank, world_size, port)
    try:
        config = distributed_config()
        data = load_splits(resolve_split_files(root), config.data, splits=("train", "val"))
        torch.manual_seed(config.train.seed)
        model = VQVAE.from_config(config.model)
        result = fit_vqvae(
            model, data, config, Path(out) / "run", device=device, processes=processes
        )
        torch.save(
            {"state": model.state_dict(), "history": result.history},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        leave_process_group()


@pytest.fixture(scope="module")
def two_process_run(phantom_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        train_rank,
        args=(2, free_port(), str(phantom_root), str(out)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return out


def one_process_run(phantom_root: Path, out: Path):
    config = distributed_config()
    data = load_splits(resolve_split_files(phantom_root), DataConfig(image_size=TINY_SIZE))
    torch.manual_seed(config.train.seed)
    model = VQVAE.from_config(config.model)
    result = fit_vqvae(model, data, config, out)
    return model, result


@pytest.mark.slow
def test_ranks_end_with_identical_weights_and_codebooks(two_process_run: Path):
    first = torch.load(two_process_run / "rank0.pt", weights_only=True)["state"]
    second = torch.load(two_process_run / "rank1.pt", weights_only=True)["state"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert int(first["quantizer.restart_count"]) > 0  # restarts ran, and agreed


@pytest.mark.slow
def test_two_processes_follow_one_process_with_the_whole_batch(
    two_process_run: Path, phantom_root: Path, tmp_path: Path
):
    model, result = one_process_run(phantom_root, tmp_path / "single")
    distributed = torch.load(two_process_run / "rank0.pt", weights_only=True)
    single_losses = [row["train_loss"] for row in result.history]
    ddp_losses = [row["train_loss"] for row in distributed["history"]]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    checkpoint = load_checkpoint(two_process_run / "run" / "last.pt")
    assert checkpoint.extras["batch_losses"] == pytest.approx(
        load_checkpoint(tmp_path / "single" / "last.pt").extras["batch_losses"], rel=1e-4
    )
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed["state"][name], value, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_only_the_main_process_writes_the_run_folder(two_process_run: Path):
    run = two_process_run / "run"
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint.progress.epoch == 2
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header and two epochs
    assert (run / "reconstructions" / "val" / "epoch_2.png").is_file()
    assert checkpoint.config.train.precision == "float32"


@pytest.mark.slow
def test_a_run_resumes_in_one_process_after_two(two_process_run: Path, phantom_root, tmp_path):
    checkpoint = load_checkpoint(two_process_run / "run" / "last.pt")
    config = replace(checkpoint.config, train=replace(checkpoint.config.train, epochs=3))
    checkpoint = replace(checkpoint, config=config)
    data = load_splits(resolve_split_files(phantom_root), config.data)
    model = VQVAE.from_config(config.model)
    model.load_state_dict(checkpoint.model_state)
    result = fit_vqvae(model, data, config, tmp_path / "resumed", resume=checkpoint)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["global_step"] == 3 * 3


def test_shards_are_contiguous_blocks_in_rank_order():
    indices = torch.arange(9)
    blocks = [ProcessGroup(rank=r, world_size=2).shard(indices) for r in range(2)]
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert ProcessGroup().shard(indices) is indices


FINISH = """
import atexit, sys
from mri_vqvae import distributed
atexit.register(lambda: print("interpreter shut down", flush=True))
distributed._joined_a_group = {joined}
print("work done")  # a pipe buffers this: finish_process must flush it
distributed.finish_process(5)
"""


@pytest.mark.slow
@pytest.mark.parametrize("joined", [True, False])
def test_a_group_member_ends_without_the_interpreters_shutdown(joined: bool):
    # DDP's backend threads outlive destroy_process_group; a member of a group of processes
    # must not leave them to race the interpreter's teardown.
    result = subprocess.run(
        [sys.executable, "-c", FINISH.format(joined=joined)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 5, result.stderr
    assert result.stdout.startswith("work done\n")
    assert ("interpreter shut down" in result.stdout) is not joined


class Crash(Exception):
    pass


def resume_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ["MRI_VQVAE_CACHE"] = str(Path(out) / f"cache{rank}")
    processes, device = join_test_group(rank, world_size, port)
    try:
        checkpoint = load_checkpoint(Path(out) / "crashed" / "last.pt")
        config = checkpoint.config
        data = load_splits(resolve_split_files(root), config.data, splits=("train", "val"))
        model = VQVAE.from_config(config.model)
        model.load_state_dict(checkpoint.model_state)
        fit_vqvae(
            model,
            data,
            config,
            Path(out) / "crashed",
            device=device,
            resume=checkpoint,
            processes=processes,
        )
    finally:
        leave_process_group()


@pytest.mark.slow
def test_two_processes_resume_a_mid_epoch_checkpoint_of_one(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    # Only the main process takes back the saved step sums; the other must hold as many rows
    # (of zeros), or the sums across processes would meet tensors of different shapes.
    config = replace(
        distributed_config(), train=replace(distributed_config().train, checkpoint_every=1)
    )
    data = load_splits(resolve_split_files(phantom_root), config.data)
    torch.manual_seed(config.train.seed)
    straight = fit_vqvae(VQVAE.from_config(config.model), data, config, tmp_path / "straight")
    from mri_vqvae.train import vqvae as training

    real_loss, calls = training.VQVAETask.loss, []

    def crashing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the mid-epoch checkpoint of step 2 of epoch 1
            raise Crash
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training.VQVAETask, "loss", crashing_loss)
    torch.manual_seed(config.train.seed)
    with pytest.raises(Crash):
        fit_vqvae(VQVAE.from_config(config.model), data, config, tmp_path / "crashed")
    assert load_checkpoint(tmp_path / "crashed" / "last.pt").progress.mid_epoch
    mp.start_processes(
        resume_rank,
        args=(2, free_port(), str(phantom_root), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    resumed = load_checkpoint(tmp_path / "crashed" / "last.pt").progress.history
    assert [row["images_seen"] for row in resumed] == [24, 48]
    assert [row["train_loss"] for row in resumed] == pytest.approx(
        [row["train_loss"] for row in straight.history], rel=1e-4
    )
