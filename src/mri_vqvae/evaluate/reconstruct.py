"""One NIfTI slice through a trained VQ-VAE and back to a file beside it."""

from __future__ import annotations

from pathlib import Path

import torch

from mri_vqvae.data.dataset import postprocess, preprocess
from mri_vqvae.data.nifti import read_slice, write_slice
from mri_vqvae.trained import TrainedVQVAE, check_sides


@torch.no_grad()
def reconstruct_file(vqvae: TrainedVQVAE, in_path: str | Path, out_path: str | Path) -> Path:
    """Reconstruct one NIfTI slice; the output has the input's shape, intensity range,
    affine and header."""
    source = read_slice(in_path)
    size = vqvae.image_size or source.pixels.shape
    check_sides(vqvae.model, size, where=Path(in_path), label="given")
    image = preprocess(source.pixels, size)[None].to(vqvae.device)
    reconstruction = vqvae.model(image).reconstruction.clamp(-1, 1)[0]
    low, high = float(source.pixels.min()), float(source.pixels.max())
    pixels = postprocess(reconstruction, source.pixels.shape, low, high)
    original_shape = tuple(int(s) for s in source.header.get_data_shape())
    write_slice(pixels.reshape(original_shape), out_path, source.affine, source.header)
    return Path(out_path)
