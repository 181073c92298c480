"""Every file a command writes is written whole or not at all: opened for writing only under
a temporary name beside its place and then renamed over it (files.replaced_atomically), so a
crash leaves no half-written output and a link named like an output is replaced, never
written through. Checked by watching every open() of the whole chain of commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mri_vqvae.cli.main import main
from mri_vqvae.files import LOCK_FILE
from tests.helpers import TINY_PRIOR, train_args

# Written in place by design: the lock is created with O_EXCL (that is the point of it), and
# the run folder's write probe is a throw-away file that never holds an output.
IN_PLACE = (LOCK_FILE, ".write-test-")

_opened: list[tuple[str, str]] | None = None  # (path, how) while a test records


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(letter in mode for letter in "wax+")
    if isinstance(flags, int):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
    return False


def _watch(event: str, args: tuple) -> None:
    if _opened is None:
        return
    if event == "open" and len(args) >= 3 and _writes(args[1], args[2]):
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _opened.append((os.fsdecode(path), "open"))
    elif event == "os.rename" and len(args) >= 2:  # os.replace raises this event too
        _opened.append((os.fsdecode(args[1]), "rename"))


sys.addaudithook(_watch)  # an audit hook cannot be removed; it records only inside a test


def written_in_place(records: list[tuple[str, str]], root: Path) -> list[str]:
    """Paths under ``root`` opened for writing under their own name (not a temporary one
    renamed into place afterwards)."""
    root_text = str(root.resolve())
    bad = []
    for path, how in records:
        full = os.path.realpath(path)
        if how != "open" or not full.startswith(root_text):
            continue
        name = os.path.basename(full)
        temporary = name.startswith(".") and ".tmp" in name
        if not temporary and not name.startswith(IN_PLACE):
            bad.append(os.path.relpath(full, root_text))
    return sorted(set(bad))


def run_every_command(data: Path, out: Path) -> None:
    """The tiny chain of every command that writes files, into ``out``."""
    run = out / "run"
    vqvae = str(run / "best.pt")
    common = ["--data", str(data), "--device", "cpu"]
    phantom = ["--train-cases", "2", "--val-cases", "1", "--test-cases", "1", "--weeks", "1"]
    scan = ["--size", "64x32", "--slices", "8"]
    commands = [
        ["demo-data", str(data), *phantom, *scan],
        train_args(data, run, report=True)[1:],
        ["evaluate", "--checkpoint", vqvae, *common, "--out", str(run / "evaluation")],
        [
            "train-prior",
            "--vqvae",
            vqvae,
            *common,
            "--out",
            str(run / "prior"),
            "--epochs",
            "1",
            *TINY_PRIOR,
        ],
        [
            "sample",
            "--vqvae",
            vqvae,
            "--prior",
            str(run / "prior" / "best.pt"),
            "--n",
            "8",
            "--out",
            str(run / "samples"),
            "--device",
            "cpu",
        ],
        [
            "evaluate-samples",
            "--samples",
            str(run / "samples"),
            *common,
            "--reference-slices",
            "16",
        ],
        ["report", str(run), "--out", str(out / "page.html")],
    ]
    for command in commands:
        assert main(["-q", *command]) == 0, command
    test_scan = str(sorted((data / "keras_slices_test").iterdir())[0])
    reconstruct = ["reconstruct", test_scan, "--checkpoint", vqvae, "--device", "cpu"]
    assert main(["-q", *reconstruct, "--out", str(out / "scan.nii.gz")]) == 0


@pytest.mark.slow
def test_every_output_of_every_command_is_written_atomically(tmp_path: Path, monkeypatch):
    global _opened
    monkeypatch.setenv("MRI_VQVAE_CACHE", str(tmp_path / "cache"))
    _opened = []
    try:
        run_every_command(tmp_path / "data", tmp_path / "out")
        records = list(_opened)
    finally:
        _opened = None
    # The watch saw the outputs being written, under temporary names, then renamed.
    renamed = {os.path.basename(path) for path, how in records if how == "rename"}
    for name in ("best.pt", "metrics.csv", "report.html", "samples.json", "codes.pt",
                 "sample_0007.nii.gz", "per_image_metrics.csv", "memorisation.csv",
                 "samples.png", "power_spectrum.png", "examples.npz", "page.html",
                 "scan.nii.gz", "prior_summary.json", "config.yaml", "train.pt"):  # fmt: skip
        assert name in renamed, name
    assert len(records) > 100
    assert written_in_place(records, tmp_path) == []


def test_the_watch_tells_a_write_in_place_from_an_atomic_one(tmp_path: Path):
    """A check that saw nothing would pass the test above."""
    global _opened
    _opened = []
    try:
        (tmp_path / "direct.csv").write_text("a,b\n")
        from mri_vqvae.files import write_text_atomic

        write_text_atomic(tmp_path / "atomic.json", "{}")
        records = list(_opened)
    finally:
        _opened = None
    assert written_in_place(records, tmp_path) == ["direct.csv"]
    assert (str(tmp_path / "atomic.json"), "rename") in records
