"""Nothing a user owns is lost: ownership of outputs is per file the tool wrote (the marker's
manifest), outputs never go through links, and the folder lock trusts nothing it reads.

Built generically: every kind of output folder, every name it writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mri_vqvae import files
from mri_vqvae.files import (
    KINDS,
    LOCK_FILE,
    MARKER_FILE,
    FolderLock,
    OutputError,
    OutputFolder,
    refuse_links_into,
    write_text_atomic,
    written_outputs,
)
from tests.helpers import fifo

OVERWRITABLE = [kind for kind in KINDS.values() if kind.may_write_into_foreign]


def concrete(pattern: str) -> str:
    """A name an output pattern matches (``sample_*.nii.gz`` -> ``sample_user.nii.gz``)."""
    return pattern.replace("*", "user")


def write_output(folder: OutputFolder, name: str, text: str) -> None:
    """What a command does with an output: a file (or a file inside an output folder),
    through the tool's own writer (which checks for links, then makes the folders)."""
    path = folder.path / name
    if "." not in path.name:  # an output folder: reconstructions, tensorboard, codes ...
        path = path / "inside.txt"
    refuse_links_into(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


@pytest.mark.parametrize("kind", OVERWRITABLE, ids=lambda kind: kind.key)
def test_overwrite_twice_in_a_users_folder_deletes_only_what_the_tool_wrote(kind, tmp_path: Path):
    folder = tmp_path / "mine"
    folder.mkdir()
    names = [concrete(pattern) for pattern in kind.outputs]
    for name in names:
        (folder / name).write_text(f"the user's {name}")
    (folder / "notes.txt").write_text("kept")
    written = names[0]
    for _ in range(2):  # the second --overwrite is where ownership used to widen
        with OutputFolder(folder, kind, overwrite=True) as out:
            out.remove_previous_outputs()
            write_output(out, written, "the tool's")
    for name in names[1:]:
        assert (folder / name).read_text() == f"the user's {name}", name
    assert (folder / "notes.txt").read_text() == "kept"
    assert set(written_outputs(folder)) == {written}
    # And a third command, whose output the user then edits, leaves that edit alone.
    edited = folder / written if "." in written else folder / written / "inside.txt"
    if "." in written:
        edited.write_text("the user's edit")
        with OutputFolder(folder, kind, overwrite=True) as out:
            assert out.remove_previous_outputs() == []
        assert edited.read_text() == "the user's edit"


@pytest.mark.parametrize(
    "kind", [kind for kind in KINDS.values() if kind.may_overwrite], ids=lambda kind: kind.key
)
def test_the_tools_own_outputs_are_replaced_by_overwrite(kind, tmp_path: Path):
    folder = tmp_path / "run"
    names = [concrete(pattern) for pattern in kind.outputs]
    with OutputFolder(folder, kind) as out:
        for name in names:
            write_output(out, name, "first")
    files = {name if "." in name else f"{name}/inside.txt" for name in names}
    assert set(written_outputs(folder)) == files
    with OutputFolder(folder, kind, overwrite=True) as out:
        assert sorted(out.remove_previous_outputs()) == sorted(names)
    assert [p.name for p in folder.iterdir()] == [MARKER_FILE]


WITH_FOLDERS = [kind for kind in KINDS.values() if any("." not in p for p in kind.outputs)]


@pytest.mark.parametrize(
    "kind", [kind for kind in WITH_FOLDERS if kind.may_overwrite], ids=lambda kind: kind.key
)
def test_a_users_file_inside_an_output_folder_the_tool_made_stays(kind, tmp_path: Path):
    folders = [concrete(p) for p in kind.outputs if "." not in p]
    folder = tmp_path / "run"
    with OutputFolder(folder, kind) as out:
        for name in folders:
            write_output(out, name, "the tool's")
    for name in folders:
        (folder / name / "mine.txt").write_text("kept")
    with OutputFolder(folder, kind, overwrite=True) as out:
        out.remove_previous_outputs()
    for name in folders:
        assert (folder / name / "mine.txt").read_text() == "kept"
        assert not (folder / name / "inside.txt").exists()


@pytest.mark.parametrize("kind", WITH_FOLDERS, ids=lambda kind: kind.key)
def test_a_link_named_like_an_output_folder_is_refused_before_any_work(kind, tmp_path: Path):
    folders = [concrete(p) for p in kind.outputs if "." not in p]
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in folders:
        folder = tmp_path / f"out-{name}"
        folder.mkdir()
        (folder / name).symlink_to(outside)
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(OutputError, match="symbolic link to a folder"):
                OutputFolder(folder, kind, **flags)
    assert list(outside.iterdir()) == []


def test_overwriting_samples_removes_their_old_evaluation_not_the_users_files(tmp_path: Path):
    samples, evaluation = KINDS["samples"], KINDS["sample-evaluation"]
    folder = tmp_path / "samples"
    with OutputFolder(folder, samples) as out:
        write_output(out, "sample_0000.nii.gz", "a sample")
    with OutputFolder(folder / "evaluation", evaluation) as out:
        write_output(out, "sample_metrics.json", "measures of the old samples")
    (folder / "evaluation" / "notes.txt").write_text("kept")
    with OutputFolder(folder, samples, overwrite=True) as out:
        assert out.remove_previous_outputs() == ["evaluation", "sample_0000.nii.gz"]
    assert not (folder / "evaluation" / "sample_metrics.json").exists()
    assert (folder / "evaluation" / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=lambda kind: kind.key)
def test_no_output_is_written_through_a_link(kind, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "out"
    with OutputFolder(folder, kind) as out:
        for pattern in kind.outputs:
            name = concrete(pattern)
            target = outside / name
            target.mkdir() if "." not in name else target.write_text("outside")
            (folder / name).symlink_to(target)
            if "." in name:  # a file: the link is replaced by the output
                write_output(out, name, "the tool's")
                assert not (folder / name).is_symlink()
                assert target.read_text() == "outside"
            else:  # a folder linked while the command runs: refused, nothing made through it
                with pytest.raises(OutputError, match="symbolic link"):
                    write_output(out, f"{name}/deeper/x.png", "the tool's")
                assert list(target.iterdir()) == []


def write_lock(folder: Path, owner: object) -> None:
    folder.mkdir(exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(owner))
    os.utime(folder / LOCK_FILE, (0, 0))  # old enough to be judged


@pytest.mark.parametrize(
    "pid", [2**70, -(2**70), True, 0, "12", 1.5, None], ids=lambda pid: repr(pid)[:12]
)
def test_a_lock_naming_an_impossible_process_is_stale(pid, tmp_path: Path):
    import socket

    write_lock(tmp_path / "f", {"host": socket.gethostname(), "pid": pid})
    with FolderLock(tmp_path / "f"):
        assert json.loads((tmp_path / "f" / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("special", ["folder", "link", "fifo"])
def test_a_special_file_named_like_the_lock_is_refused_and_left(special, tmp_path: Path):
    folder = tmp_path / "f"
    folder.mkdir()
    lock = folder / LOCK_FILE
    if special == "folder":
        lock.mkdir()
        (lock / "keep.txt").write_text("kept")
    elif special == "link":
        (tmp_path / "target").write_text("kept")
        lock.symlink_to(tmp_path / "target")
    if special == "fifo":
        with fifo(lock), pytest.raises(OutputError, match="not a lock file"):
            FolderLock(folder).acquire()
    else:
        with pytest.raises(OutputError, match="not a lock file"):
            FolderLock(folder).acquire()
    assert lock.is_symlink() or lock.exists()
    if special == "folder":
        assert (lock / "keep.txt").read_text() == "kept"
    if special == "link":
        assert (tmp_path / "target").read_text() == "kept"


def test_a_marker_that_is_a_fifo_or_a_link_is_no_marker(tmp_path: Path):
    kind = KINDS["evaluation"]
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "user.txt").write_text("kept")
    with fifo(folder / MARKER_FILE), pytest.raises(OutputError, match="not a folder mri-vqvae"):
        OutputFolder(folder, kind)


def test_an_edited_manifest_names_nothing_outside_the_folder(tmp_path: Path):
    kind = KINDS["samples"]
    outside = tmp_path / "sample_0000.nii.gz"
    outside.write_text("a user's file beside the folder")
    folder = tmp_path / "samples"
    with OutputFolder(folder, kind) as out:
        write_output(out, "sample_0001.nii.gz", "a sample")
    marker = json.loads((folder / MARKER_FILE).read_text())
    info = outside.stat()
    for name in (str(outside), "../sample_0000.nii.gz"):
        marker["outputs"][name] = [info.st_ino, info.st_mtime_ns]
    (folder / MARKER_FILE).write_text(json.dumps(marker))
    assert set(written_outputs(folder)) == {"sample_0001.nii.gz"}
    with OutputFolder(folder, kind, overwrite=True) as out:
        out.remove_previous_outputs()
    assert outside.read_text() == "a user's file beside the folder"


def test_a_folder_moved_away_and_linked_back_is_the_users(tmp_path: Path):
    kind = KINDS["vqvae"]
    folder = tmp_path / "run"
    with OutputFolder(folder, kind) as out:
        write_output(out, "reconstructions/train/epoch_1.png", "a preview")
    kept = tmp_path / "kept"
    (folder / "reconstructions" / "train").rename(kept)  # same inode and time: moved
    (folder / "reconstructions" / "train").symlink_to(kept)
    with OutputFolder(folder, kind, overwrite=True) as out:
        out.remove_previous_outputs()
    assert (kept / "epoch_1.png").read_text() == "a preview"


def test_a_command_killed_outright_leaves_its_files_in_the_manifest(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(files, "_RECORD_EVERY_SECONDS", 0.0)
    folder = tmp_path / "run"
    out = OutputFolder(folder, KINDS["vqvae"]).__enter__()  # never left: as after a SIGKILL
    write_output(out, "best.pt", "weights")
    write_output(out, "metrics.csv", "epoch,loss")
    assert {"best.pt", "metrics.csv"} <= set(written_outputs(folder))
    out._lock.release()


def test_a_large_manifest_and_a_deep_tree_are_no_trouble(tmp_path: Path):
    kind = KINDS["samples"]
    folder = tmp_path / "samples"
    with OutputFolder(folder, kind) as out:
        write_output(out, "sample_0000.nii.gz", "a sample")
    marker = json.loads((folder / MARKER_FILE).read_text())
    marker["outputs"].update({f"sample_{i:06d}.nii.gz": [i, i] for i in range(30_000)})
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2))  # over 1 MiB
    assert files.folder_kind(folder) is kind
    deep = folder / "evaluation"
    deep.mkdir()
    for _ in range(1200):  # deeper than Python's recursion (os.makedirs itself would fail)
        deep = deep / "d"
        deep.mkdir()
    try:
        with OutputFolder(folder, kind, overwrite=True) as out:
            out.remove_previous_outputs()
        assert not (folder / "sample_0000.nii.gz").exists()
    finally:  # pytest's own clean-up of old temporary folders recurses, so not left to it
        while deep != folder:
            deep.rmdir()
            deep = deep.parent
