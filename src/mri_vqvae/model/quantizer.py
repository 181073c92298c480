"""Vector quantiser: nearest-code search, straight-through gradients, codebook or EMA update.

Reference: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning"
(NeurIPS 2017), eq. 3 for the loss and appendix A.1 for the exponential-moving-average update.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.metrics import perplexity as histogram_perplexity


class QuantizerOutput(NamedTuple):
    """What quantising a batch of latents yields."""

    quantized: torch.Tensor  # (B, D, h, w), straight-through: gradients flow to the latents
    indices: torch.Tensor  # (B, h, w) int64 code indices
    loss: torch.Tensor  # codebook loss + commitment_cost * commitment loss
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor  # zero under the EMA update, which needs no loss
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram


class VectorQuantizer(nn.Module):
    """Maps each latent vector to its nearest code (Euclidean) in a learned codebook.

    Args:
        codebook_update: ``"ema"`` moves each code to the moving average of the latents
            assigned to it (with Laplace-smoothed counts, ``ema_epsilon``); ``"loss"`` learns
            the codebook by gradient descent on the codebook loss.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        codebook_update: str = "ema",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
    ) -> None:
        super().__init__()
        if codebook_update not in ("ema", "loss"):
            raise ValueError(f"codebook_update must be 'ema' or 'loss', got {codebook_update!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.use_ema = codebook_update == "ema"
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        initial = torch.empty(num_embeddings, embedding_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings
        )
        self.codebook = nn.Parameter(initial, requires_grad=not self.use_ema)
        # One pseudo-observation at each code's initial place, so a code nobody picks keeps
        # its position instead of being divided by a vanishing count.
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("ema_embedding_sum", initial.clone())

    def nearest_codes(self, flat_latents: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``(N, D)`` latents, computed in float32."""
        with torch.autocast(device_type=flat_latents.device.type, enabled=False):
            flat = flat_latents.float()
            codebook = self.codebook.float()
            # |z - e|^2 = |z|^2 - 2 z.e + |e|^2, without forming the (N, K, D) differences.
            distances = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ codebook.t()
                + codebook.pow(2).sum(1)[None, :]
            )
            return distances.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``(B, h, w)`` indices, as ``(B, D, h, w)`` quantized latents."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def ema_update(self, flat_latents: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step toward the mean of the latents assigned to each code."""
        one_hot = F.one_hot(indices, self.num_embeddings).float()  # (N, K)
        counts = one_hot.sum(0)
        sums = one_hot.t() @ flat_latents.float()  # (K, D)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embedding_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (
            (self.ema_cluster_size + self.ema_epsilon)
            / (total + self.num_embeddings * self.ema_epsilon)
            * total
        )
        self.codebook.data.copy_(self.ema_embedding_sum / smoothed[:, None])

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        batch, dim, height, width = latents.shape
        if dim != self.embedding_dim:
            raise ValueError(f"latents have {dim} channels, the codebook {self.embedding_dim}")
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        indices = self.nearest_codes(flat)
        quantized = F.embedding(indices, self.codebook).to(flat.dtype)
        commitment_loss = F.mse_loss(flat, quantized.detach())
        if self.use_ema:
            codebook_loss = torch.zeros((), device=latents.device)
            if self.training:
                self.ema_update(flat.detach(), indices)
        else:
            codebook_loss = F.mse_loss(quantized, flat.detach())
        loss = codebook_loss + self.commitment_cost * commitment_loss
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        counts = torch.bincount(indices, minlength=self.num_embeddings)
        return QuantizerOutput(
            quantized=quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2),
            indices=indices.reshape(batch, height, width),
            loss=loss,
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
            perplexity=histogram_perplexity(counts),
        )
