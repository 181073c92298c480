"""The numpy archives an evaluation keeps for its report: example reconstructions and the
codebook atlas. Written without pickle and read back checked, array by array."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from mri_vqvae.files import replaced_atomically
from mri_vqvae.records import RecordError

Archive = TypeVar("Archive", bound="ArrayRecord")


class ArrayRecord:
    """A frozen dataclass of numpy arrays kept as one ``.npz`` archive. ``DIMENSIONS`` gives
    each array's number of dimensions, so an archive of other arrays is refused by name."""

    DESCRIPTION: ClassVar[str]
    DIMENSIONS: ClassVar[dict[str, int]]

    def write(self, path: Path) -> Path:
        """Write the arrays, compressed, whole or not at all."""
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        with replaced_atomically(Path(path), suffix=".npz") as partial:
            np.savez_compressed(partial, **arrays)
        return Path(path)

    @classmethod
    def read(cls: type[Archive], path: Path) -> Archive:
        """The archive at ``path``, checked: every array present with its number of
        dimensions, all of one length along the first."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError) as err:
            raise RecordError(f"{path}: cannot read it as {cls.DESCRIPTION} ({err})") from err
        for name, dimensions in cls.DIMENSIONS.items():
            if name not in arrays:
                raise RecordError(f"{path}: {name}: missing")
            if arrays[name].ndim != dimensions:
                raise RecordError(
                    f"{path}: {name}: expected {dimensions} dimensions, got {arrays[name].ndim}"
                )
        return cls(**{name: arrays[name] for name in cls.DIMENSIONS})


@dataclass(frozen=True)
class ExampleReconstructions(ArrayRecord):
    """The best, worst and random reconstructions of a split beside their originals
    (``(K, H, W)`` float16 on [-1, 1]), with each one's kind, file name, SSIM and PSNR."""

    DESCRIPTION: ClassVar[str] = "an evaluation's examples.npz"
    DIMENSIONS: ClassVar[dict[str, int]] = {
        "kind": 1,
        "names": 1,
        "images": 3,
        "reconstructions": 3,
        "ssim": 1,
        "psnr": 1,
    }
    KINDS: ClassVar[tuple[str, ...]] = ("best", "worst", "random")

    kind: np.ndarray
    names: np.ndarray
    images: np.ndarray
    reconstructions: np.ndarray
    ssim: np.ndarray
    psnr: np.ndarray

    def rows_of(self, kind: str) -> list[int]:
        """The rows holding examples of ``kind``, in order."""
        return [int(row) for row in np.flatnonzero(self.kind == kind)]


@dataclass(frozen=True)
class CodebookAtlas(ArrayRecord):
    """Each code's count over a split and, for the most used codes, image patches where it
    occurs (``(codes, patches, height, width)``, NaN where a code has fewer), each with the
    (image, grid row, grid column) it came from."""

    DESCRIPTION: ClassVar[str] = "an evaluation's codebook.npz"
    DIMENSIONS: ClassVar[dict[str, int]] = {
        "counts": 1,
        "top_codes": 1,
        "patches": 4,
        "patch_sources": 3,
        "cell_size": 1,
        "grid_shape": 1,
    }

    counts: np.ndarray
    top_codes: np.ndarray
    patches: np.ndarray
    patch_sources: np.ndarray
    cell_size: np.ndarray
    grid_shape: np.ndarray
