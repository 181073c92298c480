"""The training slices' typical geometry and intensity scale: what a generated slice needs to
open in a viewer beside them at the right size, place and brightness.

It is worked out once from the training split (when the VQ-VAE trains), kept in the VQ-VAE
checkpoint as plain values, and used when samples are written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.data.nifti import SliceGeometry, usable_geometry
from mri_vqvae.errors import shown

# Geometries are compared after rounding to this many decimals (1e-4 mm), so the float32
# rounding of one scanner's headers does not split one geometry in two.
_DECIMALS = 4


@dataclass(frozen=True)
class DataReference:
    """The most common geometry among ``num_slices`` training slices and their typical
    intensity range (the median over slices of each slice's minimum and maximum)."""

    geometry: SliceGeometry
    intensity_range: tuple[float, float]
    num_slices: int
    # Slices sharing the geometry's shape, voxel sizes, orientation, unit and form codes.
    geometry_count: int
    # Of those, slices whose whole affine (the origin too) is the one kept.
    affine_count: int

    @property
    def shape(self) -> tuple[int, int]:
        """The training slices' native in-plane shape."""
        return self.geometry.shape

    def describe_geometry(self) -> str:
        """Where the geometry came from, in a sentence for ``samples.json``."""
        return (
            f"the most common geometry among {self.num_slices} training slices of the VQ-VAE: "
            f"{self.geometry_count} share its shape, voxel sizes and orientation, "
            f"{self.affine_count} of them its whole affine (origin included)"
        )

    def describe_intensities(self) -> str:
        """How the intensity range was chosen, in a sentence for ``samples.json``."""
        return (
            "decoded values in [0, 1] mapped linearly onto the median over "
            f"{self.num_slices} training slices of each slice's minimum and maximum"
        )

    def to_plain(self) -> dict[str, Any]:
        """Lists, numbers and text, as a checkpoint's extras and JSON take them."""
        return {
            "geometry": self.geometry.to_plain(),
            "intensity_range": list(self.intensity_range),
            "num_slices": self.num_slices,
            "geometry_count": self.geometry_count,
            "affine_count": self.affine_count,
        }

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> DataReference:
        """Undo :meth:`to_plain`; ``ValueError``, ``KeyError`` or ``TypeError`` for anything
        else."""
        low, high = (float(x) for x in value["intensity_range"])
        if not (np.isfinite([low, high]).all() and low < high):
            raise ValueError(f"intensity range {shown(value['intensity_range'])} is not low < high")
        # Repaired as a training slice's is now: a reference written before that may hold a
        # singular affine, which nibabel cannot write samples in.
        geometry, _ = usable_geometry(SliceGeometry.from_plain(value["geometry"]))
        return cls(
            geometry=geometry,
            intensity_range=(low, high),
            num_slices=int(value["num_slices"]),
            geometry_count=int(value["geometry_count"]),
            affine_count=int(value["affine_count"]),
        )


def _rounded(values) -> tuple:
    return tuple(np.round(np.asarray(values, dtype=np.float64), _DECIMALS).ravel().tolist())


def _frame(geometry: SliceGeometry) -> tuple:
    """What must agree for two slices to share a geometry: all of it but the affine's origin.
    Slices cut from one volume often differ only in their origin along the slice axis, and a
    generated slice has no position of its own."""
    orientation = np.asarray(geometry.affine)[:3, :3]
    return (
        geometry.stored_shape,
        _rounded(geometry.zooms),
        _rounded(orientation),
        geometry.spatial_unit,
        geometry.sform_code,
        geometry.qform_code,
    )


def data_reference(slices: SliceSet) -> DataReference | None:
    """The reference of a training split; None for a split without header geometries (one
    built in memory, not read from files)."""
    if not slices.geometries or len(slices.geometries) != len(slices):
        return None
    frames = Counter(_frame(g) for g in slices.geometries)
    frame, geometry_count = frames.most_common(1)[0]
    sharing = [g for g in slices.geometries if _frame(g) == frame]
    affines = Counter(_rounded(g.affine) for g in sharing)
    affine, affine_count = affines.most_common(1)[0]
    geometry = next(g for g in sharing if _rounded(g.affine) == affine)
    # The median, not the mean or the extremes: a few slices with a hot pixel or a dark
    # background do not move it, so samples land on the scale most training slices have.
    ranges = slices.intensity_ranges.double().numpy()
    low, high = float(np.median(ranges[:, 0])), float(np.median(ranges[:, 1]))
    return DataReference(geometry, (low, high), len(slices), geometry_count, affine_count)
