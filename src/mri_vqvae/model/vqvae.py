"""The VQ-VAE: encode, quantize, decode, plus index entry points for a prior."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mri_vqvae.config import ModelConfig
from mri_vqvae.model.decoder import Decoder, SeedDecoder
from mri_vqvae.model.encoder import Encoder, SeedEncoder
from mri_vqvae.model.layers import level_widths
from mri_vqvae.model.quantizer import QuantizerOutput, VectorQuantizer


class VQVAEOutput(NamedTuple):
    """A forward pass: the reconstruction and what quantisation reports."""

    reconstruction: torch.Tensor  # (B, C, H, W)
    quantization_loss: torch.Tensor
    indices: torch.Tensor  # (B, h, w)
    perplexity: torch.Tensor


class VQVAE(nn.Module):
    """Encoder, 1x1 projection to the code space, vector quantiser, decoder.

    Args:
        architecture: ``"resnet"`` (GroupNorm/SiLU residual blocks at every level) or
            ``"seed"`` (the seed's strided convolutions with a ReLU residual stack).
        channels, channel_multipliers: level ``i`` has ``channels * channel_multipliers[i]``
            channels; there is one stride-2 level per multiplier.
        num_residual_layers: residual blocks per level (resnet) or at the bottleneck (seed).
        residual_hidden_channels: the seed's narrow residual width (seed only).
        output_activation: ``"tanh"`` bounds reconstructions to [-1, 1]; ``"none"`` does not.
        The rest configure the :class:`VectorQuantizer`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        architecture: str,
        channels: int,
        channel_multipliers: tuple[int, ...],
        num_residual_layers: int,
        residual_hidden_channels: int,
        embedding_dim: int,
        num_embeddings: int,
        commitment_cost: float,
        codebook_update: str,
        ema_decay: float,
        ema_epsilon: float,
        codebook_init: str,
        dead_code_steps: int,
        cosine_codes: bool,
        output_activation: str,
    ) -> None:
        super().__init__()
        if architecture not in ("resnet", "seed"):
            raise ValueError(f"architecture must be 'resnet' or 'seed', got {architecture!r}")
        if output_activation not in ("tanh", "none"):
            raise ValueError(
                f"output_activation must be 'tanh' or 'none', got {output_activation!r}"
            )
        if not channel_multipliers:
            raise ValueError("channel_multipliers needs one entry per downsampling")
        self.architecture = architecture
        self.downsampling_factor = 2 ** len(channel_multipliers)
        self.bounded_output = output_activation == "tanh"
        widths = level_widths(channels, tuple(channel_multipliers))
        if architecture == "resnet":
            self.encoder: nn.Module = Encoder(in_channels, widths, num_residual_layers)
            self.decoder: nn.Module = Decoder(
                embedding_dim, widths, in_channels, num_residual_layers
            )
        else:
            self.encoder = SeedEncoder(
                in_channels, widths, num_residual_layers, residual_hidden_channels
            )
            self.decoder = SeedDecoder(
                embedding_dim, widths, in_channels, num_residual_layers, residual_hidden_channels
            )
        self.pre_quantization = nn.Conv2d(widths[-1], embedding_dim, kernel_size=1)
        self.quantizer = VectorQuantizer(
            num_embeddings,
            embedding_dim,
            commitment_cost=commitment_cost,
            codebook_update=codebook_update,
            ema_decay=ema_decay,
            ema_epsilon=ema_epsilon,
            codebook_init=codebook_init,
            dead_code_steps=dead_code_steps,
            cosine_codes=cosine_codes,
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> VQVAE:
        """Build the model a :class:`ModelConfig` describes."""
        return cls(
            in_channels=config.in_channels,
            architecture=config.architecture,
            channels=config.channels,
            channel_multipliers=config.channel_multipliers,
            num_residual_layers=config.num_residual_layers,
            residual_hidden_channels=config.residual_hidden_channels,
            embedding_dim=config.embedding_dim,
            num_embeddings=config.num_embeddings,
            commitment_cost=config.commitment_cost,
            codebook_update=config.codebook_update,
            ema_decay=config.ema_decay,
            ema_epsilon=config.ema_epsilon,
            codebook_init=config.codebook_init,
            dead_code_steps=config.dead_code_steps,
            cosine_codes=config.cosine_codes,
            output_activation=config.output_activation,
        )

    @property
    def last_decoder_weight(self) -> torch.Tensor:
        """The weight of the decoder's last layer (the one that makes the image channels),
        where an adaptive loss weight compares gradients (Esser et al. 2021)."""
        convolutions = (nn.Conv2d, nn.ConvTranspose2d)
        layers = [m for m in self.decoder.modules() if isinstance(m, convolutions)]
        return layers[-1].weight

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` unless both sides divide by the downsampling factor."""
        factor = self.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(
                f"image sides must be divisible by {factor} (2 ** len(channel_multipliers)), "
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
        images = self.decoder(quantized)
        return torch.tanh(images) if self.bounded_output else images

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
