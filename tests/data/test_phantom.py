import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mri_vqvae.data.nifti import read_slice
from mri_vqvae.data.phantom import LABELS, LAYOUT, PhantomSpec, phantom_slice, write_phantom_dataset
from tests.helpers import wait_for


def test_deterministic_for_a_seed():
    a, labels_a = phantom_slice(seed=5, case=2, week=1, position=0.4)
    b, labels_b = phantom_slice(seed=5, case=2, week=1, position=0.4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    other, _ = phantom_slice(seed=6, case=2, week=1, position=0.4)
    assert np.abs(a - other).mean() > 1.0


def test_slices_are_hipmri_shaped_and_vary_by_case_week_and_position():
    base, _ = phantom_slice(0, 1, 0, 0.5)
    assert base.shape == (256, 128) and base.dtype == np.float32
    for other in (
        phantom_slice(0, 2, 0, 0.5)[0],
        phantom_slice(0, 1, 1, 0.5)[0],
        phantom_slice(0, 1, 0, 0.9)[0],
    ):
        assert np.abs(base - other).mean() > 5.0


def test_anatomy_follows_the_slice_position():
    _, apex = phantom_slice(0, 0, 0, 0.1)
    _, dome = phantom_slice(0, 0, 0, 0.9)
    assert (apex == LABELS["prostate"]).sum() > 100 and (apex == LABELS["bladder"]).sum() == 0
    assert (dome == LABELS["bladder"]).sum() > 1000 and (dome == LABELS["prostate"]).sum() == 0
    for labels in (apex, dome):
        assert (labels == LABELS["bone"]).sum() > 100
        assert (labels == LABELS["rectum"]).sum() > 100


def test_t2_contrast_urine_bright_muscle_dark_background_darkest():
    pixels, labels = phantom_slice(0, 0, 0, 0.9)
    urine = pixels[labels == LABELS["bladder"]].mean()
    body = pixels[labels == LABELS["body"]].mean()
    background = pixels[labels == LABELS["background"]].mean()
    assert urine > body > 4 * background


def test_dataset_layout(tmp_path: Path):
    spec = PhantomSpec(
        train_cases=2, val_cases=1, test_cases=1, weeks=2, slices=3, height=64, width=32
    )
    counts = write_phantom_dataset(tmp_path, spec)
    assert counts == {"train": 12, "val": 6, "test": 6}
    pattern = re.compile(r"case_\d{3,4}_week_\d+_slice_\d+\.nii\.gz")
    cases = {}
    for split, (images, masks) in LAYOUT.items():
        names = sorted(p.name for p in (tmp_path / images).iterdir())
        assert len(names) == counts[split]
        assert all(pattern.fullmatch(name) for name in names)
        assert len(list((tmp_path / masks).iterdir())) == counts[split]
        cases[split] = {name.split("_week")[0] for name in names}
        assert read_slice(tmp_path / images / names[0]).pixels.shape == (64, 32)
    assert not (cases["train"] & cases["val"]) and not (cases["train"] & cases["test"])


def test_cases_written_in_parallel_are_the_same_files(tmp_path: Path):
    spec = PhantomSpec(
        train_cases=3, val_cases=1, test_cases=1, weeks=1, slices=2, height=32, width=16
    )
    serial = write_phantom_dataset(tmp_path / "serial", spec)
    parallel = write_phantom_dataset(tmp_path / "parallel", spec, workers=2)
    assert serial == parallel == {"train": 6, "val": 2, "test": 2}
    names = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.gz"))
    assert len(names) == 20
    assert names == sorted(
        p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").rglob("*.gz")
    )
    for name in names:
        a, b = read_slice(tmp_path / "serial" / name), read_slice(tmp_path / "parallel" / name)
        assert np.array_equal(a.pixels, b.pixels), name


def _processes_naming(text: str) -> list[int]:
    """The live processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or text not in (entry / "cmdline").read_bytes().decode():
                continue
            if (entry / "stat").read_text().split(") ")[1][0] != "Z":  # a zombie has ended
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_killing_demo_data_ends_its_workers_too(tmp_path: Path):
    out = tmp_path / "killed-phantom"
    process = subprocess.Popen(
        [sys.executable, "-m", "mri_vqvae", "demo-data", str(out), "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "keras_slices_train", process)
    time.sleep(0.5)  # the workers are writing
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while _processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_naming(str(out)) == []
