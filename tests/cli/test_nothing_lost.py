"""Nothing a user owns is overwritten or lost: each way it could happen, through the real
command line in its own process, and the output-folder rules and lock beneath them."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mri_vqvae.checkpoint import load_checkpoint, load_prior_checkpoint
from mri_vqvae.cli.main import main
from mri_vqvae.data.nifti import DataError, read_slice
from mri_vqvae.files import LOCK_FILE, MARKER_FILE, FolderBusy, FolderLock
from tests.helpers import cli_command, train_args, wait_for

SMALL_PHANTOM = ["--train-cases", "1", "--val-cases", "1", "--test-cases", "1", "--weeks", "1"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``mri-vqvae ARGS`` in a process of its own, as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "mri_vqvae", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    for word in words:
        assert word in done.stderr, done.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(phantom_root: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lost") / "run"
    assert main(train_args(phantom_root, run, "--epochs", "1")) == 0
    return run / "best.pt"


@pytest.mark.slow
def test_reconstruct_never_writes_over_its_input_and_asks_before_replacing_a_file(
    trained: Path, phantom_root: Path, tmp_path: Path, capsys
):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(sorted((phantom_root / "keras_slices_test").iterdir())[0], scan)
    before = scan.read_bytes()
    args = ["reconstruct", str(scan), "--checkpoint", str(trained), "--out"]
    assert_refused(cli(tmp_path, *args, str(scan), "--overwrite"), "is the input")
    # Nor through another name for the same file.
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    for other_name in ("link.nii.gz", "hard.nii.gz"):
        assert main([*args, str(tmp_path / other_name), "--overwrite"]) == 2
        assert "is the input" in capsys.readouterr().err
    assert scan.read_bytes() == before

    mine = tmp_path / "mine.nii.gz"
    mine.write_bytes(b"the user's file")
    assert main([*args, str(mine)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's file"
    assert main([*args, str(mine), "--overwrite"]) == 0
    assert read_slice(mine).pixels.shape == read_slice(scan).pixels.shape
    assert main([*args, str(tmp_path / "out.png")]) == 2
    assert ".nii or .nii.gz" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_data_never_writes_phantoms_over_a_folder_of_slices(tmp_path: Path, capsys):
    data = tmp_path / "data"
    real = data / "keras_slices_train" / "case_000_week_0_slice_0.nii.gz"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a real scan")
    phantom = ["--slices", "2", "--size", "32x16", *SMALL_PHANTOM]
    assert_refused(cli(tmp_path, "demo-data", str(data), *phantom), "not a folder mri-vqvae")
    assert real.read_bytes() == b"a real scan"
    assert sorted(p.name for p in data.rglob("*")) == [real.name, "keras_slices_train"]
    # Not even over a phantom it wrote itself, where a user may have added a real scan.
    ours = tmp_path / "phantom"
    assert main(["-q", "demo-data", str(ours), *phantom]) == 0
    assert main(["-q", "demo-data", str(ours), *phantom]) == 2
    assert "only written into a new or empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_training_into_a_folder_in_use_is_refused(phantom_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}
    first = subprocess.Popen(
        cli_command(phantom_root, run_dir, "--epochs", "200"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(run_dir / "last.pt", first)
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        # --overwrite passes the folder's rules (it is a run), and still meets the lock.
        second = cli(tmp_path, *train_args(phantom_root, run_dir, "--overwrite"))
        assert_refused(second, "in use by another mri-vqvae process", f"pid {first.pid}")
        assert first.poll() is None, "the first run must still be running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (run_dir / LOCK_FILE).exists(), "a stopped run gives its lock up"
    assert load_checkpoint(run_dir / "last.pt").config.train.epochs == 200  # the first's


@pytest.mark.slow
def test_a_lock_of_a_dead_process_is_taken_over_and_a_live_ones_is_not(tmp_path: Path):
    lock_file = tmp_path / LOCK_FILE
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    lock_file.write_text(json.dumps({"host": host, "pid": ended.pid, "since": "earlier"}))
    with FolderLock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"host": host, "pid": sleeper.pid}))
        with pytest.raises(FolderBusy, match=f"pid {sleeper.pid} on {host}"):
            FolderLock(tmp_path).acquire()
        # The same process id with another start time: the id was reused, the lock is stale.
        lock_file.write_text(json.dumps({"host": host, "pid": sleeper.pid, "process_start": "1"}))
        with FolderLock(tmp_path):
            pass
        # A process on another machine cannot be checked, so it is assumed to run.
        lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        with pytest.raises(FolderBusy, match="delete"):
            FolderLock(tmp_path).acquire()
        assert json.loads(lock_file.read_text())["host"] == "elsewhere"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_train_refuses_a_folder_of_the_users_files_unless_told(phantom_root: Path, tmp_path: Path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("metrics.csv", "config.yaml", "ssim_scores.png"):
        (folder / name).write_text(f"the user's {name}")
    done = cli(tmp_path, *train_args(phantom_root, folder, "--epochs", "1"))
    assert_refused(done, "not a folder mri-vqvae wrote", "--overwrite")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml",
        "metrics.csv",
        "ssim_scores.png",
    ]
    assert (folder / "metrics.csv").read_text() == "the user's metrics.csv"
    # Told to, it writes its outputs there, replacing the files with the same names only.
    (folder / "notes.txt").write_text("kept")
    assert main(train_args(phantom_root, folder, "--epochs", "1", "--overwrite")) == 0
    assert (folder / "metrics.csv").read_text().startswith("epoch,")
    assert (folder / "notes.txt").read_text() == "kept"
    assert json.loads((folder / MARKER_FILE).read_text())["kind"] == "vqvae"


def damaged_but_readable_by_nibabel(path: Path) -> None:
    """Flip one byte of the deflate stream where nibabel still returns voxels (wrong ones):
    it stops reading before the gzip trailer, whose CRC-32 would have told."""
    original = path.read_bytes()
    pixels = np.asanyarray(nib.load(str(path)).dataobj)
    for offset in range(len(original) // 2, len(original) - 8):
        damaged = bytearray(original)
        damaged[offset] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            read = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception:
            continue
        if read.shape == pixels.shape and not np.array_equal(read, pixels):
            return
    raise AssertionError("no byte found whose damage nibabel misses")


@pytest.mark.slow
def test_a_slice_with_damaged_compressed_data_is_named_not_trained_on(
    phantom_root: Path, tmp_path: Path, caplog
):
    data = tmp_path / "data"
    shutil.copytree(phantom_root, data)
    bad = sorted((data / "keras_slices_train").iterdir())[3]
    damaged_but_readable_by_nibabel(bad)
    with pytest.raises(DataError, match="compressed data is damaged"):
        read_slice(bad)
    done = cli(tmp_path, *train_args(data, tmp_path / "run", "--epochs", "1"))
    assert_refused(done, bad.name, "compressed data is damaged")
    assert main(train_args(data, tmp_path / "run", "--epochs", "1", "--skip-bad-files")) == 0
    assert f"skipped 1 of {len(list(bad.parent.iterdir()))}" in caplog.text

    # A damaged checksum alone is named too.
    shutil.copy(sorted(bad.parent.iterdir())[4], bad)
    trailer = bytearray(bad.read_bytes())
    trailer[-8] ^= 0xFF  # the CRC-32 field
    bad.write_bytes(bytes(trailer))
    with pytest.raises(DataError, match="CRC check failed"):
        read_slice(bad)


@pytest.mark.parametrize(
    "command",
    ["evaluate", "sample", "train-prior", "demo-data", "evaluate-samples", "train"],
)
def test_an_output_path_that_is_a_file_is_refused_before_any_work(
    command: str, tmp_path: Path, capsys
):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    missing = str(tmp_path / "missing.pt")  # loading it would be the first work
    (tmp_path / "samples").mkdir()
    args = {
        "evaluate": ["--checkpoint", missing, "--data", str(tmp_path), "--out", str(taken)],
        "sample": ["--vqvae", missing, "--prior", missing, "--out", str(taken)],
        "train-prior": ["--vqvae", missing, "--data", str(tmp_path), "--out", str(taken)],
        "demo-data": [str(taken)],
        "evaluate-samples": ["--samples", str(tmp_path / "samples"), "--vqvae", missing],
        "train": ["--data", str(tmp_path), "--out", str(taken)],
    }[command]
    if command == "evaluate-samples":
        args += ["--out", str(taken)]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert f"{taken}: is a file" in err and "missing.pt" not in err, err
    assert taken.read_text() == "mine"


def test_report_out_must_be_a_file_and_replaces_only_a_report(
    trained: Path, tmp_path: Path, capsys
):
    run_dir = trained.parent
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "is a folder; --out names the file" in capsys.readouterr().err
    page = tmp_path / "page.html"
    page.write_text("<html>the user's page</html>")
    assert main(["report", str(run_dir), "--out", str(page)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--out", str(tmp_path / "mine.html")]) == 0
    assert main(["report", str(run_dir), "--out", str(tmp_path / "mine.html")]) == 0  # ours
    assert main(["report", str(run_dir), "--out", str(page), "--overwrite"]) == 0
    assert "the user's page" not in page.read_text()


@pytest.mark.slow
def test_a_stopped_prior_says_how_to_resume_and_resumes(
    trained: Path, phantom_root: Path, tmp_path: Path
):
    prior_dir = tmp_path / "prior"
    command = [
        sys.executable,
        "-m",
        "mri_vqvae",
        "train-prior",
        "--vqvae",
        str(trained),
        "--data",
        str(phantom_root),
        "--out",
        str(prior_dir),
        "--epochs",
        "300",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "prior.width=16",
        "prior.num_layers=1",
        "prior.num_heads=2",
        "prior_train.sample_every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MRI_VQVAE_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for(prior_dir / "last.pt", process)  # an epoch has ended: it is mid-way in the next
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    resume_line = next(line for line in err.splitlines() if line.startswith("resume with: "))
    assert resume_line.endswith("--resume") and "train-prior" in resume_line
    stopped = load_prior_checkpoint(prior_dir / "last.pt")
    assert not (prior_dir / LOCK_FILE).exists()
    # The printed command continues it (here for one more epoch, to end the test).
    resume = shlex.split(resume_line.removeprefix("resume with: "))[1:]
    resume[resume.index("--epochs") + 1] = str(stopped.progress.epoch + 1)
    assert main(["-q", *resume]) == 0
    finished = load_prior_checkpoint(prior_dir / "last.pt")
    assert (finished.progress.epoch, finished.progress.mid_epoch) == (
        stopped.progress.epoch + 1,
        False,
    )


def test_overwrite_in_a_folder_it_did_not_write_deletes_nothing(
    trained: Path, phantom_root: Path, tmp_path: Path, capsys
):
    folder = tmp_path / "mine"
    (folder / "validation").mkdir(parents=True)
    (folder / "validation" / "notes.txt").write_text("kept")
    (folder / "sample_patient01.nii.gz").write_text("a scan")
    (folder / "report.html").write_text("my page")
    assert main(train_args(phantom_root, folder, "--epochs", "1", "--overwrite")) == 0
    assert (folder / "validation" / "notes.txt").read_text() == "kept"
    assert (folder / "sample_patient01.nii.gz").read_text() == "a scan"
    assert (folder / "report.html").read_text() == "my page"  # train.report=false here
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "sample_patient01.nii.gz").write_text("a scan")
    assert main(["-q", "demo-data", str(samples), "--slices", "2"]) == 2  # not empty
    capsys.readouterr()


def test_a_folder_is_judged_by_every_output_it_holds_not_one_file(
    trained: Path, phantom_root: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.parent, run_dir)
    (run_dir / "last.pt").unlink()  # a user tidying up, keeping best.pt
    before = (run_dir / "best.pt").read_bytes()
    assert main(train_args(phantom_root, run_dir, "--epochs", "1")) == 2
    assert "already holds a VQ-VAE run" in capsys.readouterr().err
    assert (run_dir / "best.pt").read_bytes() == before


def test_no_command_writes_over_its_own_inputs_or_another_kind_of_folder(
    trained: Path, phantom_root: Path, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.parent, run_dir)
    before = (run_dir / "best.pt").read_bytes()
    prior = ["-q", "train-prior", "--vqvae", str(run_dir / "best.pt"), "--data", str(phantom_root)]
    assert main([*prior, "--out", str(run_dir), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    # Nor without its marker (a folder written by an older version): the input still guards.
    marker = (run_dir / MARKER_FILE).read_text()
    (run_dir / MARKER_FILE).unlink()
    assert main([*prior, "--out", str(run_dir), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert (run_dir / "best.pt").read_bytes() == before
    # Another kind's folder of this tool is never written into, whatever the flags.
    (run_dir / MARKER_FILE).write_text(marker)
    evaluate = ["evaluate", "--checkpoint", str(run_dir / "best.pt"), "--data", str(phantom_root)]
    assert main([*evaluate, "--out", str(run_dir), "--overwrite"]) == 2
    assert "is a VQ-VAE run of mri-vqvae; an evaluation goes in a folder of its own" in (
        capsys.readouterr().err
    )
