"""Split discovery, preprocessing, and the in-memory split tensor with its disk cache.

Every NIfTI file is decoded once: a split lives in memory as one ``(N, 1, H, W)`` tensor of
images in [-1, 1], and is cached on disk keyed by the files' contents (a hash of their bytes,
so a changed slice is never served stale) and the preprocessing settings, so a second run
starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mri_vqvae.config import DataConfig
from mri_vqvae.data.fingerprint import SplitFingerprint
from mri_vqvae.data.nifti import (
    DataError,
    SliceGeometry,
    is_nifti,
    read_slice,
    read_slice_shape,
    slice_geometry,
    usable_geometry,
)
from mri_vqvae.errors import ConfigError
from mri_vqvae.files import read_stamped, write_stamped

logger = logging.getLogger(__name__)

# The HipMRI release's folder for each split; the keras_slices_seg_* mask folders are ignored.
HIPMRI_SPLIT_FOLDERS = {
    "train": "keras_slices_train",
    "val": "keras_slices_validate",
    "test": "keras_slices_test",
}
SPLITS = tuple(HIPMRI_SPLIT_FOLDERS)
# Bump when the cached tensors' meaning changes, so stale caches are never read.
# 2: written through files.write_stamped; 3: each slice's geometry kept; 4: geometries whose
# voxel sizes or affine could not be used are kept repaired (usable_geometry), never NaN.
CACHE_FORMAT = 4


def hipmri_split_dirs(root: str | Path) -> dict[str, Path]:
    """The three split folders of a HipMRI-layout root; a missing one is an error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root is not a folder")
    dirs = {}
    for split, name in HIPMRI_SPLIT_FOLDERS.items():
        folder = root / name
        if not folder.is_dir():
            raise DataError(
                folder,
                f"missing {split} split folder; a HipMRI root holds "
                f"{', '.join(HIPMRI_SPLIT_FOLDERS.values())} (or pass --train/--val/--test)",
            )
        dirs[split] = folder
    return dirs


def list_slices(folder: str | Path) -> list[Path]:
    """The ``.nii``/``.nii.gz`` files of a folder, sorted by name; none is an error."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "no such folder")
    if not folder.is_dir():
        raise DataError(folder, "is not a folder")
    if folder.name.startswith("keras_slices_seg"):
        raise DataError(folder, "is a segmentation mask folder, not an image folder")
    try:
        files = sorted(p for p in folder.iterdir() if is_nifti(p))
    except OSError as err:
        raise DataError(folder, f"cannot be listed ({err.strerror or err})") from err
    if not files:
        raise DataError(folder, "holds no .nii or .nii.gz files")
    return files


def normalise(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max scale a slice to [0, 1]; returns the scaled slice and the (min, max) it used."""
    low, high = float(pixels.min()), float(pixels.max())
    # In float64: for values near float32's limits, high - low overflows in float32.
    unit = (pixels.astype(np.float64) - low) / (high - low)
    return unit.astype(np.float32), low, high


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(B, C, H, W)`` images (as torchvision's ``Resize``)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def to_model_range(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] to the model's [-1, 1], as the seed's ``Normalize((0.5,), (0.5,))``."""
    return unit.clamp(0, 1) * 2 - 1


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """The model's [-1, 1] back to [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def preprocess(pixels: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """One decoded slice to a ``(1, H, W)`` float32 image in [-1, 1] at ``size``."""
    unit, _, _ = normalise(pixels)
    image = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None]
    if size is not None:
        image = resize(image, size)
    return to_model_range(image[0])


def postprocess(image: torch.Tensor, shape: tuple[int, int], low: float, high: float) -> np.ndarray:
    """A ``(1, H, W)`` model image back to a slice of ``shape`` in the input's intensity range."""
    unit = resize(to_unit_range(image.float())[None], shape)[0, 0]
    # In float64, as normalise: the range of values near float32's limits overflows it.
    return (unit.cpu().numpy().astype(np.float64) * (high - low) + low).astype(np.float32)


@dataclass
class SliceSet:
    """A decoded split: images ``(N, 1, H, W)`` in [-1, 1] and what is needed to map them back.

    Images are held as float16 (half the memory of float32; its 3 significant digits are well
    inside MRI noise) and served as float32 batches.
    """

    images: torch.Tensor
    names: list[str]
    original_shapes: list[tuple[int, int]]
    intensity_ranges: torch.Tensor  # (N, 2): the (min, max) each slice was scaled from
    skipped: list[str] = field(default_factory=list)
    # Each slice's header geometry, so what is written later can sit where the slices sat;
    # empty for a set built in memory without files.
    geometries: list[SliceGeometry] = field(default_factory=list)
    # The split's files by content, so a resumed run can tell it is given the data it began
    # with; None for a set built in memory without files.
    fingerprint: SplitFingerprint | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[-2], self.images.shape[-1])

    def batch(self, indices: torch.Tensor | slice | list[int]) -> torch.Tensor:
        """The images at ``indices`` as a float32 ``(B, 1, H, W)`` tensor."""
        return self.images[indices].float()


def default_cache_dir() -> Path:
    """``$MRI_VQVAE_CACHE``, else ``$XDG_CACHE_HOME/mri-vqvae``, else ``~/.cache/mri-vqvae``."""
    if os.environ.get("MRI_VQVAE_CACHE"):
        return Path(os.environ["MRI_VQVAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mri-vqvae"


def _content_digest(path: Path) -> str:
    """A fast hash of a file's bytes: a slice rewritten with the same size and modification
    time (a copy that keeps times, an edit that restores them) still gets a new cache key."""
    digest = hashlib.blake2b(digest_size=16)
    if not path.is_file():  # a FIFO would block; decoding it names the problem
        return "not-a-file"
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:  # missing or unreadable: decoding it names the problem
        return "unreadable"
    return digest.hexdigest()


def _cache_key(files: list[Path], digests: list[str], config: DataConfig) -> str:
    settings = {
        "format": CACHE_FORMAT,
        "image_size": config.image_size,
        "skip_bad_files": config.skip_bad_files,
        "files": [
            [os.path.realpath(path), digest] for path, digest in zip(files, digests, strict=True)
        ],
    }
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]


def _decode(files: list[Path], config: DataConfig, label: str) -> SliceSet:
    images, names, shapes, ranges, skipped, geometries = [], [], [], [], [], []
    repaired: list[str] = []  # what was wrong with each slice whose geometry was repaired
    for path in tqdm(files, desc=f"decoding {label}", unit="slice", leave=False, disable=None):
        try:
            source = read_slice(path)
            pixels = source.pixels
            if config.image_size is None and images and pixels.shape != shapes[0]:
                raise DataError(
                    path,
                    f"has shape {pixels.shape} but {names[0]} has {shapes[0]}; set "
                    "data.image_size to resize slices of mixed sizes",
                )
        except DataError as err:
            if not config.skip_bad_files:
                raise
            logger.warning("skipping %s", err)
            skipped.append(f"{err.path}: {err.problem}")
            continue
        low, high = float(pixels.min()), float(pixels.max())
        images.append(preprocess(pixels, config.image_size).half())
        names.append(path.name)
        shapes.append(tuple(pixels.shape))
        ranges.append((low, high))
        geometry, problem = usable_geometry(slice_geometry(source.affine, source.header))
        geometries.append(geometry)
        if problem is not None:
            repaired.append(f"{path}: {problem}")
    if not images:
        folder = files[0].parent if files else Path(label)
        raise DataError(folder, f"no usable slices: all {len(files)} files were bad")
    if skipped:
        logger.warning("%s: skipped %d of %d files as bad", label, len(skipped), len(files))
    if repaired:
        # One line for the split: the geometry only places slices written later (samples,
        # reconstructions); training reads the voxels alone, so these slices are kept.
        logger.warning(
            "%s: %d of %d slices have header voxel sizes or an affine that cannot be used "
            "(first: %s); they are kept, as training reads only their voxels: the geometry "
            "only places slices written later",
            label,
            len(repaired),
            len(images),
            repaired[0],
        )
    return SliceSet(
        images=torch.stack(images),
        names=names,
        original_shapes=shapes,
        intensity_ranges=torch.tensor(ranges, dtype=torch.float64),
        skipped=skipped,
        geometries=geometries,
    )


def load_split(files: list[Path], config: DataConfig, label: str = "split") -> SliceSet:
    """Decode ``files`` into a :class:`SliceSet`, reading and writing the disk cache."""
    if not files:
        raise DataError(Path(label), "no files given")
    # Each file's bytes are hashed once: for the cache key and for the split's fingerprint.
    digests = [_content_digest(path) for path in files]
    fingerprint = SplitFingerprint.of_files(os.path.abspath(files[0].parent), digests)
    if not config.use_cache:
        return replace(_decode(files, config, label), fingerprint=fingerprint)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    key = _cache_key(files, digests, config)
    cache_file = cache_dir / f"{label}-{key}.pt"
    stamp = {"format": CACHE_FORMAT, "key": key}
    stored = _cached_split(read_stamped(cache_file, stamp), cache_file)
    if stored is not None:
        return replace(stored, fingerprint=fingerprint)
    slices = replace(_decode(files, config, label), fingerprint=fingerprint)
    payload = {
        "images": slices.images,
        "names": slices.names,
        "original_shapes": [list(s) for s in slices.original_shapes],
        "intensity_ranges": slices.intensity_ranges,
        "skipped": slices.skipped,
        "geometries": [geometry.to_plain() for geometry in slices.geometries],
    }
    write_stamped(cache_file, stamp, payload)
    return slices


def _cached_split(stored: dict | None, cache_file: Path) -> SliceSet | None:
    """The split a cache payload holds; None (decode again) for none, or for one that is not
    what this version writes (a foreign or edited file, geometries that are not usable)."""
    if stored is None:
        return None
    try:
        return SliceSet(
            images=stored["images"],
            names=list(stored["names"]),
            original_shapes=[tuple(s) for s in stored["original_shapes"]],
            intensity_ranges=stored["intensity_ranges"],
            skipped=list(stored["skipped"]),
            geometries=[SliceGeometry.from_plain(g) for g in stored["geometries"]],
        )
    except (KeyError, TypeError, ValueError) as err:
        logger.warning("ignoring cache %s: not what this version writes (%s)", cache_file, err)
        return None


def resolve_split_files(
    root: str | Path | None = None,
    train: str | Path | None = None,
    val: str | Path | None = None,
    test: str | Path | None = None,
) -> dict[str, list[Path]]:
    """File lists per split from a HipMRI root and/or explicit split folders (which win)."""
    explicit = {"train": train, "val": val, "test": test}
    dirs: dict[str, Path] = {}
    if root is not None:
        dirs = hipmri_split_dirs(root)
    for split, folder in explicit.items():
        if folder is not None:
            dirs[split] = Path(folder)
    missing = [s for s in SPLITS if s not in dirs]
    if missing:
        raise ConfigError(
            f"no folder for split(s) {', '.join(missing)}: give --data ROOT in the HipMRI "
            "layout, or --train, --val and --test folders"
        )
    return {split: list_slices(dirs[split]) for split in SPLITS}


def load_splits(
    files: dict[str, list[Path]], config: DataConfig, splits=SPLITS
) -> dict[str, SliceSet]:
    """Decode (or load from cache) each requested split. At native size (``data.image_size``
    None) every split of ``files``, decoded or not, must be the training split's size."""
    if config.image_size is None:
        # The first slice of each split, from its header: a size that differs is refused
        # before any split is decoded, the test split's too when only train and val are.
        firsts = {split: paths[0] for split, paths in files.items() if paths}
        shapes = {}
        for split, path in firsts.items():
            try:
                shapes[split] = (path, read_slice_shape(path))
            except DataError:  # decoding the split names (or skips) a bad file
                continue
        check_native_sizes(shapes)
    loaded = {split: load_split(files[split], config, label=split) for split in splits}
    if config.image_size is None:  # a split whose first file was skipped as bad
        check_native_sizes(
            {
                split: (files[split][0].parent / slices.names[0], slices.image_size)
                for split, slices in loaded.items()
            }
        )
    return loaded


def check_native_sizes(shapes: dict[str, tuple[Path, tuple[int, int]]]) -> None:
    """Refuse splits of different native sizes. ``shapes`` maps a split to one of its slices
    and that slice's shape (a split's slices are one size, or decoding refuses them)."""
    if "train" not in shapes:
        return
    train_path, train_shape = shapes["train"]
    for split, (path, shape) in shapes.items():
        if shape != train_shape:
            size, wanted = "x".join(map(str, shape)), "x".join(map(str, train_shape))
            raise DataError(
                path,
                f"the {split} split's slices are {size} but the training split's are {wanted} "
                f"({train_path}); with data.image_size native every split must be one size, "
                "as the model is trained, validated and tested at its training size and a prior "
                f"models one grid of codes: set data.image_size (e.g. --size {wanted}) to "
                "resize every split to it",
            )


@dataclass(frozen=True)
class DataSources:
    """Where the slices are: a HipMRI-layout root, and/or a folder per split (which wins)."""

    root: Path | None = None
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None

    def files(self) -> dict[str, list[Path]]:
        """Every split's slice files."""
        return resolve_split_files(self.root, self.train, self.val, self.test)

    def test_files(self) -> list[Path]:
        """The test split's files (``test`` alone is enough)."""
        return list_slices(self.test) if self.test is not None else self.files()["test"]

    def load(self, config: DataConfig, splits: tuple[str, ...] = SPLITS) -> dict[str, SliceSet]:
        """Decode (or load from cache) each of ``splits``."""
        return load_splits(self.files(), config, splits)

    def load_test(self, config: DataConfig) -> SliceSet:
        """Decode (or load from cache) the test split alone."""
        return load_split(self.test_files(), config, label="test")


_SLICE_NUMBER = re.compile(r"^(?P<volume>.*)_slice_(?P<number>\d+)(?:\.nii(?:\.gz)?)?$")


def slice_positions(names: list[str]) -> np.ndarray:
    """Each slice's position within its volume in [0, 1], from HipMRI names ``..._slice_<S>``.

    A volume is the name with ``_slice_<S>`` removed; positions are ``S`` scaled from the
    volume's lowest to highest slice number among ``names`` (0.5 for a volume of one slice).
    Names without a slice number get NaN.
    """
    parsed = [_SLICE_NUMBER.match(name) for name in names]
    numbers: dict[str, list[int]] = {}
    for match in parsed:
        if match:
            numbers.setdefault(match["volume"], []).append(int(match["number"]))
    positions = np.full(len(names), np.nan, dtype=np.float32)
    for i, match in enumerate(parsed):
        if not match:
            continue
        low, high = min(numbers[match["volume"]]), max(numbers[match["volume"]])
        number = int(match["number"])
        positions[i] = 0.5 if high == low else (number - low) / (high - low)
    return positions


def concat_slice_sets(sets: list[SliceSet]) -> SliceSet:
    """One :class:`SliceSet` holding the slices of ``sets`` in order (sizes must agree)."""
    sizes = {s.image_size for s in sets}
    if len(sizes) != 1:
        raise ValueError(f"cannot join slices of different sizes {sorted(sizes)}")
    return SliceSet(
        images=torch.cat([s.images for s in sets]),
        names=[name for s in sets for name in s.names],
        original_shapes=[shape for s in sets for shape in s.original_shapes],
        intensity_ranges=torch.cat([s.intensity_ranges for s in sets]),
        skipped=[bad for s in sets for bad in s.skipped],
        # Geometries only when every set has them, so they stay one per slice.
        geometries=[g for s in sets for g in s.geometries]
        if all(len(s.geometries) == len(s) for s in sets)
        else [],
    )
