"""Splits encoded to code-index maps by a frozen VQ-VAE: the prior's training data.

Each split is encoded once and cached beside the prior, stamped with the SHA-256 of the VQ-VAE
checkpoint and the list of slice files, so a cache (and a prior) is never paired with another
codebook or other data.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mri_vqvae.data.dataset import SliceSet, slice_positions
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import read_stamped, write_stamped
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import ConditionSizes, PriorConditions
from mri_vqvae.runtime import autocast, resolve_precision

logger = logging.getLogger(__name__)

# Bump when the cached maps' meaning changes.
CODE_CACHE_FORMAT = 2  # 2: written through files.write_stamped


@dataclass
class CodeMaps:
    """A split as code indices ``(N, h, w)``, with its slice names and slice positions."""

    indices: torch.Tensor  # (N, h, w) int64
    names: list[str]
    # (N,) each slice's position in its volume in [0, 1]; NaN where the name has no slice_<S>.
    slice_positions: torch.Tensor
    num_embeddings: int
    # (N, A) the augmentation parameters each map was encoded with, zero for a plain slice;
    # None when no map is augmented.
    augmentation: torch.Tensor | None = None
    # (N,) the plain slice each map came from; None when every map is a plain slice.
    source: torch.Tensor | None = None
    # (N, L) each map's categorical labels counted from 1, 0 where unknown; None without.
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.indices.shape[1], self.indices.shape[2])

    def conditions(
        self, rows: torch.Tensor, sizes: ConditionSizes, device: torch.device
    ) -> PriorConditions | None:
        """The conditions of maps ``rows`` that a prior conditioned on ``sizes`` takes."""
        if not sizes.any:
            return None
        position = labels = augmentation = None
        if sizes.position:
            position = self.slice_positions[rows].float()
        if sizes.labels:
            labels = self.labels[rows]
        if sizes.augmentation:
            augmentation = (
                self.augmentation[rows]
                if self.augmentation is not None
                else torch.zeros(len(rows), sizes.augmentation)
            )
        return PriorConditions(position, labels, augmentation).to(device)

    def code_counts(self) -> torch.Tensor:
        """How often each code occurs over the whole split, ``(num_embeddings,)``."""
        return torch.bincount(self.indices.flatten(), minlength=self.num_embeddings)

    def unigram_bits(self) -> float:
        """Entropy of the split's code histogram in bits per code: the negative log-likelihood
        of the best model that ignores context, the baseline a prior must beat."""
        counts = self.code_counts().double()
        probabilities = counts[counts > 0] / counts.sum()
        return float(-(probabilities * probabilities.log2()).sum())


@torch.no_grad()
def encode_slices(
    model: VQVAE,
    slices: SliceSet,
    device: torch.device,
    batch_size: int = 64,
    precision: str = "auto",
) -> torch.Tensor:
    """Every image of ``slices`` to its ``(N, h, w)`` code indices, in eval mode.

    The encoder runs in ``precision`` (``"auto"``: bfloat16 where training would use it); the
    nearest-code search is always float32. On the demo VQ-VAE bfloat16 encoded 2.8x faster
    than float32 and chose another code for 1.0% of positions, whose reconstructions had the
    same SSIM to 5 decimals (docs/benchmarks.md).
    """
    model.eval()
    chunks = []
    steps = range(0, len(slices), batch_size)
    with autocast(device, resolve_precision(precision, device)):
        for start in tqdm(steps, desc="encoding", unit="batch", leave=False, disable=None):
            images = slices.batch(slice(start, start + batch_size)).to(device)
            chunks.append(model.encode_to_indices(images).cpu())
    return torch.cat(chunks)


def _fingerprint(slices: SliceSet) -> list[str]:
    # The names, shape and decoded pixels' sum identify the data a cache was made from; the sum
    # runs in chunks so a HipMRI-sized split is never copied whole to float32.
    total = sum(float(chunk.double().sum()) for chunk in slices.images.split(1024))
    return [*slices.names, f"{total:.9e}", str(tuple(slices.images.shape))]


def code_maps_for(
    model: VQVAE,
    vqvae_sha256: str,
    slices: SliceSet,
    cache_file: str | Path,
    device: torch.device,
    batch_size: int = 64,
) -> CodeMaps:
    """The code maps of ``slices``, read from ``cache_file`` when it was made by the same
    VQ-VAE file from the same slices in the same precision, else encoded and cached there."""
    fingerprint = _fingerprint(slices)
    precision = resolve_precision("auto", device)
    stamp = {
        "format": CODE_CACHE_FORMAT,
        "vqvae_sha256": vqvae_sha256,
        "fingerprint": fingerprint,
        "precision": precision,
    }
    stored = read_stamped(Path(cache_file), stamp)
    if stored is not None:
        return CodeMaps(
            stored["indices"].long(),
            list(slices.names),
            stored["slice_positions"],
            model.num_embeddings,
        )
    indices = encode_slices(model, slices, device, batch_size, precision)
    positions = torch.from_numpy(slice_positions(slices.names))
    # int16 holds any codebook up to 32768 codes at a quarter of int64's size.
    dtype = torch.int16 if model.num_embeddings <= 2**15 else torch.int32
    payload = {"indices": indices.to(dtype), "slice_positions": positions}
    write_stamped(Path(cache_file), stamp, payload)
    return CodeMaps(indices, list(slices.names), positions, model.num_embeddings)


def require_slice_positions(codes: CodeMaps, label: str) -> None:
    """Raise ``ValueError`` naming the slices whose names carry no ``slice_<S>``."""
    missing = [
        name for name, p in zip(codes.names, codes.slice_positions, strict=True) if math.isnan(p)
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ConfigError(
            f"{label}: {len(missing)} slice name(s) carry no '_slice_<S>' number to take a "
            f"position from ({shown}); train without prior.condition_on_slice_position"
        )
