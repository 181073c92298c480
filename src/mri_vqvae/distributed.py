"""Several processes, one model: the process group ``torchrun`` describes, and the few
collective operations training needs.

``torchrun --nproc-per-node N -m mri_vqvae train ...`` starts N copies of the command; each
reads its rank from the environment. NCCL joins GPU processes, Gloo CPU ones. In a single
process (no ``torchrun``) every helper here does nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from mri_vqvae.errors import ConfigError
from mri_vqvae.runtime import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, logs and pictures."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of ``indices`` (blocks differ in length by at most
        one): the ranks' blocks, in rank order, are ``indices`` again."""
        if not self.enabled:
            return indices
        return indices.tensor_split(self.world_size)[self.rank]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes, in place."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s largest value over all processes, in place."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The block runs on the main process first, then on the others: what the main one
        caches (decoded splits, code maps), the others read instead of making again."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE_PROCESS = ProcessGroup()


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DDP, which averages its gradients over the processes. Buffers are
    not broadcast each step: the VQ-VAE's codebook statistics are kept equal by the
    quantiser's own collectives, and a discriminator has none."""
    from torch.nn.parallel import DistributedDataParallel

    buffer_option = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}  # its name before torch 2.13
    )
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **buffer_option
    )


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` group, or a process on its own: the one that writes files
    (known from the environment, before any group is joined)."""
    return os.environ.get("RANK", "0") == "0"


# Whether this process joined a group of several: see finish_process.
_joined_a_group = False


def join_process_group(device_name: str = "auto") -> tuple[ProcessGroup, torch.device]:
    """Join the process group ``torchrun`` set up in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and pick this
    process's device: GPU ``LOCAL_RANK`` with NCCL when CUDA is used, else the CPU with Gloo.
    Without those variables it returns a single process and :func:`resolve_device`'s device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS, resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank} has LOCAL_RANK {local_rank}, but torch sees only "
                f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    global _joined_a_group
    _joined_a_group = True
    group = ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank)
    logger.info("process %d of %d on %s (%s)", rank, world_size, device, backend)
    return group, device


def leave_process_group() -> None:
    """Tear the process group down, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_process(exit_status: int) -> NoReturn:
    """End the process with ``exit_status``; the last call of a command-line run.

    A process that joined a group of several leaves without the interpreter's shutdown, as
    ``multiprocessing`` workers do. DDP keeps its backend alive past
    ``destroy_process_group`` (torch 2.13), so the backend's threads outlive the run, and one
    that touches a Python object while the interpreter is being torn down aborts the process
    ("terminate called without an active exception") after all its work is done; ``torchrun``
    then reports the whole run as failed. Everything the run wrote is already closed and
    synced, so only the logs and standard streams need flushing first.
    """
    if not _joined_a_group:
        raise SystemExit(exit_status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe loses nothing more
            stream.flush()
    os._exit(exit_status)
