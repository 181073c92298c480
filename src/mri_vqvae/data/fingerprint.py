"""What a run was trained on, by content: each split's slice files as digests of their bytes,
kept in the run's checkpoints so that ``--resume`` on other slices is refused.

The digests are the ones the dataset cache already takes of every file (BLAKE2 of its bytes),
so a fingerprint costs no second read. They are kept sorted and without paths or names: the
same slices moved to another folder, or renamed, are the same data; one changed voxel is not.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mri_vqvae.errors import ConfigError, shown

if TYPE_CHECKING:  # dataset.py imports this module: the name is for annotations only
    from mri_vqvae.data.dataset import SliceSet

logger = logging.getLogger(__name__)

# The key of a checkpoint's extras that holds the fingerprints of the splits its run used.
TRAINING_DATA = "training_data"
# A hex digest, or the word the cache puts for a file it could not read ("unreadable").
_DIGEST = re.compile(r"^[0-9a-z-]{1,128}$")


@dataclass(frozen=True)
class SplitFingerprint:
    """A split's slice files by content: the folder they were read from (for messages only)
    and the sorted digests of the files' bytes."""

    folder: str
    file_digests: tuple[str, ...]

    @classmethod
    def of_files(cls, folder: str | Path, digests: list[str]) -> SplitFingerprint:
        """The fingerprint of files in ``folder`` whose bytes have ``digests``."""
        return cls(folder=str(folder), file_digests=tuple(sorted(digests)))

    @property
    def num_files(self) -> int:
        return len(self.file_digests)

    @property
    def digest(self) -> str:
        """One short hash of every file's digest, for messages."""
        return hashlib.sha256("\n".join(self.file_digests).encode()).hexdigest()[:16]

    def shared_with(self, other: SplitFingerprint) -> int:
        """How many of this split's files have the same bytes as one of ``other``'s."""
        return sum((Counter(self.file_digests) & Counter(other.file_digests)).values())

    def same_data(self, other: SplitFingerprint) -> bool:
        """Whether both hold the same files' bytes (wherever they were read from)."""
        return self.file_digests == other.file_digests

    def to_plain(self) -> dict[str, Any]:
        """Text and lists, as a checkpoint's extras take them."""
        return {"folder": self.folder, "file_digests": list(self.file_digests)}

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> SplitFingerprint:
        """Undo :meth:`to_plain`; ``ValueError`` (or ``KeyError``/``TypeError``) for anything
        that is not what it wrote."""
        digests = value["file_digests"]
        if not isinstance(digests, (list, tuple)) or not all(
            isinstance(d, str) and _DIGEST.match(d) for d in digests
        ):
            raise ValueError(f"file digests {shown(digests)} are not digests")
        return cls(folder=str(value["folder"]), file_digests=tuple(sorted(digests)))


def fingerprints_of(**splits: SliceSet) -> dict[str, SplitFingerprint]:
    """The fingerprints of the named splits that have one (those read from files), as
    :func:`check_resumed_data` and a checkpoint take them: ``fingerprints_of(train=...)``."""
    return {name: s.fingerprint for name, s in splits.items() if s.fingerprint is not None}


def fingerprints_to_plain(prints: dict[str, SplitFingerprint]) -> dict[str, Any]:
    """Each split's fingerprint as plain values, by split name."""
    return {split: fingerprint.to_plain() for split, fingerprint in prints.items()}


def fingerprints_from_plain(value: Any) -> dict[str, SplitFingerprint]:
    """Undo :func:`fingerprints_to_plain`; ``ValueError``, ``KeyError`` or ``TypeError`` for
    anything else."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping of splits, got {shown(value)}")
    return {str(split): SplitFingerprint.from_plain(plain) for split, plain in value.items()}


def check_resumed_data(
    saved: dict[str, SplitFingerprint] | None,
    given: dict[str, SplitFingerprint],
    *,
    run: str | Path,
) -> None:
    """Refuse to continue the run in ``run``, trained on the ``saved`` splits, on ``given``
    splits whose files hold other bytes: its weights, optimiser state and best score belong
    to the data it began with. A run that recorded no fingerprints (written before they were
    kept) is let through with a warning, as are ``given`` splits without fingerprints (built
    in memory), which cannot be compared."""
    if not given:
        return
    if saved is None:
        logger.warning(
            "--resume: %s records no fingerprint of its training slices (written by an older "
            "version, or trained on slices built in memory): cannot check that the data given "
            "is the data it was trained on",
            run,
        )
        return
    differences = [
        _difference(split, saved[split], given[split])
        for split in given
        if split in saved and not saved[split].same_data(given[split])
    ]
    if differences:
        raise ConfigError(
            f"--resume: {run} was "
            + "; and ".join(differences)
            + "; resume with the same data, or start a new run (--overwrite, or another --out)"
        )
    for split in given:
        if split in saved and saved[split].folder != given[split].folder:
            logger.info(
                "--resume: the %s slices are read from %s now (%s then), with the same bytes",
                split,
                given[split].folder,
                saved[split].folder,
            )


def _difference(split: str, saved: SplitFingerprint, given: SplitFingerprint) -> str:
    verb = {"train": "trained", "val": "validated"}.get(split, f"given {split} slices")
    shared = given.shared_with(saved)
    return (
        f"{verb} on {saved.num_files} slices in {saved.folder} (fingerprint {saved.digest}), "
        f"but the {split} split given holds {given.num_files} in {given.folder} (fingerprint "
        f"{given.digest}), {_count(shared, given.num_files)} of them among those"
    )


def _count(shared: int, total: int) -> str:
    if shared == 0:
        return "none"
    return "all" if shared == total else str(shared)
