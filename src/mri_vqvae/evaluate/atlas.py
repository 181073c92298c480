"""The arrays a run's report draws beside an evaluation (numpy archives, read without
pickle): example reconstructions, and the codebook atlas of where each code occurs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.evaluate.split import SplitEvaluation
from mri_vqvae.model import VQVAE
from mri_vqvae.records.arrays import CodebookAtlas, ExampleReconstructions


@torch.no_grad()
def write_examples(
    model: VQVAE,
    slices: SliceSet,
    result: SplitEvaluation,
    path: Path,
    *,
    seed: int = 0,
    per_kind: int = 4,
) -> ExampleReconstructions:
    """Save the ``per_kind`` best, worst and randomly chosen reconstructions (by SSIM) with
    their originals, on [-1, 1] as float16, to ``path``; return what was saved."""
    order = np.argsort(result.ssim, kind="stable")
    count = min(per_kind, len(order))
    best, worst = order[::-1][:count], order[:count]
    rest = np.setdiff1d(order, np.concatenate([best, worst]))
    pool = rest if len(rest) >= count else order
    random_pick = np.random.default_rng(seed).choice(pool, size=count, replace=False)
    chosen = np.concatenate([best, worst, np.sort(random_pick)]).astype(np.int64)
    model.eval()
    device = next(model.parameters()).device
    images = slices.batch(torch.from_numpy(chosen)).to(device)
    reconstructions = model(images).reconstruction.clamp(-1, 1)
    examples = ExampleReconstructions(
        kind=np.array([kind for kind in ExampleReconstructions.KINDS for _ in range(count)]),
        names=np.array([result.names[i] for i in chosen]),
        images=images[:, 0].float().cpu().numpy().astype(np.float16),
        reconstructions=reconstructions[:, 0].float().cpu().numpy().astype(np.float16),
        ssim=result.ssim[chosen],
        psnr=result.psnr[chosen],
    )
    examples.write(path)
    return examples


def write_codebook_atlas(
    slices: SliceSet,
    result: SplitEvaluation,
    path: Path,
    *,
    seed: int = 0,
    top_codes: int = 16,
    patches_per_code: int = 6,
) -> CodebookAtlas:
    """Save each code's count over the split and, for the ``top_codes`` most used codes, up
    to ``patches_per_code`` image patches where the code occurs, to ``path``.

    A patch is the code's cell of the image (the downsampling factor on each side) with half
    a cell of context around it, padded with the background value at the image's edge."""
    counts = result.code_counts.numpy()
    maps = result.code_maps.numpy()
    (height, width), (rows, columns) = slices.image_size, maps.shape[1:]
    cell_h, cell_w = height // rows, width // columns
    margin_h, margin_w = cell_h // 2, cell_w // 2
    ranked = np.argsort(-counts, kind="stable")
    used = ranked[counts[ranked] > 0][:top_codes]
    rng = np.random.default_rng(seed)
    patches = np.full(
        (len(used), patches_per_code, cell_h + 2 * margin_h, cell_w + 2 * margin_w),
        np.nan,
        dtype=np.float16,
    )
    sources = np.full((len(used), patches_per_code, 3), -1, dtype=np.int64)
    padded: dict[int, np.ndarray] = {}
    for row, code in enumerate(used):
        where = np.argwhere(maps == code)  # (n, 3): image, grid row, grid column
        picks = where[rng.choice(len(where), min(patches_per_code, len(where)), replace=False)]
        for column, (image, grid_row, grid_column) in enumerate(picks):
            if image not in padded:
                pixels = slices.batch([int(image)])[0, 0].float().numpy()
                padded[image] = np.pad(pixels, ((margin_h,), (margin_w,)), constant_values=-1)
            top, left = grid_row * cell_h, grid_column * cell_w
            patches[row, column] = padded[image][
                top : top + cell_h + 2 * margin_h, left : left + cell_w + 2 * margin_w
            ]
            sources[row, column] = (image, grid_row, grid_column)
    atlas = CodebookAtlas(
        counts=counts.astype(np.int64),
        top_codes=used.astype(np.int64),
        patches=patches,
        patch_sources=sources,
        cell_size=np.array([cell_h, cell_w]),
        grid_shape=np.array([rows, columns]),
    )
    atlas.write(path)
    return atlas
