"""Splits encoded to code-index maps by a frozen VQ-VAE: the prior's training data.

Each split is encoded once and cached beside the prior, stamped with the SHA-256 of the VQ-VAE
checkpoint and the list of slice files, so a cache (and a prior) is never paired with another
codebook or other data. The training split may also hold augmented copies of each slice's map
(data.augment), each map carrying the parameters of its augmentation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mri_vqvae.config import AugmentConfig
from mri_vqvae.data.augment import (
    AUGMENT_FORMAT,
    AUGMENTATION_PARAMETERS,
    apply_augmentations,
    sample_augmentations,
)
from mri_vqvae.data.dataset import SliceSet, slice_positions
from mri_vqvae.data.labels import (
    LabelVocabulary,
    build_vocabulary,
    encode_labels,
    split_label_values,
)
from mri_vqvae.data.nifti import DataError
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import read_stamped, save_atomic, write_stamped
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import ConditionSizes, PriorConditions
from mri_vqvae.runtime import autocast, resolve_precision
from mri_vqvae.trained import TrainedVQVAE

logger = logging.getLogger(__name__)

# Bump when the cached maps' meaning changes.
CODE_CACHE_FORMAT = 2  # 2: written through files.write_stamped


@dataclass
class CodeMaps:
    """A split as code indices ``(N, h, w)``, with each map's slice name and slice position.

    An augmented split holds several maps per slice: the plain maps first, in the split's
    order, then the augmented copies. ``names`` and ``slice_positions`` are per map (repeated
    for copies), ``augmentation`` holds each map's parameter vector (data.augment; all zeros
    for a plain map) and ``source`` the index of the plain slice each map was made from.
    """

    indices: torch.Tensor  # (N, h, w) int64
    names: list[str]
    # (N,) each slice's position in its volume in [0, 1]; NaN where the name has no slice_<S>.
    slice_positions: torch.Tensor
    num_embeddings: int
    # (N, len(AUGMENTATION_PARAMETERS)) float32; None: no map is augmented.
    augmentation: torch.Tensor | None = None
    # (N,) int64 index of each map's plain slice; None: map i is slice i.
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

    @property
    def augmentation_parameters(self) -> torch.Tensor:
        """Each map's augmentation ``(N, A)`` float32, zeros where none was applied."""
        if self.augmentation is not None:
            return self.augmentation
        return torch.zeros((len(self), len(AUGMENTATION_PARAMETERS)), dtype=torch.float32)

    @property
    def source_slices(self) -> torch.Tensor:
        """Each map's plain slice index ``(N,)`` int64 (``arange(N)`` when not augmented)."""
        if self.source is not None:
            return self.source
        return torch.arange(len(self))

    @property
    def slice_count(self) -> int:
        """The number of slices the maps came from: rows ``0 .. slice_count - 1`` are their
        plain maps (:func:`code_maps_for` puts the augmented copies after them)."""
        return len(self) if self.source is None else int(self.source.max()) + 1

    @property
    def maps_per_slice(self) -> float:
        """Maps per distinct slice: 1 for a plain split, 1 + copies for an augmented one."""
        return len(self) / max(1, self.slice_count)

    def plain(self) -> CodeMaps:
        """Only the unaugmented maps (those whose parameters are all zero)."""
        keep = self.augmentation_parameters.eq(0).all(dim=1)
        rows = keep.nonzero()[:, 0]
        return CodeMaps(
            self.indices[rows],
            [self.names[i] for i in rows.tolist()],
            self.slice_positions[rows],
            self.num_embeddings,
            source=self.source_slices[rows],
            labels=None if self.labels is None else self.labels[rows],
        )

    def changed_share_by_copy(self) -> list[float]:
        """For each augmented copy, the share of code positions that differ from the plain
        map of the same slice: 0 means the copies add nothing, near 1 that they are
        unrelated maps. Assumes :func:`code_maps_for`'s order (plain block, then copies)."""
        plain_count = self.slice_count
        if plain_count == 0 or len(self) == plain_count:
            return []
        plain = self.indices[:plain_count]
        copies = self.indices[plain_count:]
        sources = self.source_slices[plain_count:]
        changed = copies.ne(plain[sources]).flatten(1).float().mean(dim=1)
        return [float(block.mean()) for block in changed.split(plain_count)]

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


@torch.no_grad()
def encode_augmented_copies(
    model: VQVAE,
    slices: SliceSet,
    parameters: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 64,
    precision: str = "auto",
) -> torch.Tensor:
    """The code maps ``(copies * N, h, w)`` of ``copies`` augmented versions of every slice,
    copy by copy: row ``k * N + i`` is slice ``i`` changed by ``parameters[k * N + i]``
    (:func:`~mri_vqvae.data.augment.apply_augmentations`). Each batch is augmented just before
    it is encoded, so only one batch of augmented images exists at a time."""
    count = len(slices)
    if count == 0 or parameters.shape[0] == 0 or parameters.shape[0] % count:
        raise ValueError(
            f"{parameters.shape[0]} parameter vectors are not one or more copies of {count} slices"
        )
    model.eval()
    chunks = []
    steps = [
        (copy_start, start)
        for copy_start in range(0, parameters.shape[0], count)
        for start in range(0, count, batch_size)
    ]
    dtype = resolve_precision(precision, device)
    for copy_start, start in tqdm(
        steps, desc="encoding augmented copies", unit="batch", leave=False, disable=None
    ):
        rows = slice(start, min(start + batch_size, count))
        changes = parameters[copy_start + rows.start : copy_start + rows.stop]
        # Augmented in float32 outside autocast: grid_sample in bfloat16 would blur the copies.
        images = apply_augmentations(slices.batch(rows).to(device), changes.to(device))
        with autocast(device, dtype):
            chunks.append(model.encode_to_indices(images).cpu())
    return torch.cat(chunks)


def _augment_stamp(augment: AugmentConfig) -> dict:
    # The settings and the parameter vector's layout: changing either draws other copies.
    return {
        "format": AUGMENT_FORMAT,
        "parameters": list(AUGMENTATION_PARAMETERS),
        "settings": dataclasses.asdict(augment),
    }


def code_maps_for(
    slices: SliceSet,
    *,
    vqvae: TrainedVQVAE,
    cache_file: str | Path,
    batch_size: int = 64,
    augment: AugmentConfig | None = None,
) -> CodeMaps:
    """The code maps of ``slices`` by ``vqvae``, read from ``cache_file`` when it was made by
    the same VQ-VAE file from the same slices in the same precision (and augmentation
    settings), else encoded and cached there.

    With ``augment.copies > 0`` the result holds the plain maps first (rows ``0..N-1``, exactly
    the unaugmented ones), then ``copies`` augmented maps of every slice, copy by copy, their
    parameters drawn by a generator seeded with ``augment.seed``."""
    copies = augment.copies if augment is not None else 0
    precision = resolve_precision("auto", vqvae.device)
    stamp = {
        "format": CODE_CACHE_FORMAT,
        "vqvae_sha256": vqvae.sha256,
        "fingerprint": _fingerprint(slices),
        "precision": precision,
    }
    if copies:  # only then: a plain split keeps the stamp (and cache) it always had
        stamp["augment"] = _augment_stamp(augment)
    count = len(slices)
    source = torch.arange(count).repeat(1 + copies) if copies else None
    stored = read_stamped(Path(cache_file), stamp)
    if stored is None:
        stored = _encode_with_copies(slices, vqvae, augment if copies else None, batch_size)
        write_stamped(Path(cache_file), stamp, stored)
    codes = CodeMaps(
        stored["indices"].long(),
        list(slices.names) * (1 + copies),
        stored["slice_positions"],
        vqvae.model.num_embeddings,
        augmentation=stored.get("augmentation"),
        source=source,
    )
    _log_augmented(codes)
    return codes


def _encode_with_copies(
    slices: SliceSet, vqvae: TrainedVQVAE, augment: AugmentConfig | None, batch_size: int
) -> dict[str, torch.Tensor]:
    """The code maps of ``slices`` and of ``augment.copies`` augmented copies of each, with
    their slice positions and augmentation parameters, as the cache keeps them."""
    model, device = vqvae.model, vqvae.device
    precision = resolve_precision("auto", device)
    indices = encode_slices(model, slices, device, batch_size, precision)
    positions = torch.from_numpy(slice_positions(slices.names))
    # int16 holds any codebook up to 32768 codes at a quarter of int64's size.
    dtype = torch.int16 if model.num_embeddings <= 2**15 else torch.int32
    if augment is None:
        return {"indices": indices.to(dtype), "slice_positions": positions}
    count, copies = len(slices), augment.copies
    generator = torch.Generator().manual_seed(augment.seed)
    changes = sample_augmentations(count * copies, augment, generator)
    augmented = encode_augmented_copies(
        model, slices, changes, device, batch_size=batch_size, precision=precision
    )
    return {
        "indices": torch.cat([indices, augmented]).to(dtype),
        "slice_positions": positions.repeat(1 + copies),
        "augmentation": torch.cat([torch.zeros((count, changes.shape[1])), changes]),
    }


def _log_augmented(codes: CodeMaps) -> None:
    """How far each copy's maps are from the plain ones: a check that the copies are neither
    the plain maps again nor unrelated noise."""
    shares = codes.changed_share_by_copy()
    if shares:
        logger.info(
            "%d augmented copies per slice; codes differing from the plain map: %s",
            len(shares),
            ", ".join(f"copy {k + 1} {share:.1%}" for k, share in enumerate(shares)),
        )


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


def encode_splits(
    *,
    vqvae: TrainedVQVAE,
    splits: dict[str, SliceSet],
    cache_folder: Path,
    augment: AugmentConfig | None = None,
) -> dict[str, CodeMaps]:
    """Every split's code maps by ``vqvae``, each cached in ``cache_folder/<split>.pt``; the
    training split with ``augment``'s copies (the others are never augmented: they measure
    the prior on real slices)."""
    return {
        split: code_maps_for(
            slices,
            vqvae=vqvae,
            cache_file=cache_folder / f"{split}.pt",
            augment=augment if split == "train" else None,
        )
        for split, slices in splits.items()
    }


def attach_labels(
    codes: dict[str, CodeMaps], files: dict[str, list[Path]], columns: tuple[str, ...]
) -> LabelVocabulary:
    """Give each split's maps the labels of ``columns`` from the conditions.csv beside its
    ``files``; the training split's values make the vocabulary, which is returned."""
    if not columns:
        return ()
    values = {}
    for split, maps in codes.items():
        plain_names = maps.names[: maps.slice_count]
        values[split] = split_label_values(files[split], plain_names, columns)
    vocabulary = build_vocabulary(columns, values["train"])
    for split, maps in codes.items():
        labels = encode_labels(values[split], vocabulary)
        # Augmented copies carry the labels of the slice they came from.
        maps.labels = labels if maps.source is None else labels[maps.source]
    for name, known in vocabulary:
        logger.info("label %s: %d values (%s)", name, len(known), ", ".join(known[:8]))
    return vocabulary


def check_same_vocabulary(
    vocabulary: LabelVocabulary, saved: LabelVocabulary, table_folder: Path
) -> None:
    """A resumed prior's labels must mean what they meant: the same values in the same order
    as the ``saved`` ones it began with."""
    now = [[name, list(values)] for name, values in vocabulary]
    then = [[name, list(values)] for name, values in saved]
    if now != then:
        raise ConfigError(
            f"the labels in the conditions.csv beside {table_folder} are not the ones this prior "
            f"began with ({then} then, {now} now): its label indices would change meaning; "
            "restore the table or train a new prior"
        )


def condition_sizes(
    codes: CodeMaps, vocabulary: LabelVocabulary, *, slice_position: bool
) -> ConditionSizes:
    """What a prior trained on ``codes`` is conditioned on: the slice position if asked, the
    vocabulary's labels, and the augmentation the maps carry."""
    if slice_position:
        require_slice_positions(codes, "training split")
    augmentation = 0 if codes.augmentation is None else codes.augmentation.shape[1]
    return ConditionSizes(
        position=slice_position,
        labels=tuple(len(values) for _, values in vocabulary),
        augmentation=augmentation,
    )


def log_code_maps(codes: dict[str, CodeMaps]) -> None:
    """One line on the maps a prior is about to model."""
    train, val = codes["train"], codes["val"]
    logger.info(
        "prior over %s maps of %d codes: %s; unigram %.3f bits/code",
        "x".join(str(side) for side in train.grid_shape),
        train.num_embeddings,
        f"{len(train)} train maps ({train.maps_per_slice:g} per slice) / {len(val)} val maps",
        val.unigram_bits(),
    )


def save_sample_codes(codes: torch.Tensor, path: Path) -> None:
    """Keep the ``(N, h, w)`` code maps of drawn samples (``codes.pt`` of a sample folder)."""
    save_atomic({"codes": codes.to(torch.int32)}, path)


def load_sample_codes(path: str | Path) -> torch.Tensor:
    """The ``(N, h, w)`` code maps :func:`save_sample_codes` kept."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["codes"].long()
    except Exception as err:  # damaged or foreign: fail in many ways inside torch.load
        raise DataError(
            path, f"is not the codes file that sample writes, or is damaged ({type(err).__name__})"
        ) from err
