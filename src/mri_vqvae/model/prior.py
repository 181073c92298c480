"""Autoregressive priors over code-index maps, in raster order. They know nothing of images.

Both priors map ``indices (B, h, w)`` to next-code ``logits (B, K, h, w)``: the logits at a
position depend only on the codes before it in raster order (row by row, left to right).

- :class:`TransformerPrior`: a decoder-only transformer (pre-norm GPT blocks on torch's
  ``scaled_dot_product_attention``) with learned row and column embeddings, and a key/value
  cache so sampling costs one single-token forward per new code.
- :class:`GatedPixelCNN`: the gated PixelCNN of van den Oord et al. 2016 ("Conditional Image
  Generation with PixelCNN Decoders"), the prior of the VQ-VAE paper; vertical and horizontal
  stacks, so it has no blind spot.

Either can be conditioned on a scalar in [0, 1], the slice's position within its volume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.config import PriorConfig


class PositionCondition(nn.Module):
    """A scalar in [0, 1] (the slice position) to a vector added to every position's input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, slice_position: torch.Tensor) -> torch.Tensor:
        return self.net(slice_position.float().reshape(-1, 1))  # (B, width)


def _check_condition(conditional: bool, slice_position: torch.Tensor | None) -> None:
    if conditional and slice_position is None:
        raise ValueError("this prior is conditioned on slice position; pass slice_position")
    if not conditional and slice_position is not None:
        raise ValueError("this prior is unconditional; it takes no slice_position")


class KVCache:
    """Keys and values of every layer for the positions generated so far.

    Preallocated for the whole sequence, so a step writes in place instead of concatenating.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3C) -> three (B, heads, T, C/heads)
        q, k, v = (
            part.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)
            for part in self.qkv(x).split(width, dim=2)
        )
        if cache is None:
            # No dropout on the attention weights: on CPU it forces the unfused kernel, which
            # made a training step 5x slower; dropout stays on the residual paths.
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.length, cache.length + length
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            keys, values = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]
            # New position i (at start + i) sees every cached position and new ones up to it.
            mask = None
            if length > 1:
                mask = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(start)
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then a 4x GELU MLP, each on a residual path."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, num_heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.residual_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.residual_dropout(self.attention(self.attention_norm(x), cache, layer))
        return x + self.mlp(self.mlp_norm(x))


class TransformerPrior(nn.Module):
    """Decoder-only transformer over the raster-ordered code map.

    The input at position ``t`` is the code at ``t - 1`` (a start token at ``t = 0``) plus the
    learned embeddings of ``t``'s row and column, so the network knows where it predicts.

    Args:
        num_embeddings: codebook size ``K``.
        grid_shape: ``(h, w)`` of the code maps; any shape, square or not.
        width, num_layers, num_heads, dropout: the transformer's size.
        conditional: take a slice position in [0, 1] as a condition.
    """

    supports_cache = True

    def __init__(
        self,
        num_embeddings: int,
        grid_shape: tuple[int, int],
        width: int = 192,
        num_layers: int = 6,
        num_heads: int = 3,
        dropout: float = 0.1,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.num_embeddings = num_embeddings
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.conditional = conditional
        self.num_heads = num_heads
        self.start_token = num_embeddings  # one extra embedding row
        self.code_embedding = nn.Embedding(num_embeddings + 1, width)
        self.row_embedding = nn.Parameter(torch.zeros(self.grid_shape[0], width))
        self.column_embedding = nn.Parameter(torch.zeros(self.grid_shape[1], width))
        self.condition = PositionCondition(width) if conditional else None
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_embeddings, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.row_embedding, std=0.02)
        nn.init.normal_(self.column_embedding, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation: small normal weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def sequence_length(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    def _position_embeddings(self, start: int, length: int) -> torch.Tensor:
        """``(length, C)`` embeddings of raster positions ``start .. start + length - 1``."""
        positions = torch.arange(start, start + length, device=self.row_embedding.device)
        width = self.grid_shape[1]
        return self.row_embedding[positions // width] + self.column_embedding[positions % width]

    def _logits(
        self,
        inputs: torch.Tensor,
        start: int,
        slice_position: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, K)`` for positions ``start .. start + T - 1`` given their inputs
        ``(B, T)`` (each the code before, or the start token)."""
        _check_condition(self.conditional, slice_position)
        length = inputs.shape[1]
        x = self.code_embedding(inputs) + self._position_embeddings(start, length)
        if self.condition is not None:
            x = x + self.condition(slice_position)[:, None]
        x = self.input_dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += length
        return self.head(self.final_norm(x))

    def _shifted_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(codes[:, :1], self.start_token)
        return torch.cat([start, codes[:, :-1]], dim=1)

    def forward(
        self, indices: torch.Tensor, slice_position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``indices (B, h, w)`` to next-code ``logits (B, K, h, w)``."""
        batch = indices.shape[0]
        codes = indices.reshape(batch, -1)  # (B, h*w) raster order
        logits = self._logits(self._shifted_inputs(codes), 0, slice_position)
        return logits.transpose(1, 2).reshape(batch, self.num_embeddings, *self.grid_shape)

    def next_logits(
        self, codes: torch.Tensor, position: int, slice_position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at ``position`` from the raster codes ``(B, >= position)`` before
        it, recomputing the whole prefix (no cache)."""
        prefix = self._shifted_inputs(codes[:, : position + 1])
        return self._logits(prefix, 0, slice_position)[:, -1]

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty key/value cache for sampling ``batch_size`` maps with :meth:`step`."""
        weight = self.head.weight
        width = weight.shape[1]
        return KVCache(
            len(self.blocks),
            batch_size,
            self.num_heads,
            self.sequence_length,
            width // self.num_heads,
            weight.device,
            weight.dtype,
        )

    def step(
        self,
        previous: torch.Tensor | None,
        cache: KVCache,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at the next position ``cache.length``, given the code just
        sampled there before (``None`` at the first position); one single-token forward."""
        position = cache.length
        if previous is None:
            batch = cache.keys.shape[1]
            previous = torch.full((batch,), self.start_token, device=cache.keys.device)
        return self._logits(previous.reshape(-1, 1), position, slice_position, cache)[:, -1]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer: a vertical stack (rows above) feeding a horizontal stack (the
    row so far); ``first`` excludes the current position itself (mask type A)."""

    def __init__(self, channels: int, kernel_size: int, first: bool, dropout: float) -> None:
        super().__init__()
        self.first = first
        self.half = kernel_size // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=1)
        return torch.tanh(value) * torch.sigmoid(gate)

    def forward(
        self, vertical: torch.Tensor, horizontal: torch.Tensor, condition: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.half
        # Output row i sees input rows i - half .. i.
        v = self.vertical(F.pad(vertical, (half, half, half, 0)))
        # Shifted down one row, so the horizontal stack at row i sees rows above i only.
        v_shifted = F.pad(v, (0, 0, 1, 0))[:, :, :-1]
        h_input = F.pad(horizontal, (1, 0))[..., :-1] if self.first else horizontal
        h = self.horizontal(F.pad(h_input, (half, 0))) + self.vertical_to_horizontal(v_shifted)
        if condition is not None:
            v, h = v + condition, h + condition
        vertical_out = self._gate(v)
        horizontal_out = self.horizontal_out(self.dropout(self._gate(h)))
        if not self.first:
            horizontal_out = horizontal_out + horizontal
        return vertical_out, horizontal_out


class GatedPixelCNN(nn.Module):
    """The gated PixelCNN prior (van den Oord et al. 2016) over code maps.

    The first layer uses a 7-wide kernel, the rest 3-wide, as common gated PixelCNN priors do.

    Args:
        num_embeddings: codebook size ``K``.
        grid_shape: ``(h, w)`` of the code maps.
        width: channels of both stacks; num_layers: gated layers.
        conditional: take a slice position in [0, 1] as a condition.
    """

    supports_cache = False

    def __init__(
        self,
        num_embeddings: int,
        grid_shape: tuple[int, int],
        width: int = 128,
        num_layers: int = 12,
        dropout: float = 0.0,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.conditional = conditional
        self.code_embedding = nn.Embedding(num_embeddings, width)
        self.layers = nn.ModuleList(
            GatedLayer(width, 7 if i == 0 else 3, first=i == 0, dropout=dropout)
            for i in range(num_layers)
        )
        self.conditions = (
            nn.ModuleList(PositionCondition(2 * width) for _ in range(num_layers))
            if conditional
            else None
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_embeddings, 1)
        )

    def forward(
        self, indices: torch.Tensor, slice_position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``indices (B, h, w)`` to next-code ``logits (B, K, h, w)``."""
        _check_condition(self.conditional, slice_position)
        x = self.code_embedding(indices).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        vertical = horizontal = x
        for i, layer in enumerate(self.layers):
            condition = None
            if self.conditions is not None:
                condition = self.conditions[i](slice_position)[:, :, None, None]
            vertical, horizontal = layer(vertical, horizontal, condition)
        return self.head(horizontal)

    def next_logits(
        self, codes: torch.Tensor, position: int, slice_position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at ``position`` from the raster codes ``(B, h*w)``; the codes at
        and after ``position`` are ignored by causality."""
        batch = codes.shape[0]
        row, column = divmod(position, self.grid_shape[1])
        # Rows below never reach this row (all padding is above and to the left), so the
        # network runs on the rows up to it: half the work on average.
        rows = codes.reshape(batch, *self.grid_shape)[:, : row + 1]
        return self(rows, slice_position)[:, :, row, column]


Prior = TransformerPrior | GatedPixelCNN


def build_prior(config: PriorConfig, num_embeddings: int, grid_shape: tuple[int, int]) -> Prior:
    """The prior a :class:`PriorConfig` describes, for ``num_embeddings`` codes on
    ``grid_shape`` maps."""
    if config.architecture == "transformer":
        return TransformerPrior(
            num_embeddings,
            grid_shape,
            width=config.width,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
            conditional=config.condition_on_slice_position,
        )
    return GatedPixelCNN(
        num_embeddings,
        grid_shape,
        width=config.width,
        num_layers=config.num_layers,
        dropout=config.dropout,
        conditional=config.condition_on_slice_position,
    )
