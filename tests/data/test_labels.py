"""Labels from a conditions.csv beside the data: where the table is found, what it must hold,
and how values become indices (0 for unknown)."""

from pathlib import Path

import pytest
import torch

from mri_vqvae.data.labels import (
    build_vocabulary,
    encode_labels,
    find_label_table,
    read_label_table,
    split_label_values,
)
from mri_vqvae.data.nifti import DataError


def split_folder(root: Path, names: list[str]) -> list[Path]:
    folder = root / "keras_slices_train"
    folder.mkdir(parents=True)
    files = []
    for name in names:
        (folder / name).write_bytes(b"")
        files.append(folder / name)
    return files


def test_the_table_beside_the_split_wins_over_the_root(tmp_path):
    files = split_folder(tmp_path, ["a.nii.gz"])
    assert find_label_table(files[0].parent) is None
    (tmp_path / "conditions.csv").write_text("file,side\na.nii.gz,left\n")
    assert find_label_table(files[0].parent) == tmp_path / "conditions.csv"
    (files[0].parent / "conditions.csv").write_text("file,side\na.nii.gz,right\n")
    assert find_label_table(files[0].parent) == files[0].parent / "conditions.csv"
    assert split_label_values(files, ["a.nii.gz"], ("side",)) == [("right",)]


def test_values_are_counted_from_one_in_sorted_order_and_unknown_is_zero(tmp_path, caplog):
    values = [("coronal", "a"), ("axial", ""), ("coronal", "b")]
    vocabulary = build_vocabulary(("orientation", "group"), values)
    assert vocabulary == (("orientation", ("axial", "coronal")), ("group", ("a", "b")))
    encoded = encode_labels(values, vocabulary)
    assert encoded.tolist() == [[2, 1], [1, 0], [2, 2]]
    assert encoded.dtype == torch.long
    held_out = encode_labels([("sagittal", "a")], vocabulary)
    assert held_out.tolist() == [[0, 1]]
    assert "sagittal" in caplog.text and "never occur in the training split" in caplog.text


def test_a_table_without_a_column_or_a_slice_is_named(tmp_path):
    files = split_folder(tmp_path, ["a.nii.gz", "b.nii.gz"])
    table = tmp_path / "conditions.csv"
    table.write_text("file,side\na.nii.gz,left\n")
    with pytest.raises(DataError, match=r"no column 'group'.*file, side"):
        split_label_values(files, ["a.nii.gz"], ("group",))
    with pytest.raises(DataError, match=r"conditions.csv: has no row for 1 slice\(s\).*b.nii.gz"):
        split_label_values(files, ["a.nii.gz", "b.nii.gz"], ("side",))
    table.write_text("file,side\na.nii.gz,left\na.nii.gz,right\n")
    with pytest.raises(DataError, match=r"line 3 names 'a\.nii\.gz' a second time"):
        read_label_table(table, ("side",))
    table.unlink()
    with pytest.raises(DataError, match="neither this folder nor the one above"):
        split_label_values(files, ["a.nii.gz"], ("side",))
