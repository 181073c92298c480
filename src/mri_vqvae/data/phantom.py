"""A synthetic pelvic MRI phantom: T2-weighted-looking axial slices in the HipMRI layout.

Each slice is drawn from analytic shapes (body outline, subcutaneous fat, muscle with fascial
planes, hip joints, pubic and ischial bones, sacrum, bladder, prostate with peripheral zone and
central gland, seminal vesicles, rectum in mesorectal fat, femoral vessels), then given tissue
texture, a smooth coil bias field, a slight blur and Rician noise, as a magnitude MR image has.
Anatomy varies by case (body habitus, organ sizes), by week (bladder and rectal filling, a small
shift) and by slice (position from prostate apex to acetabulum roof). Everything is drawn from
NumPy generators seeded by (seed, case, week, slice), so a dataset is deterministic for a seed.

Slices are stored as HipMRI's are: arrays of shape (256, 128) whose first axis runs left-right
and whose second runs anterior-posterior, with a segmentation beside each (0 background, 1 body,
2 bone, 3 bladder, 4 rectum, 5 prostate).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mri_vqvae.data.nifti import write_slice
from mri_vqvae.errors import ConfigError

# Split name to (image folder, mask folder), as the HipMRI release names them.
LAYOUT = {
    "train": ("keras_slices_train", "keras_slices_seg_train"),
    "val": ("keras_slices_validate", "keras_slices_seg_validate"),
    "test": ("keras_slices_test", "keras_slices_seg_test"),
}
LABELS = {"background": 0, "body": 1, "bone": 2, "bladder": 3, "rectum": 4, "prostate": 5}
# Relative T2-weighted signal of each tissue (fat and urine bright, muscle dark, cortex black).
SIGNAL = {
    "fat": 0.82,
    "muscle": 0.30,
    "marrow": 0.62,
    "cortex": 0.04,
    "urine": 0.97,
    "bladder_wall": 0.22,
    "peripheral_zone": 0.72,
    "central_gland": 0.40,
    "capsule": 0.18,
    "seminal_vesicle": 0.80,
    "rectal_wall": 0.24,
    "gas": 0.02,
    "stool": 0.38,
    "vessel": 0.05,
    "joint": 0.10,
}


@dataclass(frozen=True)
class PhantomSpec:
    """Shape of a phantom dataset: cases per split, weeks per case, slices per volume."""

    train_cases: int = 16
    val_cases: int = 2
    test_cases: int = 2
    weeks: int = 2
    slices: int = 16
    height: int = 256  # left-right, the array's first axis
    width: int = 128  # anterior-posterior, the array's second axis
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_cases", "val_cases", "test_cases", "weeks", "slices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"phantom {name} must be at least 1, got {getattr(self, name)}")
        if self.height < 32 or self.width < 16:
            raise ConfigError(
                f"phantom slices must be at least 32x16, got {self.height}x{self.width}"
            )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``scale`` pixels."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape)


class _Canvas:
    """Pixel grid in display orientation (rows anterior to posterior, columns right to left)."""

    def __init__(self, rows: int, cols: int, scale: float) -> None:
        self.y, self.x = np.mgrid[0:rows, 0:cols].astype(np.float64)
        self.cy, self.cx = rows / 2, cols / 2
        self.scale = scale  # pixels per unit of the 128-pixel reference anatomy

    def ellipse(self, dx: float, dy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        """Approximate signed distance (pixels, negative inside) to an ellipse."""
        s = self.scale
        x = self.x - (self.cx + dx * s)
        y = self.y - (self.cy + dy * s)
        c, sn = np.cos(angle), np.sin(angle)
        xr, yr = c * x + sn * y, -sn * x + c * y
        rx, ry = max(rx * s, 0.5), max(ry * s, 0.5)
        return (np.sqrt((xr / rx) ** 2 + (yr / ry) ** 2) - 1) * min(rx, ry)

    @staticmethod
    def soft(distance: np.ndarray, edge: float = 0.8) -> np.ndarray:
        """Partial-volume mask from a signed distance: 1 inside, 0 outside, smooth at the edge."""
        return 1 / (1 + np.exp(np.clip(distance / edge, -40, 40)))


def phantom_slice(
    seed: int, case: int, week: int, position: float, *, height: int = 256, width: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """One slice and its label map, both of shape (height, width) in HipMRI orientation.

    Args:
        position: 0 at the prostate apex (inferior) to 1 at the acetabulum roof (superior).
    """
    drawing = _PhantomDrawing(seed, case, week, position, rows=width, cols=height)
    drawing.body()
    drawing.bones()
    drawing.rectum()
    drawing.prostate()
    drawing.bladder()
    pixels = drawing.acquire()
    return pixels.T.copy(), drawing.labels.T.copy()


class _PhantomDrawing:
    """One phantom slice being drawn, in display orientation (stored transposed): the
    anatomy painted structure by structure over a blank image, then acquired (coil bias,
    blur, Rician noise). Every random draw comes from the case's, the week's or the slice's
    own generator, in a fixed order, so a slice depends only on its seed and place."""

    def __init__(
        self, seed: int, case: int, week: int, position: float, *, rows: int, cols: int
    ) -> None:
        self.case_rng = np.random.default_rng([seed, case])
        week_rng = np.random.default_rng([seed, case, week])
        self.slice_rng = np.random.default_rng([seed, case, week, round(position * 1e6)])
        self.shape = (rows, cols)
        self.canvas = _Canvas(rows, cols, scale=rows / 128)
        self.position = position
        # Body habitus and organ sizes belong to the case; filling and shifts to the week.
        self.body_rx = self.case_rng.uniform(98, 118)
        self.body_ry = self.case_rng.uniform(50, 58)
        self.fat = self.case_rng.uniform(5, 16)
        self.prostate_size = self.case_rng.uniform(0.8, 1.25)
        self.hip_spread = self.case_rng.uniform(62, 72)
        self.bladder_fill = week_rng.uniform(0.5, 1.2)
        self.rectal_gas = week_rng.uniform() < 0.45
        self.shift_x, self.shift_y = week_rng.normal(0, 1.5), week_rng.normal(0, 1.0)
        self.tilt = week_rng.normal(0, 0.03)
        self.image = np.zeros(self.shape)
        self.labels = np.zeros(self.shape, dtype=np.uint8)

    def at(self, dx, dy, rx, ry, angle=0.0) -> np.ndarray:
        """The signed distance to an ellipse placed in this week's pose."""
        return self.canvas.ellipse(dx + self.shift_x, dy + self.shift_y, rx, ry, angle + self.tilt)

    def paint(self, distance, signal, label=None, edge=0.8) -> np.ndarray:
        """Paint ``signal`` inside ``distance`` (and ``label`` where it covers most)."""
        mask = self.canvas.soft(distance, edge)
        self.image = self.image * (1 - mask) + signal * mask
        if label is not None:
            self.labels[mask > 0.5] = label
        return mask

    def trunk(self, inset: float) -> np.ndarray:
        """A rounded trunk with the buttocks posteriorly, ``inset`` pixels in."""
        body_rx, body_ry = self.body_rx - inset, self.body_ry - inset
        return np.minimum.reduce(
            [
                self.at(0, -4, body_rx, body_ry),
                self.at(-44, 16, 60 - inset, 44 - inset),
                self.at(44, 16, 60 - inset, 44 - inset),
            ]
        )

    def body(self) -> None:
        """The body in its subcutaneous fat, the muscles with their fascial planes, and the
        pelvic cavity's fat and side walls."""
        at, paint, shape = self.at, self.paint, self.shape
        self.texture = _smooth_noise(self.slice_rng, shape, 3.0)
        paint(self.trunk(0), SIGNAL["fat"] * (1 + 0.04 * self.texture), LABELS["body"], edge=1.2)
        self.muscle = SIGNAL["muscle"] * (1 + 0.12 * _smooth_noise(self.slice_rng, shape, 1.5))
        paint(self.trunk(self.fat), self.muscle)
        # Fascial fat planes between the gluteal and thigh muscles, inside the muscle only.
        inside_muscle = self.trunk(self.fat) + 2
        for side in (-1, 1):
            ring = np.abs(at(side * 52, 22, 44, 26, side * 0.3)) - 0.9
            paint(np.maximum(ring, inside_muscle), SIGNAL["fat"], edge=0.6)
            ring = np.abs(at(side * 86, -16, 22, 30, side * 0.5)) - 0.8
            paint(np.maximum(ring, inside_muscle), SIGNAL["fat"], edge=0.6)
        # Pelvic cavity fat, then its muscular side walls (obturator internus).
        paint(at(0, 2, 46, 38), SIGNAL["fat"] * (1 + 0.05 * self.texture))
        for side in (-1, 1):
            paint(at(side * 40, 4, 9, 30, side * 0.15), self.muscle)

    def bones(self) -> None:
        """Hip joints superiorly, femoral necks and ischia lower, the pubis anteriorly, the
        femoral vessels, and the sacrum."""
        at, paint, s = self.at, self.paint, self.position
        self.marrow = SIGNAL["marrow"] * (1 + 0.08 * _smooth_noise(self.slice_rng, self.shape, 2.0))
        for side in (-1, 1):
            if s > 0.45:
                self.hip_joint(side)
            else:
                self.femoral_neck_and_ischium(side)
            if 0.2 < s < 0.62:
                paint(at(side * 11, -42, 13, 6.5, side * 0.35), SIGNAL["cortex"], LABELS["bone"])
                paint(at(side * 11, -42, 10.5, 4.5, side * 0.35), self.marrow)
            # Femoral artery and vein: flow voids anterior to the hip.
            paint(at(side * 52, -36, 3.5, 3.5), SIGNAL["vessel"])
            paint(at(side * 60, -34, 4.5, 4.0), SIGNAL["vessel"] + 0.1)
        if s > 0.6:
            width_sacrum = 8 + 16 * (s - 0.6) / 0.4
            paint(at(0, 46, width_sacrum + 3, 8.5), SIGNAL["cortex"], LABELS["bone"])
            paint(at(0, 46, width_sacrum, 6), self.marrow)

    def hip_joint(self, side: int) -> None:
        """The acetabulum around the femoral head, with the joint space between."""
        at, paint, marrow, spread = self.at, self.paint, self.marrow, self.hip_spread
        head_r = 17 * min(1.0, (self.position - 0.45) / 0.2 + 0.55)
        paint(at(side * (spread - 6), 0, head_r + 9, head_r + 7), SIGNAL["cortex"], LABELS["bone"])
        paint(at(side * (spread - 6), 0, head_r + 7, head_r + 5), marrow)
        paint(at(side * spread, 0, head_r + 1.5, head_r + 1.5), SIGNAL["joint"])
        paint(at(side * spread, 0, head_r + 0.5, head_r + 0.5), SIGNAL["cortex"], LABELS["bone"])
        paint(at(side * spread, 0, head_r - 1.5, head_r - 1.5), marrow)

    def femoral_neck_and_ischium(self, side: int) -> None:
        """Below the joint: the femoral neck and, lower still, the ischium."""
        at, paint, marrow = self.at, self.paint, self.marrow
        neck = side * (self.hip_spread + 16)
        paint(at(neck, 2, 17, 13, side * 0.4), SIGNAL["cortex"], LABELS["bone"])
        paint(at(neck, 2, 14.5, 10.5, side * 0.4), marrow)
        if self.position < 0.55:
            paint(at(side * 42, 28, 10, 14, side * -0.3), SIGNAL["cortex"], LABELS["bone"])
            paint(at(side * 42, 28, 7.5, 11.5, side * -0.3), marrow)

    def rectum(self) -> None:
        """The rectum in its mesorectal fat: a dark wall, its lumen gas or stool."""
        at, paint = self.at, self.paint
        rect_r = 13 + 4 * self.position
        paint(at(0, 28, rect_r + 7, rect_r * 0.8 + 6), SIGNAL["fat"] * (1 + 0.05 * self.texture))
        paint(at(0, 28, rect_r, rect_r * 0.8), SIGNAL["rectal_wall"], LABELS["rectum"])
        stool = SIGNAL["stool"] * (1 + 0.3 * self.texture)
        lumen = SIGNAL["gas"] if self.rectal_gas else stool
        paint(at(0, 28, rect_r - 3.5, rect_r * 0.8 - 3.5), lumen)

    def prostate(self) -> None:
        """The prostate from apex to base (peripheral zone posteriorly, central gland
        anteriorly, the urethra), then the seminal vesicles."""
        at, paint, s = self.at, self.paint, self.position
        if s < 0.62:
            profile = np.sin(np.pi * min(1.0, (s + 0.12) / 0.74)) * self.prostate_size
            prx, pry = 22 * profile + 3, 17 * profile + 3
            paint(at(0, 6, prx + 1.5, pry + 1.5), SIGNAL["capsule"], LABELS["prostate"])
            paint(at(0, 6, prx, pry), SIGNAL["peripheral_zone"] * (1 + 0.08 * self.texture))
            nodules = _smooth_noise(self.slice_rng, self.shape, 1.2)
            central = SIGNAL["central_gland"] * (1 + 0.22 * nodules)
            paint(at(0, 2.5, prx * 0.72, pry * 0.68), central)
            paint(at(0, -0.5 * pry + 2, 2.2, 2.2), SIGNAL["capsule"] + 0.1)  # urethra
        if 0.5 < s < 0.78:
            for side in (-1, 1):
                paint(at(side * 15, 16, 14, 5, side * -0.35), SIGNAL["seminal_vesicle"])

    def bladder(self) -> None:
        """The bladder above the prostate, growing toward the dome: bright urine in a dark
        wall."""
        if self.position <= 0.4:
            return
        growth = min(1.0, (self.position - 0.4) / 0.35)
        brx = (18 + 28 * growth) * self.bladder_fill
        bry = (10 + 20 * growth) * self.bladder_fill
        bdy = -14 - 6 * growth
        self.paint(self.at(0, bdy, brx + 2.5, bry + 2.5), SIGNAL["bladder_wall"], LABELS["bladder"])
        self.paint(self.at(0, bdy, brx, bry), SIGNAL["urine"] * (1 + 0.01 * self.texture))

    def acquire(self) -> np.ndarray:
        """The drawn anatomy as a scanner records it: receive-coil bias (brighter near the
        anterior and posterior surface coils, a smooth drift), a slight blur and Rician noise
        (the magnitude of a signal with complex Gaussian noise), in a 12-bit-like range."""
        canvas = self.canvas
        drift = _smooth_noise(self.case_rng, self.shape, 24.0)
        depth = np.abs(canvas.y - canvas.cy) / canvas.cy
        bias = (0.78 + 0.32 * depth**2) * (1 + 0.08 * drift)
        image = _blur(self.image * bias, 0.6)
        sigma = self.case_rng.uniform(0.015, 0.03)
        real = image + self.slice_rng.normal(0, sigma, image.shape)
        imag = self.slice_rng.normal(0, sigma, image.shape)
        magnitude = np.sqrt(real**2 + imag**2)
        return (magnitude * 1000).astype(np.float32)


def case_id(split: str, index: int) -> int:
    """Case numbers run on across splits, so no case is in two splits."""
    offset = {"train": 0, "val": 1000, "test": 2000}[split]
    return offset + index


def write_phantom_dataset(
    root: str | Path, spec: PhantomSpec = PhantomSpec(), workers: int = 1
) -> dict[str, int]:
    """Write a HipMRI-layout phantom dataset under ``root``; returns the slice count per split.
    ``workers`` processes write cases side by side (every slice depends only on the seed, its
    case, week and position, so the files are the same for any count)."""
    root = Path(root)
    cases = {"train": spec.train_cases, "val": spec.val_cases, "test": spec.test_cases}
    jobs = [(root, spec, split, index) for split in LAYOUT for index in range(cases[split])]
    if workers > 1:
        parent = os.getpid()
        with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(parent,)) as pool:
            written = list(pool.map(_write_phantom_case, jobs))
    else:
        written = [_write_phantom_case(job) for job in jobs]
    counts = dict.fromkeys(LAYOUT, 0)
    for split, count in written:
        counts[split] += count
    return counts


def _die_with_parent(parent: int) -> None:
    """Make a worker end when the command that started it does, however it ends (SIGKILL
    included, which runs no clean-up): without this, killed ``demo-data`` left its workers
    writing on. Linux's PR_SET_PDEATHSIG; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(1)


def _write_phantom_case(job: tuple[Path, PhantomSpec, str, int]) -> tuple[str, int]:
    """Every slice and mask of one case (all its weeks); returns its split and slice count."""
    root, spec, split, index = job
    image_folder, mask_folder = LAYOUT[split]
    affine = np.diag([1.5625, 1.5625, 3.0, 1.0])
    case = case_id(split, index)
    for week in range(spec.weeks):
        for number in range(spec.slices):
            position = number / max(spec.slices - 1, 1)
            pixels, labels = phantom_slice(
                spec.seed, case, week, position, height=spec.height, width=spec.width
            )
            stem = f"{case:03d}_week_{week}_slice_{number}.nii.gz"
            write_slice(pixels, root / image_folder / f"case_{stem}", affine)
            write_slice(labels.astype(np.float32), root / mask_folder / f"seg_{stem}", affine)
    return split, spec.weeks * spec.slices
