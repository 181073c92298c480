"""Typed run configuration: frozen dataclasses, strict YAML loading and dotted overrides.

A run is fully described by one :class:`Config`. It is saved beside every run and inside every
checkpoint, so any result can be reproduced from its files alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mri_vqvae.errors import ConfigError, shown
from mri_vqvae.files import write_text_atomic
from mri_vqvae.protocol import DEFAULT_PROTOCOL, PROTOCOLS, SampleProtocol, protocol_named

# A codebook larger than this is a typo: its distance table alone would not fit in memory.
MAX_CODES = 2**16


@dataclass(frozen=True)
class DataConfig:
    """Where the slices are and how they are preprocessed."""

    # (height, width) every slice is resized to; None keeps the native size (all must agree).
    image_size: tuple[int, int] | None = (256, 128)
    skip_bad_files: bool = False
    # Where decoded splits are cached; None uses $MRI_VQVAE_CACHE or ~/.cache/mri-vqvae.
    cache_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        size = self.image_size
        if size is not None and (len(size) != 2 or any(side < 16 for side in size)):
            raise ConfigError(f"data.image_size must be two sides of 16 pixels or more, not {size}")


ARCHITECTURES = ("resnet", "seed")
CODEBOOK_UPDATES = ("ema", "loss")
CODEBOOK_INITS = ("kmeans", "uniform")
OUTPUT_ACTIVATIONS = ("tanh", "none")
LR_SCHEDULES = ("cosine", "constant")
PIXEL_LOSSES = ("mse", "l1")
SSIM_LOSSES = ("ssim", "ms-ssim", "none")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def _check_choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(choice) for choice in choices)
        raise ConfigError(f"{section}.{name} must be one of {options}, got {shown(value)}")


@dataclass(frozen=True)
class ModelConfig:
    """VQ-VAE architecture and quantiser. The defaults are the recommended 8x recipe."""

    in_channels: int = 1
    # "resnet": GroupNorm/SiLU residual blocks at every level; "seed": the seed's strided
    # convolutions with ReLU residual layers at the bottleneck only (van den Oord et al. 2017).
    architecture: str = "resnet"
    # Width of the finest level; level i has channels * channel_multipliers[i]. One level per
    # downsampling, so (1, 2, 2) gives 8x smaller code maps (32x16 codes for 256x128 slices).
    channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 4)
    # resnet: residual blocks per level; seed: residual layers at the bottleneck.
    num_residual_layers: int = 1
    residual_hidden_channels: int = 32  # the seed's narrow residual width; unused by resnet
    # Dimension of the code (lookup) space. A small value with the 1x1 projection into it and
    # the decoder's convolution out of it is the factorised-code design of Yu et al. 2022
    # ("Vector-quantized image modeling with improved VQGAN"), which keeps codes in use.
    embedding_dim: int = 16
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    # "ema": codes follow moving averages of their assigned latents (van den Oord et al. 2017,
    # appendix A.1) with Laplace-smoothed counts; "loss": codes learned by the codebook loss.
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    # "kmeans": codes start at k-means centres of the first training batch's latents;
    # "uniform": the seed's U(-1/K, 1/K), far from any latent.
    codebook_init: str = "kmeans"
    # A code no latent picked for this many training steps is re-seeded from the current
    # batch's latents; 0 never restarts.
    dead_code_steps: int = 5
    # Compare l2-normalised latents and codes (cosine similarity), as in Yu et al. 2022.
    cosine_codes: bool = False
    # "tanh" bounds reconstructions to the image range [-1, 1]; "none" is the seed's.
    output_activation: str = "tanh"

    def __post_init__(self) -> None:
        positive = (
            "in_channels",
            "channels",
            "residual_hidden_channels",
            "embedding_dim",
            "num_embeddings",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_embeddings > MAX_CODES:
            raise ConfigError(
                f"model.num_embeddings must be at most {MAX_CODES}, got {self.num_embeddings}"
            )
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ConfigError(
                "model.channel_multipliers must be one or more positive integers (one per "
                f"downsampling), got {list(self.channel_multipliers)}"
            )
        if self.num_residual_layers < 0:
            raise ConfigError(
                f"model.num_residual_layers must be >= 0, got {self.num_residual_layers}"
            )
        if self.commitment_cost < 0:
            raise ConfigError(f"model.commitment_cost must be >= 0, got {self.commitment_cost}")
        _check_choice("model", "architecture", self.architecture, ARCHITECTURES)
        _check_choice("model", "codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        _check_choice("model", "codebook_init", self.codebook_init, CODEBOOK_INITS)
        _check_choice("model", "output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_epsilon <= 0:
            raise ConfigError(f"model.ema_epsilon must be > 0, got {self.ema_epsilon}")
        if self.dead_code_steps < 0:
            raise ConfigError(f"model.dead_code_steps must be >= 0, got {self.dead_code_steps}")

    @property
    def num_downsamplings(self) -> int:
        """Each level halves height and width."""
        return len(self.channel_multipliers)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class LoopConfig:
    """What the one training loop reads, for either stage: epochs, batch, the learning-rate
    schedule, precision, budget, checkpoints, guards and logs. Its defaults are the VQ-VAE's
    recipe; :class:`PriorTrainConfig` changes those the prior trains better with."""

    # The config section this class is read from, for messages.
    SECTION: ClassVar[str] = "train"

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    # "cosine": linear warm-up over warmup_steps, then cosine decay to lr * final_lr_fraction
    # at the end of the last epoch, or at the time budget when one is set and comes first.
    lr_schedule: str = "cosine"
    warmup_steps: int = 25
    final_lr_fraction: float = 0.02
    # Largest gradient norm before clipping; None never clips.
    grad_clip_norm: float | None = 1.0
    # "bfloat16" autocasts the training forward pass (2.5-3x faster on CPUs with AMX, about
    # 1.35x on AVX-512 BF16, at equal test SSIM on the phantom); "auto" picks it on GPUs that
    # support it and on CPUs whose bfloat16 instructions oneDNN will use
    # (runtime.precision_choice), else float32; the log says why, and the run's saved config
    # records which. "float16" (CUDA only, for GPUs without bfloat16) autocasts to float16 and
    # scales the loss so small gradients do not underflow. Validation and evaluation run in
    # float32.
    precision: str = "auto"
    # Wall-clock budget in minutes; None trains for all epochs.
    max_minutes: float | None = None
    # Also write last.pt every this many optimisation steps inside an epoch, so a killed run
    # resumes from there (exactly, on a CPU); 0 writes it only at the end of each epoch.
    checkpoint_every: int = 0
    # Steps whose loss or gradient is not finite are skipped; this many in a row stop the
    # run, keeping the last checkpoint written before them.
    max_nonfinite_steps: int = 5
    # Also log the per-epoch scalars and preview grids for TensorBoard, in RUN_DIR/tensorboard
    # (needs the tensorboard package: the `tensorboard` extra).
    tensorboard: bool = False
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.SECTION
        for name in ("epochs", "batch_size", "max_nonfinite_steps"):
            value = getattr(self, name)
            _require(value >= 1, f"{s}.{name} must be at least 1, got {value}")
        for name in ("warmup_steps", "checkpoint_every"):
            value = getattr(self, name)
            _require(value >= 0, f"{s}.{name} must be >= 0, got {value}")
        _require(self.lr > 0, f"{s}.lr must be > 0, got {self.lr}")
        _check_choice(s, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice(s, "precision", self.precision, PRECISIONS)
        _require(
            0 <= self.final_lr_fraction <= 1,
            f"{s}.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
        )
        _require(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"{s}.grad_clip_norm must be > 0, got {self.grad_clip_norm}",
        )
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            f"{s}.max_minutes must be > 0, got {self.max_minutes}",
        )


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """The VQ-VAE's optimisation recipe. The defaults are the recommended one; ``--preset
    seed`` is the seed's (Adam 1e-3 constant, batch 32, 20 epochs, MSE only)."""

    # Batch 8 at 2e-3, not 32 at 1e-3: at equal wall-clock, more and smaller steps. On MNI
    # slices (2 AMX cores, bfloat16) it reached batch 32's 8-minute validation SSIM in 2.2
    # minutes and ended 20 minutes at test SSIM 0.968 against 0.961 (PSNR +1.4 dB); at the
    # image count a 2-core CPU without bfloat16 units trains in 5 minutes, 0.81 against 0.66
    # (docs/benchmarks.md, 2026-12-03). A GPU is used better by larger batches; scale lr with
    # batch_size there.
    batch_size: int = 8
    lr: float = 2e-3
    pixel_loss: str = "mse"
    # An extra (1 - SSIM) term on [0, 1] images, weighted by ssim_loss_weight. "ms-ssim" uses
    # a 7-pixel window, so images need sides over 96 pixels. It costs a third of the training
    # images per second on 2 CPU cores, yet at equal time it reached 0.06 more test SSIM on
    # MNI slices at 8x with the same PSNR (docs/benchmarks.md).
    ssim_loss: str = "ssim"
    ssim_loss_weight: float = 0.2
    # A log-spectrum term (losses.spectral_loss) weighted by this; 0 leaves it out. Asks the
    # decoder for the faint high frequencies (noise, thin lines) a pixel loss lets it drop.
    spectral_loss_weight: float = 0.0
    # An adversarial term: a PatchGAN discriminator (GroupNorm, hinge loss) trained beside the
    # VQ-VAE, and the decoder pushed to fool it, weighted by this times the adaptive weight
    # that matches its gradient at the decoder's last layer to the reconstruction loss's
    # (VQGAN, Esser et al. 2021). 0 leaves it out. Both start at adversarial_start_step, so
    # the autoencoder first learns to reconstruct; best.pt is then chosen among the epochs
    # that end after it.
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 500
    # The decoder's side ramps up linearly over this many steps after the start, while the
    # discriminator trains at full rate: a discriminator fresh from its initialisation points
    # the decoder in arbitrary directions (on the phantom, switching the term on at full
    # weight took validation SSIM from 0.86 to 0.57 within 30 steps).
    adversarial_warmup_steps: int = 200
    # The adaptive weight's upper bound. A discriminator that cannot yet tell the slices from
    # their reconstructions has a faint gradient, which the adaptive weight would scale up
    # to the reconstruction loss's: noise in every decoder layer. On MNI slices it averaged
    # over 3 some 150 steps after the start, validation SSIM fell from 0.94 to 0.63 and rose
    # only to 0.93 in 20 minutes, where the plain recipe reached 0.95 (VQGAN's bound is 1e4).
    # Once a discriminator had learned, it sat between 0.001 and 0.04.
    adaptive_weight_max: float = 0.1
    # The discriminator's first width (doubling per strided layer, up to 8x) and depth; with
    # 32 and 3 it costs about as much per image as the default VQ-VAE.
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    # Its Adam learning rate (betas 0.5, 0.9), constant.
    discriminator_lr: float = 2e-4
    # "channels_last" (NHWC) or "contiguous" (NCHW) activations. "auto": channels-last on
    # GPUs and for the seed architecture, whose plain convolutions train 1.2x faster in it on
    # 2 CPU cores; NCHW for the resnet architecture on a CPU, where GroupNorm made
    # channels-last 7% slower (docs/benchmarks.md).
    memory_format: str = "auto"
    # torch.compile the training step. In bfloat16 on 2 CPU cores it made the default
    # architecture 13% faster (fusing GroupNorm and SiLU) and the seed architecture 3-5%
    # slower (docs/benchmarks.md). Off by default: it needs a C++ compiler at run time and
    # the first epoch pays 20-60 s of compilation.
    compile: bool = False
    num_preview_images: int = 8
    # At the end of training, evaluate best.pt on the validation split (RUN_DIR/validation)
    # and write the run's page, RUN_DIR/report.html.
    report: bool = True
    # At the end of training, fit the acquisition texture (mri_vqvae.model.texture) to this
    # many random training slices and their reconstructions by best.pt, and keep it in
    # best.pt: what `sample` adds to decoded slices so that they carry the scanner's noise
    # and fine grain, and what `evaluate` scores textured reconstructions with. 0: none.
    texture_slices: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.texture_slices >= 0,
            f"train.texture_slices must be >= 0, got {self.texture_slices}",
        )
        _check_choice("train", "pixel_loss", self.pixel_loss, PIXEL_LOSSES)
        _check_choice("train", "ssim_loss", self.ssim_loss, SSIM_LOSSES)
        _check_choice("train", "memory_format", self.memory_format, MEMORY_FORMATS)
        _require(
            self.ssim_loss_weight >= 0,
            f"train.ssim_loss_weight must be >= 0, got {self.ssim_loss_weight}",
        )
        _require(self.num_preview_images >= 1, "train.num_preview_images must be at least 1")
        for name in (
            "spectral_loss_weight",
            "adversarial_weight",
            "adversarial_start_step",
            "adversarial_warmup_steps",
        ):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name} must be >= 0, got {value}")
        for name in ("discriminator_channels", "discriminator_layers"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name} must be at least 1, got {value}")
        for name in ("discriminator_lr", "adaptive_weight_max"):
            value = getattr(self, name)
            _require(value > 0, f"train.{name} must be > 0, got {value}")
        # The adaptive weight compares gradients taken outside the loss scaler, which in
        # float16 can underflow to zero; bfloat16 has float32's range and does not.
        _require(
            self.precision != "float16" or self.adversarial_weight == 0,
            "train.precision=float16 does not support the adversarial term "
            "(train.adversarial_weight > 0); use train.precision=bfloat16 or float32",
        )


PRIOR_ARCHITECTURES = ("transformer", "masked", "pixelcnn")
# Blocks (transformer, masked) or gated layers (pixelcnn) when prior.num_layers is not given.
# The autoregressive transformer has 4: on MNI slices and the phantom, side by side with 6,
# it reached 6's final validation bits per code in 54-58% of the time and ended lower
# (4.13 against 4.14 bits in 6 minutes on MNI, 4.73 against 4.77 in 4 on the phantom;
# docs/benchmarks.md, issue 17). The masked prior and the PixelCNN were not measured so.
PRIOR_DEFAULT_LAYERS = {"transformer": 4, "masked": 6, "pixelcnn": 6}


@dataclass(frozen=True)
class PriorConfig:
    """The prior over code-index maps."""

    # "transformer": autoregressive decoder-only transformer, raster order, learned row and
    # column embeddings; "masked": the same blocks bidirectional, trained to fill in masked
    # codes and sampled by iterative parallel decoding (MaskGIT, Chang et al. 2022);
    # "pixelcnn": the gated PixelCNN of van den Oord et al. 2016, the VQ-VAE paper's prior.
    architecture: str = "transformer"
    # transformer: width, blocks and heads; pixelcnn: channels and gated layers. num_layers
    # None is the architecture's own default, PRIOR_DEFAULT_LAYERS (and the saved config
    # records the number).
    width: int = 192
    num_layers: int | None = None
    num_heads: int = 3
    dropout: float = 0.1
    # Condition on the slice's position within its volume (from "slice_<S>" in the file
    # names, scaled to [0, 1]), so sampling can ask for a given position.
    condition_on_slice_position: bool = False
    # Categorical labels to condition on: columns of a conditions.csv beside the data (a
    # "file" column naming each slice, then one column per label, e.g. orientation).
    condition_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("prior", "architecture", self.architecture, PRIOR_ARCHITECTURES)
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", PRIOR_DEFAULT_LAYERS[self.architecture])
        for name in ("width", "num_layers", "num_heads"):
            value = getattr(self, name)
            _require(value >= 1, f"prior.{name} must be at least 1, got {value}")
        _require(
            self.architecture != "transformer" or self.width % self.num_heads == 0,
            f"prior.width ({self.width}) must be divisible by prior.num_heads ({self.num_heads})",
        )
        _require(0 <= self.dropout < 1, f"prior.dropout must be in [0, 1), got {self.dropout}")
        _require(
            len(set(self.condition_labels)) == len(self.condition_labels)
            and all(name.strip() for name in self.condition_labels),
            f"prior.condition_labels must be distinct column names, got "
            f"{list(self.condition_labels)}",
        )


@dataclass(frozen=True)
class PriorTrainConfig(LoopConfig):
    """How the prior is trained: AdamW with warm-up and cosine decay, by the same loop."""

    SECTION: ClassVar[str] = "prior_train"

    epochs: int = 40
    # Small batches, a high rate and a short warm-up: on the demo phantom, batch 16 at 2e-3
    # reached 3.18 validation bits per code in 3 minutes of CPU; batch 32 at 1e-3 with 100
    # warm-up steps had 3.62 after 4 minutes (docs/benchmarks.md).
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.05
    # The prior's speed in bfloat16 is not measured on every CPU, so float32 stays its default.
    precision: str = "float32"
    weight_decay: float = 0.01
    # Decode a grid of samples every this many epochs (and after the last); 0 never does.
    sample_every: int = 5
    num_preview_samples: int = 16
    # Validation and sampling use an exponential moving average of the weights with this
    # decay (warmed up as (1 + n) / (10 + n) over the first steps); 0 uses the raw weights.
    ema_decay: float = 0.999
    # Share of training maps whose slice position and labels are hidden, so the prior also
    # learns the unconditional distribution that classifier-free guidance needs.
    condition_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.weight_decay >= 0,
            f"prior_train.weight_decay must be >= 0, got {self.weight_decay}",
        )
        _require(self.sample_every >= 0, "prior_train.sample_every must be >= 0")
        _require(self.num_preview_samples >= 1, "prior_train.num_preview_samples must be >= 1")
        _require(
            0 <= self.ema_decay < 1,
            f"prior_train.ema_decay must be in [0, 1), got {self.ema_decay}",
        )
        _require(
            0 <= self.condition_dropout < 1,
            f"prior_train.condition_dropout must be in [0, 1), got {self.condition_dropout}",
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Distribution augmentation of the prior's training split (Jun et al. 2020): beside each
    slice's plain code map, ``copies`` maps of randomly shifted, turned, scaled, gamma- and
    contrast-changed versions of it, each encoded once. The prior is told each map's
    augmentation and samples with none, so the copies add signal without changing what it
    generates. Validation and test maps are never augmented."""

    copies: int = 0  # augmented copies per training slice beside the plain one; 0: none
    # Left-right mirror images. Off: pelvic anatomy is not left-right symmetric in detail.
    flip_left_right: bool = False
    # Each copy's change is drawn uniformly within these limits.
    max_shift: float = 0.04  # fraction of each side
    max_rotation_degrees: float = 4.0
    max_scale: float = 0.05  # zoom factor within [1 / (1 + max_scale), 1 + max_scale]
    max_gamma: float = 0.15  # gamma on [0, 1] intensities within [1 / (1 + g), 1 + g]
    max_contrast: float = 0.1  # contrast about the mean scaled by 1 +- max_contrast
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.copies >= 0, f"augment.copies must be >= 0, got {self.copies}")
        # Upper limits keep a copy recognisably the same slice (and a contrast factor
        # positive); "not >=" also refuses NaN.
        limits = {
            "max_shift": 0.5,
            "max_rotation_degrees": 180.0,
            "max_scale": 1.0,
            "max_gamma": 1.0,
            "max_contrast": 0.99,
        }
        for name, upper in limits.items():
            value = getattr(self, name)
            _require(0 <= value <= upper, f"augment.{name} must be in [0, {upper}], got {value}")


@dataclass(frozen=True)
class SampleConfig:
    """How new slices are drawn from the prior."""

    num_samples: int = 64
    temperature: float = 1.0
    top_k: int | None = None  # keep only the k most likely codes
    top_p: float | None = None  # keep the fewest codes whose probability reaches p (nucleus)
    use_cache: bool = True  # key/value cache (transformer only)
    # The prior's forward passes: "auto" is bfloat16 where the device has fast bfloat16
    # matrix units (GPUs; CPUs with AMX or AVX-512 BF16) and float32 elsewhere, but float32 for
    # an autoregressive prior on a CPU (generate.sampling.sampling_precision); the logits are
    # filtered and sampled in float32 either way.
    precision: str = "auto"
    # Classifier-free guidance: logits = unconditional + guidance * (conditional -
    # unconditional). 1 samples the conditional model as trained, 0 the unconditional one.
    guidance: float = 1.0
    # Masked prior: parallel decoding steps, and the scale of the Gumbel noise that makes
    # which codes are kept random (annealed to 0 over the steps, as in MaskGIT). 8 steps
    # scored as well as 12, 16 and 24 at two thirds of 12's time, which keeps 64 slices
    # under 10 s on 2 CPU cores (docs/benchmarks.md, 2026-12-02, 15-minute priors).
    decoding_steps: int = 8
    choice_temperature: float = 4.5
    batch_size: int = 64  # maps sampled together
    # Add the VQ-VAE's acquisition texture (noise and grain fitted to its training slices'
    # residuals; train.texture_slices) to each decoded sample, so that it carries what an
    # acquired slice does; off, the samples are the decoder's smooth mean. A VQ-VAE trained
    # without one gives smooth samples either way (samples.json says which).
    texture: bool = True
    # Position in the volume, 0 to 1, for a prior trained with slice positions.
    slice_position: float | None = None
    # Labels every sample is drawn with, as "name=value" (a prior trained on labels); a label
    # or position not given is drawn from the training slices' conditions.
    labels: tuple[str, ...] = ()
    device: str = "auto"
    seed: int = 0

    def label_values(self) -> dict[str, str]:
        """The ``labels`` as a name-to-value mapping (spaces around either stripped)."""
        pairs = (item.split("=", 1) for item in self.labels)
        return {name.strip(): value.strip() for name, value in pairs}

    def __post_init__(self) -> None:
        for item in self.labels:
            name, sep, value = item.partition("=")
            _require(
                bool(sep and name.strip() and value.strip()),
                f"sample.labels entries must look like name=value, got {shown(item)}",
            )
        names = [item.split("=", 1)[0].strip() for item in self.labels]
        repeated = sorted({name for name in names if names.count(name) > 1})
        _require(not repeated, f"sample.labels gives {', '.join(repeated)} more than once")
        for name in ("num_samples", "batch_size"):
            value = getattr(self, name)
            _require(value >= 1, f"sample.{name} must be at least 1, got {value}")
        # inf would flatten every distribution to uniform noise; nan is no number.
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"sample.temperature must be a finite number > 0, got {self.temperature}",
        )
        _require(
            self.top_k is None or self.top_k >= 1, f"sample.top_k must be >= 1, got {self.top_k}"
        )
        _check_choice("sample", "precision", self.precision, PRECISIONS)
        _require(
            math.isfinite(self.guidance) and self.guidance >= 0,
            f"sample.guidance must be a finite number >= 0, got {self.guidance}",
        )
        _require(
            self.decoding_steps >= 1,
            f"sample.decoding_steps must be at least 1, got {self.decoding_steps}",
        )
        _require(
            self.choice_temperature >= 0,
            f"sample.choice_temperature must be >= 0, got {self.choice_temperature}",
        )
        _require(
            self.top_p is None or 0 < self.top_p <= 1,
            f"sample.top_p must be in (0, 1], got {self.top_p}",
        )
        _require(
            self.slice_position is None or 0 <= self.slice_position <= 1,
            f"sample.slice_position must be in [0, 1], got {self.slice_position}",
        )


@dataclass(frozen=True)
class SampleMetricsConfig:
    """Which protocol measures generated slices, on how many slices, with which seed."""

    # The named, versioned settings of the feature networks, the two-sample classifier, KID
    # and density/coverage (mri_vqvae.protocol); written beside every result.
    protocol: str = DEFAULT_PROTOCOL
    # Training slices reconstructed as the reference, split into two random halves: samples
    # are compared with one, the other gives the null. More slices cost time, not accuracy of
    # the null's calibration.
    reference_slices: int = 512
    # Nearest training slice: SSIM is computed for the candidates nearest in mean squared
    # distance at a quarter of the resolution, since SSIM against every slice costs too much.
    neighbour_candidates: int = 32
    diversity_pairs: int = 2000
    device: str = "auto"
    seed: int = 0  # the reference's halves, subsampling and KID subsets

    def __post_init__(self) -> None:
        _check_choice("sample_metrics", "protocol", self.protocol, tuple(PROTOCOLS))
        _require(
            self.reference_slices >= 2,
            f"sample_metrics.reference_slices must be at least 2, got {self.reference_slices}",
        )
        for name in ("neighbour_candidates", "diversity_pairs"):
            value = getattr(self, name)
            _require(value >= 1, f"sample_metrics.{name} must be at least 1, got {value}")

    @property
    def measures(self) -> SampleProtocol:
        """The settings of the protocol named by ``protocol``."""
        return protocol_named(self.protocol)


@dataclass(frozen=True)
class Config:
    """Every setting of every command, one section per part: the slices, the VQ-VAE and its
    training, the prior, its training and the augmentation of its training maps, sampling and
    the sample measures. A run saves the
    whole tree; a prior's run takes ``data`` and ``model`` from its VQ-VAE."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sample_metrics: SampleMetricsConfig = field(default_factory=SampleMetricsConfig)

    def __post_init__(self) -> None:
        if self.data.image_size is not None:
            factor = 2**self.model.num_downsamplings
            for side in self.data.image_size:
                if side % factor:
                    raise ConfigError(
                        f"data.image_size {tuple(self.data.image_size)} is not divisible by "
                        f"2**len(model.channel_multipliers) = {factor}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML/JSON-safe values."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The settings as YAML, loadable by :func:`load_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Named starting points; a YAML file and then CLI overrides apply on top of one. The defaults
# are the recommended 8x recipe, so "8x" changes nothing.
# The adversarial and spectral terms of the "-gan" presets (VQGAN's discriminator weight 0.8
# with its adaptive weight; a start after the autoencoder has learned to reconstruct: 500
# steps are about 5 minutes of the 8x recipe on 2 AMX cores, ~15 without bfloat16 units).
# They keep batch 32 at 1e-3, the recipe they were measured with (docs/benchmarks.md) before
# the default moved to batch 8: at batch 8 the start step would come after a quarter of the
# images.
_GAN_TERMS = {
    "batch_size": 32,
    "lr": 1e-3,
    "adversarial_weight": 0.8,
    "adversarial_start_step": 500,
    "spectral_loss_weight": 0.02,
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "8x": {},
    "4x": {"model": {"channel_multipliers": [1, 2]}},
    # The 8x and 4x recipes with a PatchGAN discriminator and the spectral term, for
    # reconstructions with the texture of an acquired scan (issue 16).
    "8x-gan": {"train": dict(_GAN_TERMS)},
    "4x-gan": {"model": {"channel_multipliers": [1, 2]}, "train": dict(_GAN_TERMS)},
    # The seed's recipe as published, kept only to compare with: loss-learned codebook
    # initialised far from the data, no restarts, unbounded output, MSE, constant Adam 1e-3.
    "seed": {
        "model": {
            "architecture": "seed",
            "channels": 64,
            "channel_multipliers": [1, 2, 2],
            "num_residual_layers": 2,
            "residual_hidden_channels": 32,
            "embedding_dim": 128,
            "num_embeddings": 512,
            "commitment_cost": 0.25,
            "codebook_update": "loss",
            "codebook_init": "uniform",
            "dead_code_steps": 0,
            "cosine_codes": False,
            "output_activation": "none",
        },
        "train": {
            "epochs": 20,
            "batch_size": 32,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "grad_clip_norm": None,
            "pixel_loss": "mse",
            "ssim_loss": "none",
            "ssim_loss_weight": 0.0,
        },
    },
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field's type, turning lists into tuples and ints into floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {shown(value)}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {shown(value)}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {shown(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {shown(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {shown(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {shown(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {shown(value)}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {annotation!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {shown(values)}")
    not_names = [key for key in values if not isinstance(key, str)]
    if not_names:
        raise ConfigError(
            f"{prefix or 'config'}: setting names must be words, got {shown(not_names[0])}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        hint = ""
        if prefix == "train" and set(unknown) <= {
            f.name for f in dataclasses.fields(PriorTrainConfig)
        }:
            hint = "; the prior's training settings are the prior_train section"
        raise ConfigError(
            f"unknown setting{where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            f"{hint}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(err)) from err


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain values; unknown keys are an error."""
    return _build(Config, values, "")


def _parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, or a :class:`ConfigError` naming ``what`` (the file or the
    override) for text that is no YAML or nests too deeply for the parser."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{what} nests too deeply to be a setting") from err


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if path.exists() and not path.is_file():  # reading a FIFO would wait forever
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a text file ({err.reason})") from err
    loaded = _parse_yaml(text, f"config file {path}")
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded or {}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """The defaults, then a named preset, then a YAML file, then ``section.key=value`` overrides."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {shown(preset)} (known: {', '.join(sorted(PRESETS))})")
    values = _read_yaml(path)
    if preset is not None:
        values = _merge(PRESETS[preset], values)
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of nested ``values`` with each ``a.b=value`` override set (values read as YAML)."""
    result = _to_plain(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {shown(item)} must look like section.key=value")
        parsed = _parse_yaml(raw, f"override {shown(item)}: value") if raw.strip() else None
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {shown(item)}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    return result


def save_config(config: Config, path: str | Path) -> None:
    """Write the configuration as YAML, loadable by :func:`load_config`, replaced whole."""
    write_text_atomic(Path(path), config.to_yaml())


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every setting that differs between two config dicts."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {shown(old)} -> {shown(new)}")
    return changes


def resumed_config(
    saved: Config, overrides: list[str], *, fixed: tuple[str, ...], source: str | Path
) -> Config:
    """The settings of a resumed run: the ``saved`` ones (of the checkpoint at ``source``)
    with ``overrides`` applied; the ``fixed`` sections may not change."""
    before = saved.to_dict()
    config = config_from_dict(apply_overrides(before, overrides))
    after = config.to_dict()
    changes = changed_settings({s: before[s] for s in fixed}, {s: after[s] for s in fixed})
    if changes:
        raise ConfigError(
            f"--resume cannot change the {'/'.join(fixed)} settings of {source}: "
            + "; ".join(changes)
        )
    return config
