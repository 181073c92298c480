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

from mri_vqvae.errors import ConfigError, shown

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
        reason = (str(err).splitlines() or [""])[0][:200]  # torch repeats the whole name
        raise ConfigError(f"--device {shown(name)} is not a device torch knows: {reason}") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {shown(name)}: mri-vqvae runs on cpu or cuda devices only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {shown(name)} asked for CUDA, but torch sees no CUDA device")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ConfigError(f"--device {shown(name)}: torch sees {count} CUDA device(s)")
    return device


# oneDNN's instruction sets as the bit masks of its ``dnnl_cpu_isa_t``: a set includes every
# set whose mask its own contains. ``ONEDNN_MAX_CPU_ISA`` names one of them as a cap.
_ONEDNN_ISAS = {
    "SSE41": 0x1,
    "AVX": 0x3,
    "AVX2": 0x7,
    "AVX2_VNNI": 0xF,
    "AVX2_VNNI_2": 0x1F,
    "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67,
    "AVX512_CORE_BF16": 0xE7,
    "AVX10_1_512": 0x1EF,
    "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF,
    "AVX512_CORE_AMX": 0xFEF,
    "AVX10_1_512_AMX_FP16": 0x1FEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF,
}

# CPU features that multiply bfloat16 matrices in hardware, best first: the /proc/cpuinfo
# flag, the oneDNN instruction set that uses it, and its name in messages. Without either,
# torch emulates bfloat16 products, about 300x slower than float32 (docs/journal.md).
_BFLOAT16_UNITS = (
    ("amx_bf16", "AVX512_CORE_AMX", "AMX"),
    ("avx512_bf16", "AVX512_CORE_BF16", "AVX-512 BF16"),
)


def _onednn_cap() -> str:
    """``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``), upper case; "" if unset."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.strip().upper()


def onednn_allows(isa: str) -> bool:
    """Whether oneDNN may use its instruction set ``isa``: True unless ``ONEDNN_MAX_CPU_ISA``
    caps it below. Capped at AVX2 on an AMX CPU, a bfloat16 product ran 1500x slower than
    uncapped (docs/journal.md). A name oneDNN does not know caps nothing, as it ignores it."""
    cap = _onednn_cap()
    if cap in ("", "ALL", "DEFAULT") or cap not in _ONEDNN_ISAS:
        return True
    needed = _ONEDNN_ISAS[isa]
    return _ONEDNN_ISAS[cap] & needed == needed


def onednn_may_use_amx() -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` leaves oneDNN its AMX kernels."""
    return onednn_allows("AVX512_CORE_AMX")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where /proc/cpuinfo is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bfloat16_units() -> tuple[str | None, str]:
    """The bfloat16 matrix units of this CPU that oneDNN will use ("AMX", "AVX-512 BF16"),
    or None, and a sentence saying why."""
    flags = _cpu_flags()
    present = [(isa, name) for flag, isa, name in _BFLOAT16_UNITS if flag in flags]
    for isa, name in present:
        if onednn_allows(isa):
            return name, f"this CPU has {name} instructions, which oneDNN uses for bfloat16"
    if present:
        return None, (
            f"this CPU has {present[0][1]} instructions, but ONEDNN_MAX_CPU_ISA={_onednn_cap()} "
            "caps oneDNN below them, so bfloat16 would be emulated"
        )
    return None, (
        "this CPU has no bfloat16 matrix instructions (neither AMX nor AVX-512 BF16), so "
        "bfloat16 would be emulated"
    )


def cpu_has_bfloat16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware that oneDNN will use."""
    return bfloat16_units()[0] is not None


def precision_choice(
    precision: str, device: torch.device, setting: str = "precision"
) -> tuple[str, str]:
    """What ``precision`` means on ``device``, and why, for the run's log: ``"auto"``
    becomes ``"bfloat16"`` where the hardware multiplies bfloat16 matrices (CUDA GPUs that
    support it; CPUs with AMX or AVX-512 BF16 that oneDNN may use) and ``"float32"``
    elsewhere. ``"float16"`` (for GPUs without bfloat16) is refused on a CPU, naming
    ``setting``."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    if precision == "float16" and device.type != "cuda":
        raise ConfigError(
            f"{setting}=float16 is for CUDA GPUs; on {device.type} use bfloat16 (fast on CPUs "
            "with AMX or AVX-512 BF16) or float32"
        )
    if precision != "auto":
        return precision, f"{setting} {precision}"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        why = "supports" if supported else "does not support"
        return ("bfloat16" if supported else "float32"), f"auto: this GPU {why} bfloat16"
    _units, why = bfloat16_units()
    if cpu_has_bfloat16_matrix_units():
        return "bfloat16", f"auto: {why}"
    return "float32", f"auto: {why}"


def resolve_precision(precision: str, device: torch.device, setting: str = "precision") -> str:
    """``precision`` as :func:`precision_choice` resolves it on ``device``."""
    return precision_choice(precision, device, setting)[0]


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
