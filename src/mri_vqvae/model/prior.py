"""Priors over code-index maps. They know nothing of images.

Every prior maps ``indices (B, h, w)`` to ``logits (B, K, h, w)``:

- :class:`TransformerPrior`: autoregressive in raster order (row by row, left to right); the
  logits at a position depend only on the codes before it. A decoder-only transformer (pre-norm
  GPT blocks on torch's ``scaled_dot_product_attention``) with learned row and column
  embeddings, and a key/value cache so sampling costs one single-token forward per new code.
- :class:`MaskedTransformerPrior`: bidirectional, MaskGIT (Chang et al. 2022). The input holds
  a mask token where a code is unknown and the logits predict every position from all the known
  codes; sampled by iterative parallel decoding (:mod:`mri_vqvae.generate.sampling`). It is
  built from the same blocks, without the causal mask.
- :class:`GatedPixelCNN`: the gated PixelCNN of van den Oord et al. 2016 ("Conditional Image
  Generation with PixelCNN Decoders"), the prior of the VQ-VAE paper; vertical and horizontal
  stacks, so it has no blind spot.

Each can be conditioned (:class:`PriorConditions`) on the slice's position in its volume, on
categorical labels and on the augmentation a training map was encoded with. A position or label
may be unknown (NaN or 0), which is also how a condition is dropped for classifier-free
guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.config import PriorConfig


@dataclass(frozen=True)
class ConditionSizes:
    """What a prior is conditioned on: the slice position or not, the number of values of each
    categorical label (in order), and the length of the augmentation parameter vector."""

    position: bool = False
    labels: tuple[int, ...] = ()
    augmentation: int = 0

    @property
    def any(self) -> bool:
        return self.position or bool(self.labels) or self.augmentation > 0

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "labels": list(self.labels),
            "augmentation": self.augmentation,
        }

    @classmethod
    def from_dict(cls, values: dict) -> ConditionSizes:
        return cls(bool(values["position"]), tuple(values["labels"]), int(values["augmentation"]))


@dataclass
class PriorConditions:
    """A batch's conditions. ``position (B,)`` in [0, 1], NaN where unknown; ``labels (B, L)``
    the value of each label counted from 1, 0 where unknown; ``augmentation (B, A)`` the
    parameters a map was encoded with, all zero for a plain slice (and when sampling)."""

    position: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    augmentation: torch.Tensor | None = None

    def __len__(self) -> int:
        for part in (self.position, self.labels, self.augmentation):
            if part is not None:
                return part.shape[0]
        return 0

    def to(self, device: torch.device) -> PriorConditions:
        return PriorConditions(
            *(None if part is None else part.to(device) for part in self.parts())
        )

    def parts(self) -> tuple[torch.Tensor | None, ...]:
        return (self.position, self.labels, self.augmentation)

    def without_guided(self, drop: torch.Tensor | None = None) -> PriorConditions:
        """These conditions with position and labels unknown where ``drop (B,)`` is true (all
        rows when ``None``): the unconditional half of classifier-free guidance. The
        augmentation is a property of the training map, not a condition to guide, so it stays."""
        position, labels = self.position, self.labels
        if position is not None:
            gone = torch.ones_like(position, dtype=torch.bool) if drop is None else drop
            position = position.masked_fill(gone, math.nan)
        if labels is not None:
            gone = torch.ones_like(labels[:, 0], dtype=torch.bool) if drop is None else drop
            labels = labels.masked_fill(gone[:, None], 0)
        return PriorConditions(position, labels, self.augmentation)

    @staticmethod
    def cat(parts: list[PriorConditions]) -> PriorConditions:
        """The conditions of several batches, one after the other."""
        joined = []
        for pieces in zip(*(p.parts() for p in parts), strict=True):
            joined.append(None if pieces[0] is None else torch.cat(pieces))
        return PriorConditions(*joined)

    def rows(self, index: torch.Tensor | slice) -> PriorConditions:
        """The conditions of the batch's rows ``index``."""
        return PriorConditions(*(None if part is None else part[index] for part in self.parts()))

    def repeat(self, times: int) -> PriorConditions:
        return PriorConditions.cat([self] * times)


def _check_conditions(sizes: ConditionSizes, conditions: PriorConditions | None) -> None:
    given = PriorConditions() if conditions is None else conditions
    wanted = (sizes.position, bool(sizes.labels), sizes.augmentation > 0)
    names = ("a slice position", "labels", "augmentation parameters")
    for want, part, name in zip(wanted, given.parts(), names, strict=True):
        if want and part is None:
            raise ValueError(f"this prior is conditioned on {name}; pass them in its conditions")
        if not want and part is not None:
            raise ValueError(f"this prior was built without {name}; it takes none")
    if given.labels is not None and given.labels.shape[1] != len(sizes.labels):
        raise ValueError(
            f"this prior takes {len(sizes.labels)} label(s), got {given.labels.shape[1]}"
        )
    if given.augmentation is not None and given.augmentation.shape[1] != sizes.augmentation:
        raise ValueError(
            f"this prior takes {sizes.augmentation} augmentation parameters, "
            f"got {given.augmentation.shape[1]}"
        )


class ConditionEmbedding(nn.Module):
    """Conditions to one vector ``(B, width)`` that the prior adds to its inputs.

    An unknown position or label has a learned vector of its own, so "unknown" is a condition
    the prior learns too: the unconditional model of classifier-free guidance. The
    augmentation enters through a linear map without bias, so a plain slice (all zeros) adds
    nothing.
    """

    def __init__(self, sizes: ConditionSizes, width: int) -> None:
        super().__init__()
        self.sizes = sizes
        self.position = None
        if sizes.position:
            self.position = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
            self.unknown_position = nn.Parameter(torch.zeros(width))
        self.labels = nn.ModuleList(nn.Embedding(count + 1, width) for count in sizes.labels)
        self.augmentation = (
            nn.Linear(sizes.augmentation, width, bias=False) if sizes.augmentation else None
        )

    def forward(self, conditions: PriorConditions) -> torch.Tensor:
        vectors = []
        if self.position is not None:
            position = conditions.position.float().reshape(-1, 1)
            unknown = position.isnan()
            known = self.position(position.nan_to_num(0.5))
            vectors.append(torch.where(unknown, self.unknown_position, known))
        for column, embedding in enumerate(self.labels):
            vectors.append(embedding(conditions.labels[:, column]))
        if self.augmentation is not None:
            vectors.append(self.augmentation(conditions.augmentation.float()))
        return torch.stack(vectors).sum(0)


class KVCache:
    """Keys and values of every layer for the positions generated so far.

    Preallocated for the whole sequence, so a step writes in place instead of concatenating.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        *,
        max_length: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention; with ``causal`` each position sees itself and the positions
    before it, without it every position sees every other."""

    def __init__(self, width: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
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
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
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

    def __init__(self, width: int, num_heads: int, dropout: float, causal: bool = True) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, num_heads, causal)
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


class _TransformerTrunk(nn.Module):
    """What both transformer priors share: code, row, column and condition embeddings, the
    blocks, and the head. One extra row follows the codebook in the code embedding (the start
    token of the autoregressive prior, the mask token of the masked one); ``causal`` says
    whether a position sees only those before it.

    Args:
        num_embeddings: codebook size ``K``.
        grid_shape: ``(h, w)`` of the code maps; any shape, square or not.
        width, num_layers, num_heads, dropout: the transformer's size.
        conditions: what it is conditioned on.
    """

    supports_cache = False
    causal: bool

    def __init__(
        self,
        num_embeddings: int,
        grid_shape: tuple[int, int],
        width: int = 192,
        num_layers: int = 6,
        num_heads: int = 3,
        dropout: float = 0.1,
        conditions: ConditionSizes | None = None,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.num_embeddings = num_embeddings
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        conditions = conditions or ConditionSizes()
        self.condition_sizes = conditions
        self.num_heads = num_heads
        self.code_embedding = nn.Embedding(num_embeddings + 1, width)
        self.row_embedding = nn.Parameter(torch.zeros(self.grid_shape[0], width))
        self.column_embedding = nn.Parameter(torch.zeros(self.grid_shape[1], width))
        self.condition = ConditionEmbedding(conditions, width) if conditions.any else None
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, dropout, self.causal) for _ in range(num_layers)
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
    def conditional(self) -> bool:
        return self.condition_sizes.any

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
        conditions: PriorConditions | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, K)`` for positions ``start .. start + T - 1`` given their input
        tokens ``(B, T)``."""
        _check_conditions(self.condition_sizes, conditions)
        length = inputs.shape[1]
        x = self.code_embedding(inputs) + self._position_embeddings(start, length)
        if self.condition is not None:
            x = x + self.condition(conditions)[:, None]
        x = self.input_dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += length
        return self.head(self.final_norm(x))

    def _as_maps(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, h*w, K)`` to ``(B, K, h, w)``."""
        batch = logits.shape[0]
        return logits.transpose(1, 2).reshape(batch, self.num_embeddings, *self.grid_shape)


class TransformerPrior(_TransformerTrunk):
    """Decoder-only transformer over the raster-ordered code map.

    The input at position ``t`` is the code at ``t - 1`` (a start token at ``t = 0``) plus the
    learned embeddings of ``t``'s row and column, so the network knows where it predicts.
    """

    supports_cache = True
    autoregressive = True
    causal = True

    @property
    def start_token(self) -> int:
        """The input before the first position: the embedding's extra row."""
        return self.num_embeddings

    def _shifted_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(codes[:, :1], self.start_token)
        return torch.cat([start, codes[:, :-1]], dim=1)

    def forward(
        self, indices: torch.Tensor, conditions: PriorConditions | None = None
    ) -> torch.Tensor:
        """``indices (B, h, w)`` to next-code ``logits (B, K, h, w)``."""
        codes = indices.reshape(indices.shape[0], -1)  # (B, h*w) raster order
        return self._as_maps(self._logits(self._shifted_inputs(codes), 0, conditions))

    def next_logits(
        self, codes: torch.Tensor, position: int, conditions: PriorConditions | None = None
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at ``position`` from the raster codes ``(B, >= position)`` before
        it, recomputing the whole prefix (no cache)."""
        prefix = self._shifted_inputs(codes[:, : position + 1])
        return self._logits(prefix, 0, conditions)[:, -1]

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty key/value cache for sampling ``batch_size`` maps with :meth:`step`."""
        weight = self.head.weight
        width = weight.shape[1]
        kind = weight.device.type
        # Under autocast the keys and values come out in its dtype; the cache holds them so.
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        return KVCache(
            len(self.blocks),
            batch_size,
            self.num_heads,
            max_length=self.sequence_length,
            head_dim=width // self.num_heads,
            device=weight.device,
            dtype=dtype,
        )

    def step(
        self,
        previous: torch.Tensor | None,
        cache: KVCache,
        conditions: PriorConditions | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at the next position ``cache.length``, given the code just
        sampled there before (``None`` at the first position); one single-token forward."""
        position = cache.length
        if previous is None:
            batch = cache.keys.shape[1]
            previous = torch.full((batch,), self.start_token, device=cache.keys.device)
        return self._logits(previous.reshape(-1, 1), position, conditions, cache)[:, -1]


class MaskedTransformerPrior(_TransformerTrunk):
    """Bidirectional transformer that predicts masked codes from the known ones (MaskGIT).

    The input holds :attr:`mask_token` where a code is unknown; the logits ``(B, K, h, w)``
    are the distribution of the code at every position given all the known codes.
    """

    autoregressive = False
    causal = False

    @property
    def mask_token(self) -> int:
        """The input where a code is unknown: the embedding's extra row."""
        return self.num_embeddings

    def forward(
        self, indices: torch.Tensor, conditions: PriorConditions | None = None
    ) -> torch.Tensor:
        """``indices (B, h, w)``, with :attr:`mask_token` where unknown, to ``logits (B, K,
        h, w)``."""
        codes = indices.reshape(indices.shape[0], -1)
        return self._as_maps(self._logits(codes, 0, conditions))


def cosine_mask_ratio(progress: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the share of codes masked at ``progress`` in [0, 1], from all
    of them at 0 to none at 1."""
    return torch.cos(progress * (math.pi / 2))


def random_masks(
    batch: int,
    length: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(batch, length)`` boolean masks for training the masked prior: each row masks
    ``ceil(ratio * length)`` random positions (at least one), ``ratio`` from the cosine
    schedule at a uniform random point, so every masking level is trained."""
    ratio = cosine_mask_ratio(torch.rand(batch, generator=generator, device=device))
    count = (ratio * length).ceil().clamp(1, length).long()
    noise = torch.rand(batch, length, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each position's rank in a random order
    return rank < count[:, None]


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
        conditions: what it is conditioned on.
    """

    supports_cache = False
    autoregressive = True

    def __init__(
        self,
        num_embeddings: int,
        grid_shape: tuple[int, int],
        width: int = 128,
        num_layers: int = 12,
        dropout: float = 0.0,
        conditions: ConditionSizes | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.condition_sizes = conditions or ConditionSizes()
        self.code_embedding = nn.Embedding(num_embeddings, width)
        self.layers = nn.ModuleList(
            GatedLayer(width, 7 if i == 0 else 3, first=i == 0, dropout=dropout)
            for i in range(num_layers)
        )
        self.condition = None
        if self.condition_sizes.any:
            self.condition = ConditionEmbedding(self.condition_sizes, width)
            # Each layer's gates get their own view of the condition.
            self.condition_to_layers = nn.ModuleList(
                nn.Linear(width, 2 * width) for _ in range(num_layers)
            )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_embeddings, 1)
        )

    @property
    def conditional(self) -> bool:
        return self.condition_sizes.any

    def forward(
        self, indices: torch.Tensor, conditions: PriorConditions | None = None
    ) -> torch.Tensor:
        """``indices (B, h, w)`` to next-code ``logits (B, K, h, w)``."""
        _check_conditions(self.condition_sizes, conditions)
        x = self.code_embedding(indices).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        embedded = None if self.condition is None else self.condition(conditions)
        vertical = horizontal = x
        for i, layer in enumerate(self.layers):
            condition = None
            if embedded is not None:
                condition = self.condition_to_layers[i](embedded)[:, :, None, None]
            vertical, horizontal = layer(vertical, horizontal, condition)
        return self.head(horizontal)

    def next_logits(
        self, codes: torch.Tensor, position: int, conditions: PriorConditions | None = None
    ) -> torch.Tensor:
        """Logits ``(B, K)`` at ``position`` from the raster codes ``(B, h*w)``; the codes at
        and after ``position`` are ignored by causality."""
        batch = codes.shape[0]
        row, column = divmod(position, self.grid_shape[1])
        # Rows below never reach this row (all padding is above and to the left), so the
        # network runs on the rows up to it: half the work on average.
        rows = codes.reshape(batch, *self.grid_shape)[:, : row + 1]
        return self(rows, conditions)[:, :, row, column]


Prior = TransformerPrior | MaskedTransformerPrior | GatedPixelCNN


def build_prior(
    config: PriorConfig,
    num_embeddings: int,
    grid_shape: tuple[int, int],
    conditions: ConditionSizes | None = None,
) -> Prior:
    """The prior a :class:`PriorConfig` describes, for ``num_embeddings`` codes on
    ``grid_shape`` maps, conditioned on ``conditions``."""
    conditions = conditions or ConditionSizes()
    if config.architecture in ("transformer", "masked"):
        kind = TransformerPrior if config.architecture == "transformer" else MaskedTransformerPrior
        return kind(
            num_embeddings,
            grid_shape,
            width=config.width,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
            conditions=conditions,
        )
    return GatedPixelCNN(
        num_embeddings,
        grid_shape,
        width=config.width,
        num_layers=config.num_layers,
        dropout=config.dropout,
        conditions=conditions,
    )
