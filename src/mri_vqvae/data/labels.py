"""Categorical labels of slices from a CSV beside the data, for a conditioned prior.

The table is ``conditions.csv`` in a split's folder or in the folder above it (the data root):
a ``file`` column with each slice's file name, then one column per label, e.g.::

    file,orientation,case_group
    case_004_week_0_slice_12.nii.gz,axial,control

The values of each label are counted from 1 in sorted order over the training split; 0 means
unknown (an empty cell, or a value the training split never had).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from mri_vqvae.data.nifti import DataError
from mri_vqvae.errors import shown

logger = logging.getLogger(__name__)

LABEL_TABLE = "conditions.csv"
FILE_COLUMN = "file"

# Each label's name and its known values, in the order their indices count them (from 1).
LabelVocabulary = tuple[tuple[str, tuple[str, ...]], ...]


def find_label_table(split_folder: Path) -> Path | None:
    """The ``conditions.csv`` of a split: in its folder, else in the folder above."""
    for folder in (split_folder, split_folder.parent):
        if (folder / LABEL_TABLE).is_file():
            return folder / LABEL_TABLE
    return None


def read_label_table(path: Path, columns: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each file name's values of ``columns``, from the CSV at ``path``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [name for name in (FILE_COLUMN, *columns) if name not in header]
            if missing:
                raise DataError(
                    path,
                    f"has no column {', '.join(repr(m) for m in missing)} (its columns: "
                    f"{', '.join(header) or 'none'})",
                )
            table: dict[str, tuple[str, ...]] = {}
            for line, row in enumerate(reader, start=2):
                name = (row[FILE_COLUMN] or "").strip()
                if name in table:
                    raise DataError(path, f"line {line} names {shown(name)} a second time")
                table[name] = tuple((row[column] or "").strip() for column in columns)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot be read as a CSV table ({err})") from err
    return table


def split_label_values(
    files: list[Path], names: list[str], columns: tuple[str, ...]
) -> list[tuple[str, ...]]:
    """The label values of each slice ``names`` (decoded from ``files``, in that folder)."""
    folder = files[0].parent
    path = find_label_table(folder)
    if path is None:
        raise DataError(
            folder,
            f"prior.condition_labels asks for {', '.join(columns)}, but neither this folder "
            f"nor the one above holds a {LABEL_TABLE}",
        )
    table = read_label_table(path, columns)
    absent = [name for name in names if name not in table]
    if absent:
        shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
        raise DataError(path, f"has no row for {len(absent)} slice(s) of {folder}: {shown}")
    return [table[name] for name in names]


def build_vocabulary(columns: tuple[str, ...], values: list[tuple[str, ...]]) -> LabelVocabulary:
    """Each label's distinct non-empty values (sorted) over a split, the training split's."""
    return tuple(
        (column, tuple(sorted({row[i] for row in values} - {""})))
        for i, column in enumerate(columns)
    )


def encode_labels(values: list[tuple[str, ...]], vocabulary: LabelVocabulary) -> torch.Tensor:
    """``(N, L)`` label indices counted from 1; 0 for an empty or unknown value."""
    lookups = [{value: i + 1 for i, value in enumerate(known)} for _, known in vocabulary]
    unknown: dict[str, set[str]] = {}
    encoded = torch.zeros(len(values), len(vocabulary), dtype=torch.long)
    for row, row_values in enumerate(values):
        for column, value in enumerate(row_values):
            index = lookups[column].get(value, 0)
            if value and not index:
                unknown.setdefault(vocabulary[column][0], set()).add(value)
            encoded[row, column] = index
    for name, seen in unknown.items():
        logger.warning(
            "label %s: value(s) %s never occur in the training split; treated as unknown",
            name,
            ", ".join(sorted(seen)[:5]),
        )
    return encoded
