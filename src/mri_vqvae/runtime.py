"""Seeding, device choice, mixed precision and the process's memory allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from mri_vqvae.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; any other name is checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device torch knows: {err}") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: mri-vqvae runs on cpu or cuda devices only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asked for CUDA, but torch sees no CUDA device")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ConfigError(f"--device {name!r}: torch sees {count} CUDA device(s)")
    return device


def onednn_may_use_amx() -> bool:
    """False when ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``) caps oneDNN,
    which runs torch's bfloat16 matrix products on a CPU, below AMX: capped at AVX2 on an AMX
    CPU, a bfloat16 product ran 1500x slower than uncapped (docs/benchmarks.md)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    cap = cap.strip().upper()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


@functools.cache
def _cpuinfo_has_amx_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines()
    )


def cpu_has_bfloat16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX, read from
    ``/proc/cpuinfo``; False where that cannot be read) and oneDNN is allowed to use it."""
    if not _cpuinfo_has_amx_bf16():
        return False
    if onednn_may_use_amx():
        return True
    _say_amx_is_capped()
    return False


@functools.cache
def _say_amx_is_capped() -> None:
    # Once per process: a user who set the cap long ago sees why auto chose float32.
    logger.info(
        "precision auto: this CPU has AMX, but ONEDNN_MAX_CPU_ISA caps oneDNN below it, so "
        "bfloat16 would be emulated; float32 instead"
    )


def resolve_precision(precision: str, device: torch.device, setting: str = "precision") -> str:
    """``"auto"`` becomes ``"bfloat16"`` where it is faster than float32 at equal quality
    (CUDA GPUs with bfloat16 support; CPUs with AMX, where it trained 2.5-3x faster, see
    docs/benchmarks.md) and ``"float32"`` elsewhere; the other choices are returned as given.
    ``"float16"`` (for GPUs without bfloat16) is refused on a CPU, naming ``setting``."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision == "float16" and device.type != "cuda":
        raise ConfigError(
            f"{setting}=float16 is for CUDA GPUs; on {device.type} use bfloat16 (fast on CPUs "
            "with AMX) or float32"
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and cpu_has_bfloat16_matrix_units():
        return "bfloat16"
    return "float32"


AUTOCAST_TYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass: ``"bfloat16"`` and ``"float16"``
    autocast matrix work on ``device`` (the quantiser keeps its distances and codebook update
    in float32); ``"float32"`` changes nothing; ``"auto"`` is :func:`resolve_precision`'s
    choice."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
    if precision == "float32":
        return contextlib.nullcontext()
    if precision in AUTOCAST_TYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_TYPES[precision])
    raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")


def gradient_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 training, whose small gradients would otherwise underflow
    (bfloat16 has float32's range and needs none); None for the other precisions."""
    if precision != "float16":
        return None
    return torch.amp.GradScaler(device.type)


# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Stop glibc handing large freed blocks back to the kernel at once.

    By default glibc serves each allocation over 32 MiB with its own ``mmap`` and returns it
    with ``munmap`` when freed, so every training step faults in its activations' pages
    afresh: on 2 CPU cores that cost a quarter of the step (seed shape, batch 32: 74.6 to
    97.1 images/s in bfloat16, docs/benchmarks.md). Raising the mmap and trim thresholds to
    ``threshold_bytes`` keeps such blocks in the heap for reuse; the process keeps up to that
    much freed memory. Returns whether the setting took (only on glibc); calling it again
    does nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = (
            (_M_MMAP_THRESHOLD, threshold_bytes),
            (_M_TRIM_THRESHOLD, threshold_bytes),
            (_M_TOP_PAD, threshold_bytes // 4),
        )
        applied = all(libc.mallopt(option, ctypes.c_int(value)) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False
    if not applied:
        logger.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return applied
