"""Figures from arrays: image grids, index maps, training curves and score plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np


def _gray(array) -> np.ndarray:
    """An image in [-1, 1] (any leading singleton axes) to a 2D array in [0, 1]."""
    image = np.asarray(array, dtype=np.float32).squeeze()
    return np.clip((image + 1) / 2, 0, 1)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def image_rows(
    rows: Sequence[np.ndarray],
    labels: Sequence[str],
    path: str | Path,
    title: str = "",
    column_titles: Sequence[str] | None = None,
) -> Path:
    """Rows of images side by side, each row ``(B, 1, H, W)`` in [-1, 1] and labelled.

    The images are laid into one picture with thin white gaps and drawn in one axes: a
    subplot per image made every training epoch's previews take seconds."""
    count = len(rows[0])
    height, width = np.asarray(rows[0]).shape[-2:]
    gap = max(1, width // 32)
    canvas = np.ones((len(rows) * (height + gap) - gap, count * (width + gap) - gap))
    for row, images in enumerate(rows):
        for column in range(count):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = _gray(images[column])
    fig, axis = plt.subplots(figsize=(1.4 * count * width / height * 2, 2.8 * len(rows)))
    axis.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([row * (height + gap) + height / 2 for row in range(len(rows))], labels)
    axis.tick_params(axis="y", length=0, labelsize=10)
    for label in axis.get_yticklabels():
        label.set(rotation=90, verticalalignment="center")
    if column_titles is not None:
        axis.set_xticks([c * (width + gap) + width / 2 for c in range(count)], column_titles)
        axis.xaxis.tick_top()
        axis.tick_params(axis="x", length=0, labelsize=8)
    else:
        axis.set_xticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def reconstruction_grid(
    originals: np.ndarray, reconstructions: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Originals in the top row, their reconstructions below; arrays ``(B, 1, H, W)`` in [-1, 1]."""
    return image_rows([originals, reconstructions], ["original", "reconstruction"], path, title)


def image_grid(images: np.ndarray, path: str | Path, columns: int = 8, title: str = "") -> Path:
    """Images ``(B, 1, H, W)`` in [-1, 1] in a grid ``columns`` wide, without gaps."""
    images = np.asarray(images)
    count, (height, width) = len(images), images.shape[-2:]
    columns = min(columns, count)
    rows = -(-count // columns)
    canvas = np.ones((rows * height, columns * width), dtype=np.float32)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = _gray(
            image
        )
    scale = 1.6 / 128
    fig, axis = plt.subplots(figsize=(max(columns * width * scale, 3), rows * height * scale))
    axis.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_axis_off()
    if title:
        axis.set_title(title)
    return _save(fig, path)


def nll_curves(history: Sequence[dict], path: str | Path) -> Path:
    """A prior's train and validation negative log-likelihood per epoch, with the unigram
    baseline."""
    epochs = [row["epoch"] for row in history]
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.plot(epochs, [row["train_nll_bits"] for row in history], "o-", label="train")
    axis.plot(epochs, [row["val_nll_bits"] for row in history], "s-", label="validation")
    axis.axhline(
        history[-1]["val_unigram_bits"], color="gray", ls="--", label="unigram (code histogram)"
    )
    axis.set_xlabel("epoch")
    axis.set_ylabel("bits per code")
    axis.set_title("Prior negative log-likelihood")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def _panels(panels: list[dict], path: str | Path, title: str) -> Path:
    """One row of images; each panel gives ``image``, ``title`` and optional imshow settings."""
    fig, axes = plt.subplots(1, len(panels), figsize=(8, 5))
    for axis, panel in zip(axes, panels, strict=True):
        shown = axis.imshow(
            panel["image"],
            cmap=panel.get("cmap", "gray"),
            vmin=panel.get("vmin", 0),
            vmax=panel.get("vmax", 1),
        )
        axis.set_title(panel["title"])
        if panel.get("colorbar"):
            fig.colorbar(shown, ax=axis, fraction=0.08)
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def comparison(
    image: np.ndarray,
    indices: np.ndarray,
    reconstruction: np.ndarray,
    path: str | Path,
    num_embeddings: int,
    title: str = "",
) -> Path:
    """One input, its code-index map and its reconstruction side by side."""
    indices = np.asarray(indices)
    code_map = {
        "image": indices,
        "title": f"code indices {indices.shape[0]}x{indices.shape[1]}",
        "cmap": "nipy_spectral",
        "vmax": num_embeddings - 1,
        "colorbar": True,
    }
    return _panels(
        [
            {"image": _gray(image), "title": "input"},
            code_map,
            {"image": _gray(reconstruction), "title": "reconstruction"},
        ],
        path,
        title,
    )


def pair_with_error(
    image: np.ndarray, reconstruction: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """An input, its reconstruction and the absolute error between them."""
    original, recon = _gray(image), _gray(reconstruction)
    error = {
        "image": np.abs(original - recon),
        "title": "|error|",
        "cmap": "magma",
        "vmax": 0.25,
        "colorbar": True,
    }
    return _panels(
        [{"image": original, "title": "input"}, {"image": recon, "title": "reconstruction"}, error],
        path,
        title,
    )


def ssim_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Train and validation SSIM per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.plot(epochs, [row["train_ssim"] for row in history], "o-", label="train")
    axis.plot(epochs, [row["val_ssim"] for row in history], "s-", label="validation")
    axis.set_xlabel("epoch")
    axis.set_ylabel("SSIM")
    axis.set_title("SSIM per epoch")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def batch_losses(losses: Sequence[float], path: str | Path) -> Path:
    """Training reconstruction loss of every batch, with a running mean."""
    losses = np.asarray(losses, dtype=np.float64)
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.plot(np.arange(1, len(losses) + 1), losses, alpha=0.4, label="batch")
    window = max(1, min(50, len(losses) // 10))
    if len(losses) >= window > 1:
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(np.arange(window, len(losses) + 1), running, label=f"mean of {window}")
    axis.set_yscale("log")
    axis.set_xlabel("batch")
    axis.set_ylabel("reconstruction MSE")
    axis.set_title("Training reconstruction loss per batch")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def ssim_scores(scores: Sequence[float], path: str | Path, title: str = "") -> Path:
    """SSIM of every image of a split, with its mean."""
    scores = np.asarray(scores, dtype=np.float64)
    fig, axis = plt.subplots(figsize=(8, 4))
    axis.scatter(np.arange(len(scores)), scores, s=8)
    axis.axhline(scores.mean(), color="tab:red", label=f"mean {scores.mean():.4f}")
    axis.set_xlabel("test image")
    axis.set_ylabel("SSIM")
    axis.set_title(title or f"SSIM of {len(scores)} test images")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)


def score_histograms(
    scores: dict[str, np.ndarray], path: str | Path, xlabel: str, threshold: float | None = None
) -> Path:
    """Overlaid histograms of scores, one per named set, with an optional threshold line."""
    fig, axis = plt.subplots(figsize=(7, 4))
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values()])
    bins = np.linspace(min(values.min(), threshold or 1.0), max(values.max(), threshold or 0), 41)
    for label, data in scores.items():
        axis.hist(np.asarray(data), bins=bins, alpha=0.5, density=True, label=label)
    if threshold is not None:
        axis.axvline(threshold, color="tab:red", ls="--", label=f"{threshold}")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("density")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(fig, path)
