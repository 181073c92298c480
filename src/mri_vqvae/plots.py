"""Figures from arrays: image grids, index maps, training curves, score plots and the figures
of a run's report."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from mri_vqvae.files import make_output_folder, replaced_atomically
from mri_vqvae.records.evaluation import PowerSpectra


def _gray(array) -> np.ndarray:
    """An image in [-1, 1] (any leading singleton axes) to a 2D array in [0, 1]."""
    image = np.asarray(array, dtype=np.float32).squeeze()
    return np.clip((image + 1) / 2, 0, 1)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` whole or not at all (a temporary file, then rename), as
    its suffix says (PNG), and close it."""
    path = Path(path)
    make_output_folder(path.parent)
    try:
        with replaced_atomically(path) as partial:
            fig.savefig(
                partial, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight"
            )
    finally:
        plt.close(fig)
    return path


def to_png(fig) -> bytes:
    """A figure as PNG bytes (for embedding), closing it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def mosaic(rows: Sequence[np.ndarray], gap: int = 0, background: float = 1.0) -> np.ndarray:
    """Rows of images, each ``(B, 1, H, W)`` in [-1, 1], laid side by side into one 2D array
    in [0, 1], with ``gap`` pixels between images; cells a short row leaves empty and the
    gaps are ``background``."""
    height, width = np.asarray(rows[0]).shape[-2:]
    columns = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * (height + gap) - gap, columns * (width + gap) - gap),
        background,
        dtype=np.float32,
    )
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = _gray(image)
    return canvas


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
    canvas = mosaic(rows, gap)
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
    canvas = mosaic([images[start : start + columns] for start in range(0, count, columns)])
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
    return _save(nll_figure(history), path)


def nll_figure(history: Sequence[dict]):
    """The figure of :func:`nll_curves`."""
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
    return fig


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


def ssim_scores(
    scores: Sequence[float], path: str | Path, title: str = "", split: str = "test"
) -> Path:
    """SSIM of every image of a split, with its mean."""
    scores = np.asarray(scores, dtype=np.float64)
    fig, axis = plt.subplots(figsize=(8, 4))
    axis.scatter(np.arange(len(scores)), scores, s=8)
    axis.axhline(scores.mean(), color="tab:red", label=f"mean {scores.mean():.4f}")
    axis.set_xlabel(f"{split} image")
    axis.set_ylabel("SSIM")
    axis.set_title(title or f"SSIM of {len(scores)} {split} images")
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


_CURVES = (
    ("loss", "loss", True),
    ("ssim", "SSIM", False),
    ("psnr", "PSNR (dB)", False),
    ("codebook_usage", "share of codes used", False),
    ("perplexity", "codebook perplexity", False),
)


def training_curves(history: Sequence[dict]):
    """Per-epoch training and validation loss, SSIM, PSNR, codebook usage and perplexity
    (each where the run logged it), and the learning rate."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for axis, (key, label, log_scale) in zip(axes.flat, _CURVES, strict=False):
        for split, label_text, marker in (("train", "train", "o-"), ("val", "validation", "s-")):
            values = [row.get(f"{split}_{key}") for row in history]
            if all(v is not None and np.isfinite(v) for v in values):
                axis.plot(epochs, values, marker, ms=3, label=label_text)
        if log_scale:
            axis.set_yscale("log")
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    lr_axis = axes.flat[-1]
    lr_axis.plot(epochs, [row["lr"] for row in history], "-", color="tab:gray")
    lr_axis.set_title("learning rate at the epoch's end")
    lr_axis.set_xlabel("epoch")
    lr_axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def ssim_distribution(scores: Sequence[float], split: str):
    """Histogram of a split's per-image SSIM with its mean and minimum."""
    scores = np.asarray(scores, dtype=np.float64)
    fig, axis = plt.subplots(figsize=(7, 3.6))
    axis.hist(scores, bins=min(40, max(5, len(scores) // 4)), color="tab:blue", alpha=0.8)
    axis.axvline(scores.mean(), color="tab:red", label=f"mean {scores.mean():.4f}")
    axis.axvline(scores.min(), color="black", ls="--", label=f"min {scores.min():.4f}")
    axis.set_xlabel("SSIM")
    axis.set_ylabel("images")
    axis.set_title(f"SSIM of the {len(scores)} {split} images")
    axis.grid(alpha=0.3)
    axis.legend()
    return fig


def power_spectra(frequencies: Sequence[float], spectra: dict[str, Sequence[float]], split: str):
    """Radially averaged power spectra on log axes, with the gap of each to the first in dB
    below; half the Nyquist frequency marked (the decoder's reach is judged up to there)."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    fig, (power_axis, gap_axis) = plt.subplots(
        2, 1, figsize=(7, 5.2), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    names = list(spectra)
    reference = np.maximum(np.asarray(spectra[names[0]], dtype=np.float64), 1e-300)
    for name in names:
        power = np.maximum(np.asarray(spectra[name], dtype=np.float64), 1e-300)
        power_axis.loglog(frequencies, power, label=name)
        gap_axis.semilogx(frequencies, 10 * np.log10(power / reference), label=name)
    for axis in (power_axis, gap_axis):
        axis.axvline(0.25, color="grey", ls=":", lw=1)
        axis.grid(alpha=0.3, which="both")
    gap_axis.axhspan(-3, 3, color="tab:green", alpha=0.1, label="within 3 dB")
    power_axis.set_ylabel("power")
    power_axis.set_title(f"Radially averaged power spectrum, {split} split")
    power_axis.legend()
    gap_axis.set_ylabel(f"dB vs {names[0]}")
    gap_axis.set_xlabel("spatial frequency (cycles per pixel; dotted: half Nyquist)")
    fig.tight_layout()
    return fig


def evaluation_spectra(spectrum: PowerSpectra, split: str):
    """:func:`power_spectra` of an evaluation's power spectra: the real slices, the
    reconstructions and, where they were scored, the textured reconstructions."""
    series = {"real slices": spectrum.real, "reconstructions": spectrum.reconstructions}
    if spectrum.textured_reconstructions is not None:
        series["with acquisition texture"] = spectrum.textured_reconstructions
    return power_spectra(spectrum.frequencies, series, split)


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure to ``path`` (folders made as needed) and close it."""
    return _save(fig, path)


def code_frequency(counts: np.ndarray):
    """How often each code was chosen: by code index, and ranked (log scale)."""
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / max(counts.sum(), 1)
    fig, (by_index, ranked) = plt.subplots(1, 2, figsize=(13, 3.6))
    # One filled outline rather than a bar per code: 512 bar patches take seconds to draw.
    by_index.stairs(share, np.arange(len(counts) + 1) - 0.5, fill=True, color="tab:blue")
    unused = np.flatnonzero(counts == 0)
    if len(unused):
        by_index.plot(unused, np.zeros(len(unused)), "|", color="tab:red", ms=10, label="unused")
        by_index.legend()
    by_index.set_xlabel("code")
    by_index.set_ylabel("share of positions")
    by_index.set_title(f"{int((counts > 0).sum())} of {len(counts)} codes used")
    order = np.sort(share[share > 0])[::-1]
    ranked.plot(np.arange(1, len(order) + 1), order, "-", color="tab:blue")
    ranked.axhline(1 / len(counts), color="gray", ls="--", label="uniform")
    ranked.set_yscale("log")
    ranked.set_xlabel("rank")
    ranked.set_ylabel("share of positions")
    ranked.set_title("codes by frequency")
    ranked.legend()
    for axis in (by_index, ranked):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_png(image: np.ndarray, cmap: str = "gray", vmax: float = 1.0, scale: int = 1) -> bytes:
    """A 2D array (values from 0 to ``vmax`` through ``cmap``) or an RGB array as PNG bytes,
    pixel for pixel, each pixel repeated ``scale`` times: far quicker than a figure, for
    pages that show many small images."""
    array = np.asarray(image)
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    plt.imsave(buffer, array, cmap=cmap, vmin=0.0, vmax=vmax, format="png")
    return buffer.getvalue()


def gray_png(image: np.ndarray, scale: int = 1) -> bytes:
    """An image in [-1, 1] as a grey PNG (see :func:`image_png`)."""
    return image_png(_gray(image), scale=scale)


def error_png(image: np.ndarray, reconstruction: np.ndarray, vmax: float, scale: int = 1) -> bytes:
    """The per-pixel absolute error on [0, 1] between two images in [-1, 1], through the
    magma colour map from 0 to ``vmax``."""
    return image_png(np.abs(_gray(image) - _gray(reconstruction)), "magma", vmax, scale)


def colour_scale_png(cmap: str, width: int = 160, height: int = 12) -> bytes:
    """A horizontal strip of a colour map from its low end (left) to its high end."""
    return image_png(np.tile(np.linspace(0, 1, width), (height, 1)), cmap)


_OUTLINE = np.array([1.0, 0.55, 0.0])  # orange


def code_patch_strip(patches: np.ndarray, cell: tuple[int, int], gap: int = 2) -> np.ndarray:
    """Image patches where one code occurs, ``(P, h, w)`` in [-1, 1] with NaN for missing
    ones, side by side as one RGB array in [0, 1]. The code's own ``cell`` is centred in each
    patch with context around it, and outlined in orange just outside, so that none of its
    pixels is covered."""
    count, height, width = patches.shape
    cell_h, cell_w = cell
    # The outline's rows and columns, one pixel outside the cell on each side.
    top, left = (height - cell_h) // 2 - 1, (width - cell_w) // 2 - 1
    bottom, right = top + cell_h + 1, left + cell_w + 1
    if top < 0 or left < 0:
        raise ValueError(
            f"patches of {height}x{width} leave no room around a {cell_h}x{cell_w} cell"
        )
    strip = np.ones((height, count * (width + gap) - gap, 3))  # white between patches
    for index, patch in enumerate(np.asarray(patches, dtype=np.float32)):
        if np.isnan(patch).all():
            continue
        rgb = np.repeat(_gray(np.nan_to_num(patch, nan=-1.0))[..., None], 3, axis=2)
        rgb[top, left : right + 1] = rgb[bottom, left : right + 1] = _OUTLINE
        rgb[top : bottom + 1, left] = rgb[top : bottom + 1, right] = _OUTLINE
        start = index * (width + gap)
        strip[:, start : start + width] = rgb
    return strip
