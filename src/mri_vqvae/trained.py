"""Trained models, each loaded once into a handle: the model in eval mode on its device, with
everything its checkpoint file says of it. Commands load a VQ-VAE (and a prior) here and pass
the handle by keyword to whatever needs it; nothing else unpacks a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mri_vqvae.checkpoint import (
    CheckpointError,
    PriorExtras,
    build_model,
    build_prior_model,
    file_sha256,
    load_checkpoint,
    load_prior_checkpoint,
    read_data_reference,
    read_texture,
)
from mri_vqvae.config import Config, DataConfig
from mri_vqvae.data.dataset import SliceSet
from mri_vqvae.data.nifti import DataError
from mri_vqvae.data.reference import DataReference
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import Prior
from mri_vqvae.model.texture import ResidualTexture


@dataclass(frozen=True)
class TrainedVQVAE:
    """A trained VQ-VAE: the model (eval mode, on ``device``), the settings it was trained
    with, its file and that file's SHA-256 (which ties priors and samples to it), its
    acquisition texture and the reference of its training slices (None where the checkpoint
    keeps none)."""

    model: VQVAE
    config: Config
    path: Path
    sha256: str
    texture: ResidualTexture | None
    data_reference: DataReference | None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TrainedVQVAE:
        """Read the VQ-VAE checkpoint at ``path`` once; a file that is no such checkpoint is
        a :class:`~mri_vqvae.checkpoint.CheckpointError` naming it."""
        path = Path(path)
        checkpoint = load_checkpoint(path, "vqvae")
        model = build_model(checkpoint, path).to(device).eval()
        return cls(
            model=model,
            config=checkpoint.config,
            path=path,
            sha256=file_sha256(path),
            texture=read_texture(checkpoint, path),
            data_reference=read_data_reference(checkpoint, path),
        )

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> tuple[int, int] | None:
        """The (height, width) the model was trained at; None for native-size slices."""
        return self.config.data.image_size

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """The shape of its code maps at its training size."""
        if self.image_size is None:
            return None
        factor = self.model.downsampling_factor
        return (self.image_size[0] // factor, self.image_size[1] // factor)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Code maps ``(N, h, w)`` to images ``(N, 1, H, W)`` in [-1, 1], on the CPU."""
        images = [
            self.model.decode_indices(codes[i : i + batch_size].to(self.device)).clamp(-1, 1).cpu()
            for i in range(0, len(codes), batch_size)
        ]
        return torch.cat(images)

    def data_settings(self, given: DataConfig) -> DataConfig:
        """How a command that uses this VQ-VAE reads slices: at its image size (the model is
        fixed to it), otherwise as ``given`` says (skipping bad files, the cache)."""
        return replace(given, image_size=self.image_size)


@dataclass(frozen=True)
class TrainedPrior:
    """A trained prior over a VQ-VAE's code maps: the model with the weights sampling uses
    (eval mode), its settings, its file and that file's SHA-256, and what its checkpoint
    records beside the weights."""

    model: Prior
    config: Config
    path: Path
    sha256: str
    extras: PriorExtras

    @classmethod
    def load(cls, path: str | Path, *, vqvae: TrainedVQVAE) -> TrainedPrior:
        """Read the prior at ``path`` onto ``vqvae``'s device, after checking that it was
        trained on the codes of exactly that VQ-VAE file."""
        path = Path(path)
        checkpoint = load_prior_checkpoint(path)
        extras = PriorExtras.from_plain(checkpoint.extras, path)
        check_prior_pairs(extras, path, vqvae)
        model = build_prior_model(checkpoint, path).to(vqvae.device).eval()
        return cls(
            model=model,
            config=checkpoint.config,
            path=path,
            sha256=file_sha256(path),
            extras=extras,
        )


def check_prior_pairs(extras: PriorExtras, prior_path: Path, vqvae: TrainedVQVAE) -> None:
    """Refuse a VQ-VAE other than the one the prior was trained on (another codebook gives
    the codes other meanings), and one whose codebook or map shape the prior does not fit."""
    if extras.vqvae_sha256 != vqvae.sha256:
        raise CheckpointError(
            f"{prior_path}: this prior was trained on the codes of the VQ-VAE "
            f"{extras.vqvae_path} (sha256 {extras.vqvae_sha256[:12]}...), but {vqvae.path} "
            f"has sha256 {vqvae.sha256[:12]}...; pass the VQ-VAE checkpoint it was trained with"
        )
    grid = vqvae.grid_shape
    codes = vqvae.model.num_embeddings
    if extras.num_embeddings != codes or (grid is not None and extras.grid_shape != grid):
        raise CheckpointError(
            f"{prior_path}: the prior models {extras.num_embeddings} codes on "
            f"{extras.grid_shape} maps, the VQ-VAE {vqvae.path} has {codes} codes on {grid} maps"
        )


def check_sides(model: VQVAE, size: tuple[int, ...], *, where: Path, label: str) -> None:
    """Refuse slices of ``size`` whose sides ``model``'s downsampling does not divide (a
    native-size model, ``data.image_size`` unset), naming ``where`` and the multiple needed."""
    factor = model.downsampling_factor
    height, width = (int(side) for side in size[-2:])
    if height % factor == 0 and width % factor == 0:
        return
    nearest = "x".join(str(max(factor, round(side / factor) * factor)) for side in (height, width))
    raise DataError(
        where,
        f"the {label} slices are {height}x{width}, but this model needs sides divisible "
        f"by {factor} (it halves them once per entry of model.channel_multipliers); set "
        f"data.image_size to a size that is, e.g. --size {nearest}",
    )


def check_slice_sizes(model: VQVAE, splits: dict[str, SliceSet]) -> None:
    """:func:`check_sides` for each split, naming its first slice."""
    for label, slices in splits.items():
        name = slices.names[0] if slices.names else label
        where = Path(slices.fingerprint.folder) / name if slices.fingerprint else Path(name)
        check_sides(model, slices.image_size, where=where, label=label)
