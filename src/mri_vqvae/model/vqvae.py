"""The VQ-VAE: encode, quantize, decode, plus index entry points for a prior."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mri_vqvae.config import ModelConfig
from mri_vqvae.model.decoder import Decoder
from mri_vqvae.model.encoder import Encoder
from mri_vqvae.model.quantizer import QuantizerOutput, VectorQuantizer


class VQVAEOutput(NamedTuple):
    """A forward pass: the reconstruction and what quantisation reports."""

    reconstruction: torch.Tensor  # (B, C, H, W)
    quantization_loss: torch.Tensor
    indices: torch.Tensor  # (B, h, w)
    perplexity: torch.Tensor


class VQVAE(nn.Module):
    """Encoder, 1x1 projection to the code space, vector quantiser, decoder."""

    def __init__(
        self,
        in_channels: int = 1,
        hidden_channels: int = 128,
        residual_hidden_channels: int = 32,
        num_residual_layers: int = 2,
        num_downsamplings: int = 3,
        embedding_dim: int = 128,
        num_embeddings: int = 512,
        commitment_cost: float = 0.25,
        codebook_update: str = "ema",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
    ) -> None:
        super().__init__()
        self.downsampling_factor = 2**num_downsamplings
        self.encoder = Encoder(
            in_channels,
            hidden_channels,
            num_downsamplings,
            num_residual_layers,
            residual_hidden_channels,
        )
        self.pre_quantization = nn.Conv2d(hidden_channels, embedding_dim, kernel_size=1)
        self.quantizer = VectorQuantizer(
            num_embeddings, embedding_dim, commitment_cost, codebook_update, ema_decay, ema_epsilon
        )
        self.decoder = Decoder(
            embedding_dim,
            hidden_channels,
            in_channels,
            num_downsamplings,
            num_residual_layers,
            residual_hidden_channels,
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> VQVAE:
        """Build the model a :class:`ModelConfig` describes."""
        return cls(
            in_channels=config.in_channels,
            hidden_channels=config.hidden_channels,
            residual_hidden_channels=config.residual_hidden_channels,
            num_residual_layers=config.num_residual_layers,
            num_downsamplings=config.num_downsamplings,
            embedding_dim=config.embedding_dim,
            num_embeddings=config.num_embeddings,
            commitment_cost=config.commitment_cost,
            codebook_update=config.codebook_update,
            ema_decay=config.ema_decay,
            ema_epsilon=config.ema_epsilon,
        )

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` unless both sides divide by the downsampling factor."""
        factor = self.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(
                f"image sides must be divisible by {factor} (2**num_downsamplings), "
                f"got {height}x{width}"
            )

    def _check_size(self, images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        self.check_image_size(*images.shape[-2:])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images to ``(B, D, h, w)`` latents."""
        self._check_size(images)
        return self.pre_quantization(self.encoder(images))

    def quantize(self, latents: torch.Tensor) -> QuantizerOutput:
        """Snap latents to their nearest codes (updating an EMA codebook in training mode)."""
        return self.quantizer(latents)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` quantized latents to ``(B, C, H, W)`` images."""
        return self.decoder(quantized)

    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images to ``(B, h, w)`` code indices (no codebook update)."""
        latents = self.encode(images)
        return self.quantizer.nearest_codes(
            latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        ).reshape(latents.shape[0], latents.shape[2], latents.shape[3])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` code indices to ``(B, C, H, W)`` images."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quantized = self.quantize(self.encode(images))
        return VQVAEOutput(
            reconstruction=self.decode(quantized.quantized),
            quantization_loss=quantized.loss,
            indices=quantized.indices,
            perplexity=quantized.perplexity,
        )
