"""Vector quantiser: nearest-code search, straight-through gradients, and a healthy codebook.

References: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning"
(NeurIPS 2017), eq. 3 for the loss and appendix A.1 for the exponential-moving-average update;
Zeghidour et al., "SoundStream" (2021), for k-means initialisation and dead-code restarts;
Yu et al., "Vector-quantized Image Modeling with Improved VQGAN" (2022), for l2-normalised codes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mri_vqvae.config import ModelConfig
from mri_vqvae.metrics import perplexity as histogram_perplexity

# The defaults are the configuration's, so a quantiser built by hand matches one built from it.
_DEFAULTS = ModelConfig()


class QuantizerOutput(NamedTuple):
    """What quantising a batch of latents yields."""

    quantized: torch.Tensor  # (B, D, h, w), straight-through: gradients flow to the latents
    indices: torch.Tensor  # (B, h, w) int64 code indices
    loss: torch.Tensor  # codebook loss + commitment_cost * commitment loss
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor  # zero under the EMA update, which needs no loss
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes of a distributed run (unchanged in a single one)."""
    if _world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _finite_everywhere(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is finite in this process and, in a distributed run, in every
    other (so all processes take the same branch and their collectives stay matched)."""
    bad = (~torch.isfinite(tensor)).any().to(torch.float32).reshape(1)
    return not bool(_sum_over_processes(bad)[0] > 0)


def _rows_of_all_processes(rows: torch.Tensor) -> torch.Tensor:
    """The ``(N_r, D)`` rows of every process of a distributed run, in rank order.

    Training shards each batch in contiguous blocks by rank, so this is the whole batch's
    latents in the order one process would hold them: k-means and dead-code restarts then
    see the same data, draw the same random numbers and agree on every rank.
    """
    world = _world_size()
    if world == 1:
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=rows.device))
    largest = int(max(sizes))
    padded = rows.new_zeros(largest, rows.shape[1])
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([block[: int(size)] for block, size in zip(gathered, sizes, strict=True)])


def squared_distances(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` squared Euclidean distances between rows of ``(N, D)`` and ``(K, D)``."""
    # |z - e|^2 = |z|^2 - 2 z.e + |e|^2, without forming the (N, K, D) differences.
    return vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codes.t() + codes.pow(2).sum(1)


def kmeans(
    vectors: torch.Tensor, num_clusters: int, iterations: int = 10, spherical: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``(N, D)`` vectors: ``(K, D)`` centres and ``(K,)`` cluster sizes.

    Centres start at distinct random vectors (with replacement when there are fewer vectors
    than clusters); a cluster left empty is re-seeded at a random vector. ``spherical`` keeps
    centres on the unit sphere, for cosine codes. Uses torch's global random generator.
    """
    count = vectors.shape[0]
    if count >= num_clusters:
        picks = torch.randperm(count, device=vectors.device)[:num_clusters]
    else:
        picks = torch.randint(count, (num_clusters,), device=vectors.device)
    centres = vectors[picks].clone()
    sizes = torch.zeros(num_clusters, device=vectors.device)
    for _ in range(iterations):
        assignment = squared_distances(vectors, centres).argmin(1)
        sizes = torch.bincount(assignment, minlength=num_clusters).float()
        sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
        empty = sizes == 0
        centres = torch.where(empty[:, None], centres, sums / sizes.clamp_min(1)[:, None])
        if empty.any():
            centres[empty] = vectors[
                torch.randint(count, (int(empty.sum()),), device=vectors.device)
            ]
        if spherical:
            centres = F.normalize(centres, dim=1)
    return centres, sizes


class VectorQuantizer(nn.Module):
    """Maps each latent vector to its nearest code in a learned codebook.

    Args:
        codebook_update: ``"ema"`` moves each code to the moving average of the latents
            assigned to it (with Laplace-smoothed counts, ``ema_epsilon``); ``"loss"`` learns
            the codebook by gradient descent on the codebook loss.
        codebook_init: ``"kmeans"`` places the codes at k-means centres of the first training
            batch's latents; ``"uniform"`` draws them from U(-1/K, 1/K), as the seed.
        dead_code_steps: a code no latent picked for this many training steps is moved to a
            random latent of the current batch; 0 never restarts.
        cosine_codes: compare l2-normalised latents and codes; the decoder then sees unit
            vectors.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = _DEFAULTS.commitment_cost,
        codebook_update: str = _DEFAULTS.codebook_update,
        ema_decay: float = _DEFAULTS.ema_decay,
        ema_epsilon: float = _DEFAULTS.ema_epsilon,
        codebook_init: str = _DEFAULTS.codebook_init,
        dead_code_steps: int = _DEFAULTS.dead_code_steps,
        cosine_codes: bool = _DEFAULTS.cosine_codes,
    ) -> None:
        super().__init__()
        if codebook_update not in ("ema", "loss"):
            raise ValueError(f"codebook_update must be 'ema' or 'loss', got {codebook_update!r}")
        if codebook_init not in ("kmeans", "uniform"):
            raise ValueError(f"codebook_init must be 'kmeans' or 'uniform', got {codebook_init!r}")
        if dead_code_steps < 0:
            raise ValueError(f"dead_code_steps must be >= 0, got {dead_code_steps}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.use_ema = codebook_update == "ema"
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.dead_code_steps = dead_code_steps
        self.cosine_codes = cosine_codes
        initial = torch.empty(num_embeddings, embedding_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings
        )
        self.codebook = nn.Parameter(initial, requires_grad=not self.use_ema)
        # One pseudo-observation at each code's initial place, so a code nobody picks keeps
        # its position instead of being divided by a vanishing count.
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("ema_embedding_sum", initial.clone())
        self.register_buffer("initialized", torch.tensor(codebook_init == "uniform"))
        # Python's copy of a True ``initialized``: reading the buffer every step would make
        # a GPU wait for the host each step.
        self._known_initialized = False
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded buffer decides again

    def _to_code_space(self, flat_latents: torch.Tensor) -> torch.Tensor:
        return F.normalize(flat_latents, dim=1) if self.cosine_codes else flat_latents

    def codes(self) -> torch.Tensor:
        """The ``(K, D)`` vectors the decoder receives (unit length for cosine codes)."""
        return F.normalize(self.codebook, dim=1) if self.cosine_codes else self.codebook

    def nearest_codes(self, flat_latents: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``(N, D)`` latents, computed in float32."""
        with torch.autocast(device_type=flat_latents.device.type, enabled=False):
            flat = self._to_code_space(flat_latents.float())
            return squared_distances(flat, self.codes().float()).argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``(B, h, w)`` indices, as ``(B, D, h, w)`` quantized latents."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2).contiguous()

    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor, sizes: torch.Tensor) -> None:
        """Place the codes selected by ``which`` (mask or indices) with EMA counts ``sizes``."""
        self.codebook.data[which] = vectors
        self.ema_cluster_size[which] = sizes
        self.ema_embedding_sum[which] = vectors * sizes[:, None]

    @torch.no_grad()
    def kmeans_init(self, flat_latents: torch.Tensor) -> None:
        """Place every code at a k-means centre of ``(N, D)`` latents (of every process, in a
        distributed run)."""
        vectors = self._to_code_space(_rows_of_all_processes(flat_latents.float()))
        centres, sizes = kmeans(vectors, self.num_embeddings, spherical=self.cosine_codes)
        everything = torch.ones(self.num_embeddings, dtype=torch.bool, device=vectors.device)
        self._set_codes(everything, centres, sizes.clamp_min(1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, flat_latents: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step toward the mean of the latents assigned to each code, over the latents
        of every process in a distributed run, so each keeps the same codebook."""
        vectors = self._to_code_space(flat_latents.float())
        counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        sums = torch.zeros_like(self.ema_embedding_sum).index_add_(0, indices, vectors)  # (K, D)
        if _world_size() > 1:
            both = _sum_over_processes(torch.cat([counts[:, None], sums], dim=1))
            counts, sums = both[:, 0], both[:, 1:]
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

    @torch.no_grad()
    def restart_dead_codes(self, flat_latents: torch.Tensor, counts: torch.Tensor) -> int:
        """Count a step of use and move codes unused for ``dead_code_steps`` steps onto random
        latents of this batch. ``counts`` must be the whole batch's (summed over processes);
        the latents are gathered from every process. Returns how many codes were restarted."""
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps == 0:
            return 0
        dead = self.steps_unused >= self.dead_code_steps
        number = int(dead.sum())
        if number:
            vectors = self._to_code_space(_rows_of_all_processes(flat_latents.float()))
            picks = torch.randint(vectors.shape[0], (number,), device=vectors.device)
            self._set_codes(dead, vectors[picks], torch.ones(number, device=vectors.device))
            self.steps_unused.masked_fill_(dead, 0)
            self.restart_count.add_(number)
        return number

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        batch, dim, height, width = latents.shape
        if dim != self.embedding_dim:
            raise ValueError(f"latents have {dim} channels, the codebook {self.embedding_dim}")
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        # A batch with non-finite latents (a corrupt image, a diverging step) must not reach
        # the codebook: its step is skipped by training, and the EMA statistics, restarts and
        # k-means initialisation here leave the codebook as it was.
        learning = self.training and _finite_everywhere(flat)
        if learning and not self._known_initialized:
            if not bool(self.initialized):
                self.kmeans_init(flat.detach())
            self._known_initialized = True
        indices = self.nearest_codes(flat)
        flat = self._to_code_space(flat)
        quantized = F.embedding(indices, self.codes()).to(flat.dtype)
        commitment_loss = F.mse_loss(flat, quantized.detach())
        if self.use_ema:
            codebook_loss = torch.zeros((), device=latents.device)
            if learning:
                self.ema_update(flat.detach(), indices)
        else:
            codebook_loss = F.mse_loss(quantized, flat.detach())
        loss = codebook_loss + self.commitment_cost * commitment_loss
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        counts = torch.bincount(indices, minlength=self.num_embeddings)
        if learning:
            self.restart_dead_codes(flat.detach(), _sum_over_processes(counts))
        return QuantizerOutput(
            quantized=quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2),
            indices=indices.reshape(batch, height, width),
            loss=loss,
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
            perplexity=histogram_perplexity(counts),
        )
