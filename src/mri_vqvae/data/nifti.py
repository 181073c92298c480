"""Read and write 2D NIfTI slices with nibabel, and the project's data errors.

Every failure to read a slice becomes a :class:`DataError` that names the file and the problem,
so a user never sees a traceback from deep inside nibabel or gzip.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np

from mri_vqvae.errors import UserError, shown
from mri_vqvae.files import make_output_folder, replaced_atomically

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A 2D slice this large (64 Mi voxels, 256 MiB as float32) is certainly a corrupt header.
MAX_VOXELS = 2**26
MIN_SIDE = 8


class DataError(UserError):
    """A data file or folder cannot be used; ``path`` and ``problem`` say which and why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Slice(NamedTuple):
    """One decoded slice: ``pixels`` (H, W) float32, with the file's affine and header."""

    pixels: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header


class SliceGeometry(NamedTuple):
    """Where a slice's voxels lie in space, as its NIfTI header says: what a written slice
    needs to sit where a training slice sat. Plain values only, so it can live in a
    checkpoint (read with ``weights_only``) and in the dataset cache."""

    stored_shape: tuple[int, ...]  # the header's shape, singleton axes kept
    affine: tuple[tuple[float, ...], ...]  # the 4x4 voxel-to-world matrix nibabel gives
    zooms: tuple[float, ...]  # the header's voxel sizes (pixdim), one per stored axis
    spatial_unit: str  # nibabel's name for the unit of space: "mm", "unknown", ...
    sform_code: int
    qform_code: int

    @property
    def shape(self) -> tuple[int, int]:
        """The in-plane shape: the stored shape without its singleton axes."""
        height, width = (side for side in self.stored_shape if side != 1)
        return (height, width)

    def to_plain(self) -> dict[str, Any]:
        """Lists, numbers and text, as JSON and ``torch.load(weights_only=True)`` take them."""
        return {
            "stored_shape": list(self.stored_shape),
            "affine": [list(row) for row in self.affine],
            "zooms": list(self.zooms),
            "spatial_unit": self.spatial_unit,
            "sform_code": self.sform_code,
            "qform_code": self.qform_code,
        }

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> SliceGeometry:
        """Undo :meth:`to_plain`; ``ValueError`` (or ``KeyError``/``TypeError``) for anything
        that is not what it wrote."""
        affine = np.asarray(value["affine"], dtype=np.float64)
        stored_shape = tuple(int(side) for side in value["stored_shape"])
        zooms = tuple(float(zoom) for zoom in value["zooms"])
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise ValueError(f"the affine is not a finite 4x4 matrix: {shown(value['affine'])}")
        if sum(side > 1 for side in stored_shape) != 2 or min(stored_shape) < 1:
            raise ValueError(f"shape {stored_shape} is not a 2D slice's")
        if len(zooms) != len(stored_shape) or not all(np.isfinite(zooms)):
            raise ValueError(f"voxel sizes {zooms} do not fit shape {stored_shape}")
        return cls(
            stored_shape=stored_shape,
            affine=tuple(tuple(float(x) for x in row) for row in affine),
            zooms=zooms,
            spatial_unit=str(value["spatial_unit"]),
            sform_code=int(value["sform_code"]),
            qform_code=int(value["qform_code"]),
        )


def slice_geometry(affine: np.ndarray, header: nib.Nifti1Header) -> SliceGeometry:
    """The geometry a slice's affine and header describe (as :func:`read_slice` returns them)."""
    return SliceGeometry(
        stored_shape=tuple(int(side) for side in header.get_data_shape()),
        affine=tuple(tuple(float(x) for x in row) for row in np.asarray(affine)),
        zooms=tuple(float(zoom) for zoom in header.get_zooms()),
        spatial_unit=str(header.get_xyzt_units()[0]),
        sform_code=int(header["sform_code"]),
        qform_code=int(header["qform_code"]),
    )


def usable_geometry(geometry: SliceGeometry) -> tuple[SliceGeometry, str | None]:
    """``geometry`` with what cannot place a slice in space replaced, and what was wrong
    (None: nothing was).

    A voxel size (pixdim) that is not a positive finite number is taken from the affine (the
    length of its axis). An affine that is not finite, or is singular (an axis of no length),
    is replaced by the voxel sizes alone with no orientation (form codes 0, NIfTI's "method 1"
    for a header that gives none); where neither says, a voxel is 1 unit of unknown size.
    Only files written in the slice's geometry use it: nibabel cannot write a NaN or singular
    affine, and a viewer cannot place such a slice."""
    zooms = np.asarray(geometry.zooms, dtype=np.float64)
    affine = np.asarray(geometry.affine, dtype=np.float64)
    bad_zooms = ~(np.isfinite(zooms) & (zooms > 0))
    finite = bool(np.isfinite(affine).all())
    singular = finite and np.linalg.matrix_rank(affine[:3, :3]) < 3
    if not bad_zooms.any() and finite and not singular:
        return geometry, None
    problems = []
    if bad_zooms.any():
        axis = int(np.argmax(bad_zooms))
        problems.append(f"pixdim[{axis + 1}] (a voxel size) is {zooms[axis]:g}")
    if not finite or singular:
        what = "singular (an axis of length 0)" if singular else "not finite"
        problems.append(f"the affine from its {_affine_source(geometry)} is {what}")
    if finite and not singular:
        lengths = np.linalg.norm(affine[:3, :3], axis=0)
        implied = np.array([lengths[i] if i < 3 else 1.0 for i in range(len(zooms))])
        repaired = geometry._replace(zooms=tuple(np.where(bad_zooms, implied, zooms).tolist()))
        return repaired, " and ".join(problems) + "; voxel sizes taken from the affine"
    zooms = np.where(bad_zooms, 1.0, zooms)
    spacing = [*zooms[:3].tolist(), 1.0, 1.0][:3]
    repaired = geometry._replace(
        affine=tuple(tuple(float(x) for x in row) for row in np.diag([*spacing, 1.0])),
        zooms=tuple(zooms.tolist()),
        spatial_unit="unknown" if bad_zooms.any() else geometry.spatial_unit,
        sform_code=0,
        qform_code=0,
    )
    return repaired, " and ".join(problems) + "; placed by its voxel sizes, unoriented"


def _affine_source(geometry: SliceGeometry) -> str:
    """Which header fields nibabel took the affine from: the sform, else the qform, else
    the voxel sizes."""
    if geometry.sform_code > 0:
        return "sform (srow_x, srow_y, srow_z)"
    if geometry.qform_code > 0:
        return "qform (quatern_b/c/d, qoffset_x/y/z, pixdim)"
    return "voxel sizes (pixdim; no sform or qform code set)"


def is_nifti(path: Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _to_grayscale(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype.names is not None:
        names = set(data.dtype.names)
        if {"R", "G", "B"} <= names:
            # ITU-R BT.601 luma, the usual RGB-to-grey conversion (as PIL's "L" mode).
            return (
                0.299 * data["R"].astype(np.float32)
                + 0.587 * data["G"].astype(np.float32)
                + 0.114 * data["B"].astype(np.float32)
            )
        raise DataError(path, f"has a structured voxel type {data.dtype} that is not RGB")
    if np.iscomplexobj(data):
        raise DataError(path, "holds complex-valued voxels; expected a real magnitude image")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise DataError(path, f"has a non-numeric voxel type {data.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        pixels = data.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all() and np.isfinite(data).all():
        largest = float(np.abs(data.astype(np.float64)).max())
        raise DataError(
            path, f"holds values up to {largest:.3g}, beyond the range of 32-bit floats"
        )
    return pixels


def read_slice(path: str | Path) -> Slice:
    """Read one 2D slice; singleton axes are dropped, anything else not 2D is an error.

    Raises:
        DataError: the file is missing, unreadable, not NIfTI, truncated, not 2D, too large,
            or holds NaN/Inf voxels or a constant image.
    """
    path = Path(path)
    image = _open_image(path)
    kept = _in_plane_shape(image, path)
    if path.name.lower().endswith(".gz"):
        _check_gzip(path, _expected_bytes(image))
    try:
        raw = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(
            path, f"voxel data cannot be read, the file may be truncated ({err})"
        ) from err
    except MemoryError as err:
        raise DataError(path, f"voxel data of shape {image.shape} does not fit in memory") from err
    except Exception as err:  # e.g. a voxel type or scaling the header gets wrong
        raise DataError(
            path, f"voxel data cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    pixels = _to_grayscale(np.asarray(raw), path).reshape(kept)
    if min(kept) < MIN_SIDE:
        raise DataError(path, f"slice of shape {kept} is too small (sides under {MIN_SIDE})")
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = int((~finite).sum())
        raise DataError(path, f"holds {bad} NaN or infinite voxels")
    if pixels.max() == pixels.min():
        raise DataError(path, f"is a constant image (every voxel is {pixels.flat[0]:g})")
    return Slice(np.ascontiguousarray(pixels), image.affine, image.header)


def read_slice_shape(path: str | Path) -> tuple[int, int]:
    """The in-plane shape a slice's header gives, without reading its voxels."""
    path = Path(path)
    return _in_plane_shape(_open_image(path), path)


def _open_image(path: Path) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (its header; voxels are read later), or a DataError
    naming why it cannot be one."""
    if not path.exists():
        if path.is_symlink():
            raise DataError(path, "is a symbolic link to nothing (broken, or a loop)")
        raise DataError(path, "no such file")
    if path.is_dir():
        raise DataError(path, "is a folder, expected a NIfTI file")
    if not path.is_file():  # reading a FIFO would wait for a writer forever
        raise DataError(path, "is not a regular file (a pipe, socket or device)")
    try:
        # nibabel builds the affine here; a NaN or infinite voxel size or form in the header
        # warns from inside NumPy, and usable_geometry repairs (and names) it afterwards.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            image = nib.load(str(path))
    except PermissionError as err:
        raise DataError(path, "permission denied") from err
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(path, f"is not a readable NIfTI file ({err})") from err
    except (EOFError, OSError, ValueError) as err:
        problem = f"cannot be read as NIfTI, it may be truncated or corrupt ({err})"
        if "w2 should be positive" in str(err):  # nibabel's words for a non-finite quaternion
            problem = f"its qform quaternion (quatern_b/c/d) is not a rotation ({err})"
        raise DataError(path, problem) from err
    except Exception as err:  # a hostile header fails in many ways deep inside nibabel
        raise DataError(
            path, f"has a NIfTI header nibabel cannot use ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"is a {type(image).__name__}, not a NIfTI image")
    return image


def _in_plane_shape(image: nib.Nifti1Image, path: Path) -> tuple[int, int]:
    """The header's shape without its singleton axes, refusing what is not a 2D slice."""
    shape = tuple(int(s) for s in image.shape)
    if any(s < 0 for s in shape):
        raise DataError(path, f"header gives a negative dimension {shape}")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise DataError(path, f"header gives shape {shape}, too large for a 2D slice")
    kept = tuple(s for s in shape if s != 1)
    if len(kept) != 2:
        if len(kept) < 2:
            what = {0: "a single voxel", 1: "a 1D line"}[len(kept)]
        else:
            what = f"a {len(shape)}D image" + (
                f" with {len(kept)} axes longer than 1" if len(kept) != len(shape) else ""
            )
        raise DataError(path, f"has shape {shape}, {what}; expected a 2D slice")
    return kept


def _expected_bytes(image: nib.Nifti1Image) -> int:
    """The bytes a NIfTI file of this header holds: the header, extensions and voxels."""
    try:
        itemsize = image.header.get_data_dtype().itemsize
        offset = int(image.header.get_data_offset())
    except Exception:  # a hostile header: its voxel read names the problem later
        itemsize, offset = 16, 0
    return offset + int(np.prod(image.shape, dtype=np.int64)) * itemsize


def _check_gzip(path: Path, expected_bytes: int) -> None:
    """Decompress every gzip member to its end, so its CRC-32 and length are checked.

    nibabel stops reading once it has the voxels it needs, before the gzip trailer, so damaged
    compressed data would otherwise be decoded into wrong voxels without a word. Reading stops
    early for a file that inflates far past what its header describes (a decompression bomb).
    """
    limit = max(2 * expected_bytes, expected_bytes + (16 << 20))
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 20):
                total += len(block)
                if total > limit:
                    raise DataError(
                        path,
                        f"decompresses to more than {limit} bytes, but its header describes "
                        f"{expected_bytes}; it is corrupt",
                    )
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(path, f"compressed data is damaged ({err})") from err
    except EOFError as err:
        raise DataError(path, f"compressed data is truncated ({err})") from err
    except OSError as err:
        raise DataError(path, f"cannot be read ({err.strerror or err})") from err


def write_slice(
    pixels: np.ndarray,
    path: str | Path,
    affine: np.ndarray | None = None,
    header: nib.Nifti1Header | None = None,
) -> None:
    """Write a 2D float32 slice; ``affine`` and ``header`` are copied from an input when given."""
    path = Path(path)
    if not is_nifti(path):
        raise DataError(path, "output name must end in .nii or .nii.gz")
    pixels = np.asarray(pixels, dtype=np.float32)
    if header is not None:
        header = header.copy()
        # Keep the input's geometry and metadata, but not an integer type that would round
        # the reconstruction, nor a scaling meant for the input's stored values.
        header.set_data_dtype(np.float32)
        header.set_slope_inter(1.0, 0.0)
        header.set_data_shape(pixels.shape)
    image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_type(pixels, affine if affine is not None else np.eye(4), header)
    _save(image, path)


def write_slice_in_geometry(pixels: np.ndarray, path: str | Path, geometry: SliceGeometry) -> None:
    """Write a 2D float32 slice of ``geometry.shape`` with ``geometry``'s stored shape,
    affine, voxel sizes, unit and sform/qform codes."""
    path = Path(path)
    if not is_nifti(path):
        raise DataError(path, "output name must end in .nii or .nii.gz")
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.shape != geometry.shape:
        raise ValueError(f"pixels of shape {pixels.shape} for a geometry of {geometry.shape}")
    affine = np.asarray(geometry.affine, dtype=np.float64)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(geometry.stored_shape)
    header.set_xyzt_units(xyz=geometry.spatial_unit)
    header.set_sform(affine, code=geometry.sform_code)
    header.set_qform(affine, code=geometry.qform_code)
    image = nib.Nifti1Image(pixels.reshape(geometry.stored_shape), affine, header)
    # nibabel recomputes the voxel sizes from the affine; the header's own pixdim is what a
    # training slice said, and may differ (it is what readers use when no form code is set).
    image.header.set_zooms(geometry.zooms)
    _save(image, path)


def _save(image: nib.Nifti1Image, path: Path) -> None:
    make_output_folder(path.parent)
    # Written beside the target and renamed into place, so a crash leaves no half a file and
    # an existing file is replaced only by a whole new one. The suffix tells nibabel to gzip.
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with replaced_atomically(path, suffix) as partial:
        nib.save(image, str(partial))
