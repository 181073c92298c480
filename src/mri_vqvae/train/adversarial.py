"""The VQ-VAE's optional adversarial term: a PatchGAN discriminator trained beside it inside the
one training loop, and the decoder's adaptively weighted loss against it (VQGAN, Esser et al.
2021). The discriminator's weights, its optimiser and its running figures travel in the
VQ-VAE's checkpoints, so a resumed run continues exactly."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from mri_vqvae.config import TrainConfig
from mri_vqvae.distributed import SINGLE_PROCESS, ProcessGroup, data_parallel
from mri_vqvae.errors import ConfigError
from mri_vqvae.losses import (
    adaptive_adversarial_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from mri_vqvae.model.discriminator import PatchDiscriminator
from mri_vqvae.runtime import autocast

logger = logging.getLogger(__name__)

# Checkpoint extras key of the discriminator's state.
DISCRIMINATOR_STATE = "discriminator"


class AdversarialTerm:
    """The discriminator, its Adam optimiser, and both sides of the hinge game.

    ``generator_loss`` is added to the VQ-VAE's loss on each step from
    ``train.adversarial_start_step`` on (exactly zero before); ``discriminator_step`` then
    trains the discriminator on the same step's real slices and (detached) reconstructions.
    """

    def __init__(
        self,
        settings: TrainConfig,
        image_shape: tuple[int, int, int],
        device: torch.device,
        processes: ProcessGroup = SINGLE_PROCESS,
    ) -> None:
        self.settings, self.processes = settings, processes
        # Its own seeded draw, so the VQ-VAE's random stream (and so every step before the
        # start) is the one a run without the term has.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.discriminator = PatchDiscriminator(
                image_shape[0], settings.discriminator_channels, settings.discriminator_layers
            )
        self.discriminator.to(device)
        _check_output_size(self.discriminator, image_shape, settings, device)
        self.trainer: torch.nn.Module = self.discriminator
        if processes.enabled:  # DDP averages its gradients, so every rank's copy stays equal
            self.trainer = data_parallel(self.discriminator, device)
        self.optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=settings.discriminator_lr, betas=(0.5, 0.9)
        )
        self.steps_skipped = 0

    def active(self, global_step: int) -> bool:
        """Whether the term is on at this step (0-based count of steps taken before it)."""
        return global_step >= self.settings.adversarial_start_step

    def ramp(self, global_step: int) -> float:
        """The share of its weight the decoder's term has at this step: rising linearly from
        ``1 / (warmup + 1)`` at the start step to 1 after ``train.adversarial_warmup_steps``
        (0 before the start)."""
        if not self.active(global_step):
            return 0.0
        steps_on = global_step - self.settings.adversarial_start_step + 1
        return min(1.0, steps_on / (self.settings.adversarial_warmup_steps + 1))

    def generator_loss(
        self,
        reconstructions: torch.Tensor,
        reconstruction_loss: torch.Tensor,
        last_layer_weight: torch.Tensor,
        global_step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's adversarial loss on its ``reconstructions`` and the weight it enters
        the total with: ``train.adversarial_weight`` times the adaptive weight at
        ``last_layer_weight`` (the decoder's last layer, at most
        ``train.adaptive_weight_max``), averaged over the processes so
        every one weighs the term alike, times the warm-up's :meth:`ramp`."""
        # The plain module, its weights frozen for this pass: the decoder's gradient flows
        # through the discriminator, but the discriminator's own is not wanted here (its
        # update is discriminator_step's), so neither is it computed nor synchronised.
        self.discriminator.requires_grad_(False)
        try:
            with autocast(reconstructions.device, self.settings.precision):
                logits = self.discriminator(reconstructions)
        finally:
            self.discriminator.requires_grad_(True)
        loss = generator_adversarial_loss(logits)
        weight = adaptive_adversarial_weight(
            reconstruction_loss, loss, last_layer_weight, self.settings.adaptive_weight_max
        )
        if self.processes.enabled:
            weight = self.processes.sum(weight.clone()) / self.processes.world_size
        return loss, weight * self.settings.adversarial_weight * self.ramp(global_step)

    def discriminator_step(
        self, images: torch.Tensor, reconstructions: torch.Tensor
    ) -> torch.Tensor:
        """One hinge-loss update on real ``images`` and ``reconstructions`` (detached); a
        non-finite gradient skips it, as the loop skips a generator step. Returns the loss."""
        self.discriminator.train()
        with autocast(images.device, self.settings.precision):
            # One forward pass for both halves, as DDP expects one per backward.
            logits = self.trainer(torch.cat([images, reconstructions.detach()]))
        real_logits, fake_logits = logits.split(images.shape[0])
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Gradients are averaged over processes by now, so every process decides alike.
        norm = torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), math.inf)
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.steps_skipped += 1
            logger.warning(
                "discriminator step skipped: its loss or gradient is not finite (%d skipped "
                "in this run)",
                self.steps_skipped,
            )
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """The discriminator's weights, its optimiser and its count of skipped steps."""
        return {
            "weights": self.discriminator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_skipped": self.steps_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned; a discriminator of another shape
        (changed ``train.discriminator_*`` settings) is refused, naming them."""
        try:
            self.discriminator.load_state_dict(state["weights"])
        except RuntimeError as err:
            raise ConfigError(
                "the checkpoint's discriminator does not fit train.discriminator_channels="
                f"{self.settings.discriminator_channels} and train.discriminator_layers="
                f"{self.settings.discriminator_layers}; resume with the settings it was "
                "trained with"
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_skipped = int(state["steps_skipped"])


def _check_output_size(
    discriminator: PatchDiscriminator,
    image_shape: tuple[int, int, int],
    settings: TrainConfig,
    device: torch.device,
) -> None:
    """Refuse, before any training, a discriminator so deep that its strided layers leave
    nothing of the slices (it would fail only at the start step, minutes in)."""
    with torch.no_grad():
        try:
            logits = discriminator(torch.zeros(1, *image_shape, device=device))
        except RuntimeError:
            logits = None
    if logits is None or logits.numel() == 0:
        raise ConfigError(
            f"train.discriminator_layers={settings.discriminator_layers} halves "
            f"{image_shape[1]}x{image_shape[2]} slices to nothing; use fewer layers"
        )
