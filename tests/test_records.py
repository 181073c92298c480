"""The record base: files read back into typed records, and refused by name when they are not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mri_vqvae.records import Record, RecordError
from tests.helpers import fifo


@dataclass(frozen=True)
class _Figures(Record):
    DESCRIPTION = "a test's figures"

    name: str
    counts: tuple[int, ...]
    mean: float | None = None


def test_a_record_reads_back_what_it_wrote(tmp_path: Path):
    record = _Figures(name="run", counts=(1, 2, 3), mean=0.5)
    path = record.write(tmp_path / "figures.json")
    assert _Figures.read(path) == record
    assert '"version": 1' in path.read_text()


def test_a_wrong_field_is_named_with_its_file(tmp_path: Path):
    path = tmp_path / "figures.json"
    path.write_text('{"name": "run", "counts": [1, "two"]}')
    with pytest.raises(RecordError, match=r"figures\.json: counts\[1\]: expected a whole number"):
        _Figures.read(path)


def test_a_newer_version_is_refused(tmp_path: Path):
    path = tmp_path / "figures.json"
    path.write_text('{"version": 7, "name": "run", "counts": []}')
    with pytest.raises(RecordError, match="version 7, written by a newer mri-vqvae"):
        _Figures.read(path)


def test_json_nested_too_deeply_is_refused_not_a_crash(tmp_path: Path):
    path = tmp_path / "figures.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(RecordError, match=r"figures\.json: not a record, its JSON nests too deep"):
        _Figures.read(path)


def test_a_fifo_is_refused_rather_than_waited_on(tmp_path: Path):
    path = tmp_path / "figures.json"
    with fifo(path), pytest.raises(RecordError, match=r"figures\.json: not a regular file"):
        _Figures.read(path)


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(RecordError, match=r"absent\.json: cannot read it"):
        _Figures.read(tmp_path / "absent.json")
