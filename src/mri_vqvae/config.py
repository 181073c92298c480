"""Typed run configuration: frozen dataclasses, strict YAML loading and dotted overrides.

A run is fully described by one :class:`Config`. It is saved beside every run and inside every
checkpoint, so any result can be reproduced from its files alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import yaml

from mri_vqvae.errors import ConfigError, shown
from mri_vqvae.files import write_text_atomic
from mri_vqvae.protocol import DEFAULT_PROTOCOL, PROTOCOLS, SampleProtocol, protocol_named

# The bounds below keep every setting's memory and arithmetic finite, whichever way it comes
# (flag, override, YAML file, a checkpoint's saved config): each section checks its own
# settings against its LIMITS table, the one validation of each; the command line's flags
# parse with the same tables (cli.options).

# A codebook larger than this is a typo: its distance table alone would not fit in memory.
MAX_CODES = 2**16
# Seeds: every seed the tool derives from one (seed * 100003 + epoch in the loop, seed +
# a stream's offset for the texture) stays inside the 64 bits torch.manual_seed takes, and
# the flags have always stopped here.
MAX_SEED = 2**32 - 1
# The largest slice the loader reads (64 Mi voxels) and its smallest side; the phantom's
# --size is held to them too. A resized image (data.image_size) is held to the same size,
# with sides of at least MIN_IMAGE_SIDE (2 codes a side in the 8x recipe's code maps).
MAX_SLICE_VOXELS, MIN_SLICE_SIDE = 2**26, 8
MIN_IMAGE_SIDE = 16
# Widest layer of any network (a level's channels, the code space, the prior): a 3x3
# convolution this wide already holds 151 M weights.
MAX_WIDTH = 4096
MAX_LEVELS = 8  # downsamplings: 256x smaller code maps
MAX_LAYERS = 64  # residual blocks per level, prior blocks
MAX_BATCH = 2**16
MAX_EPOCHS = 10**6
MAX_STEPS = 10**9  # step counts (warm-up, checkpoints, dead codes); int64 buffers hold them
MAX_SAMPLES = 10**5  # decoded samples are held in memory together
MAX_PREVIEWS = 256  # a picture grid of more is unreadable
MAX_LOSS_WEIGHT = 100.0  # a loss term's weight; 1e39 times a loss overflows float32
MAX_LR = 10.0  # Adam's step is about lr per weight: above this, training only diverges


@dataclass(frozen=True)
class Whole:
    """The accepted values of an integer setting: ``low`` to ``high``, both included."""

    low: int
    high: int
    why: str = ""  # said in a refusal, where the bound needs a reason

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be at least 1, got 0"``), or None."""
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {shown(value)}"
        if self.low <= value <= self.high:
            return None
        if self.low == self.high:
            bound = f"must be {self.low}"
        elif value < self.low:
            bound = f"must be at least {self.low}"
        else:
            bound = f"must be at most {self.high}"
        why = f" ({self.why})" if self.why else ""
        return f"{bound}{why}, got {shown(value)}"


@dataclass(frozen=True)
class Span:
    """The accepted values of a number setting: finite, from ``low`` to ``high``; an open end
    leaves the bound itself out."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be a finite number in (0, 10], got inf"``),
        or None. NaN fails every comparison, so it is refused with the infinities."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {shown(value)}"
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        if above and below:
            return None
        interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
        interval += ")" if self.high_open else "]"
        # A closed bound above 0 is a floor for the arithmetic; the setting is still a
        # positive one, and is said so first.
        where = f"> 0, in {interval}" if self.low > 0 and not self.low_open else f"in {interval}"
        why = f" ({self.why})" if self.why else ""
        return f"must be a finite number {where}{why}, got {shown(value)}"


Limit = Whole | Span


def _check_limits(settings: Any) -> None:
    """Each numeric setting of a section within its entry of the section's ``LIMITS`` (each
    item of a tuple; an optional setting left unset is not checked)."""
    for name, limit in settings.LIMITS.items():
        value = getattr(settings, name)
        for item in value if isinstance(value, tuple) else (value,):
            problem = None if item is None else limit.problem(item)
            if problem is not None:
                raise ConfigError(f"{settings.SECTION}.{name} {problem}")


@dataclass(frozen=True)
class DataConfig:
    """Where the slices are and how they are preprocessed."""

    # (height, width) every slice is resized to; None keeps the native size (all must agree).
    image_size: tuple[int, int] | None = (256, 128)
    skip_bad_files: bool = False
    # Where decoded splits are cached; None uses $MRI_VQVAE_CACHE or ~/.cache/mri-vqvae.
    cache_dir: str | None = None
    use_cache: bool = True

    SECTION: ClassVar[str] = "data"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "image_size": Whole(MIN_IMAGE_SIDE, MAX_SLICE_VOXELS // MIN_IMAGE_SIDE),
    }

    def __post_init__(self) -> None:
        problem = None if self.image_size is None else image_size_problem(self.image_size)
        _require(problem is None, f"data.image_size {problem}")


def image_size_problem(size: tuple[int, ...]) -> str | None:
    """What is wrong with ``size`` as ``data.image_size`` (the resized slices' height and
    width), or None; ``--size`` asks the same."""
    if len(size) != 2:
        return f"must be two sides, height and width, got {shown(list(size))}"
    for side in size:
        problem = DataConfig.LIMITS["image_size"].problem(side)
        if problem is not None:
            return f"sides {problem}"
    if size[0] * size[1] > MAX_SLICE_VOXELS:
        return (
            f"must hold at most {MAX_SLICE_VOXELS} pixels (the largest slice the loader "
            f"reads), got {size[0]}x{size[1]}"
        )
    return None


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

    SECTION: ClassVar[str] = "model"
    LIMITS: ClassVar[dict[str, Limit]] = {
        # The data pipeline reads every slice as one grey channel, (B, 1, H, W).
        "in_channels": Whole(1, 1, why="the slices are read as grey images, one channel"),
        "channels": Whole(1, MAX_WIDTH),
        "channel_multipliers": Whole(1, 64),
        "num_residual_layers": Whole(0, MAX_LAYERS),
        "residual_hidden_channels": Whole(1, MAX_WIDTH),
        "embedding_dim": Whole(1, MAX_WIDTH),
        "num_embeddings": Whole(1, MAX_CODES),
        "commitment_cost": Span(0, MAX_LOSS_WEIGHT),
        "ema_decay": Span(0, 1, high_open=True),
        # The smoothed counts divide the codes' sums in float32: a smaller epsilon underflows
        # there, and an unused code's update becomes 0/0.
        "ema_epsilon": Span(1e-12, 1),
        "dead_code_steps": Whole(0, MAX_STEPS),
    }

    def __post_init__(self) -> None:
        _check_limits(self)
        levels = len(self.channel_multipliers)
        _require(
            1 <= levels <= MAX_LEVELS,
            f"model.channel_multipliers must be 1 to {MAX_LEVELS} positive integers (one per "
            f"downsampling), got {shown(list(self.channel_multipliers))}",
        )
        widest = self.channels * max(self.channel_multipliers)
        _require(
            widest <= MAX_WIDTH,
            f"model.channels times the largest of model.channel_multipliers (the widest "
            f"level) must be at most {MAX_WIDTH}, got {self.channels} * "
            f"{max(self.channel_multipliers)} = {widest}",
        )
        _check_choice("model", "architecture", self.architecture, ARCHITECTURES)
        _check_choice("model", "codebook_update", self.codebook_update, CODEBOOK_UPDATES)
        _check_choice("model", "codebook_init", self.codebook_init, CODEBOOK_INITS)
        _check_choice("model", "output_activation", self.output_activation, OUTPUT_ACTIVATIONS)

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

    LIMITS: ClassVar[dict[str, Limit]] = {
        "epochs": Whole(1, MAX_EPOCHS),
        "batch_size": Whole(1, MAX_BATCH),
        "lr": Span(0, MAX_LR, low_open=True),
        "warmup_steps": Whole(0, MAX_STEPS),
        "final_lr_fraction": Span(0, 1),
        # A norm this large never clips; beyond it a typo, not a choice.
        "grad_clip_norm": Span(0, 1e6, low_open=True),
        "max_minutes": Span(0, 1e7, low_open=True),  # 19 years
        "checkpoint_every": Whole(0, MAX_STEPS),
        "max_nonfinite_steps": Whole(1, MAX_STEPS),
        "seed": Whole(0, MAX_SEED),
    }

    def __post_init__(self) -> None:
        _check_limits(self)
        _check_choice(self.SECTION, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice(self.SECTION, "precision", self.precision, PRECISIONS)


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

    LIMITS: ClassVar[dict[str, Limit]] = {
        **LoopConfig.LIMITS,
        "ssim_loss_weight": Span(0, MAX_LOSS_WEIGHT),
        "spectral_loss_weight": Span(0, MAX_LOSS_WEIGHT),
        "adversarial_weight": Span(0, MAX_LOSS_WEIGHT),
        "adversarial_start_step": Whole(0, MAX_STEPS),
        "adversarial_warmup_steps": Whole(0, MAX_STEPS),
        "adaptive_weight_max": Span(0, 1e4, low_open=True),  # VQGAN's own bound
        # The discriminator doubles its width per layer up to 8x; each layer halves the image.
        "discriminator_channels": Whole(1, MAX_WIDTH // 8),
        "discriminator_layers": Whole(1, 8),
        "discriminator_lr": Span(0, MAX_LR, low_open=True),
        "num_preview_images": Whole(1, MAX_PREVIEWS),
        "texture_slices": Whole(0, 10**6),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("train", "pixel_loss", self.pixel_loss, PIXEL_LOSSES)
        _check_choice("train", "ssim_loss", self.ssim_loss, SSIM_LOSSES)
        _check_choice("train", "memory_format", self.memory_format, MEMORY_FORMATS)
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

    SECTION: ClassVar[str] = "prior"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "width": Whole(1, MAX_WIDTH),
        "num_layers": Whole(1, MAX_LAYERS),
        "num_heads": Whole(1, MAX_WIDTH),
        "dropout": Span(0, 1, high_open=True),
    }

    def __post_init__(self) -> None:
        _check_choice("prior", "architecture", self.architecture, PRIOR_ARCHITECTURES)
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", PRIOR_DEFAULT_LAYERS[self.architecture])
        _check_limits(self)
        # Both transformers split their width between the heads; the PixelCNN has none.
        _require(
            self.architecture == "pixelcnn" or self.width % self.num_heads == 0,
            f"prior.width ({self.width}) must be divisible by prior.num_heads ({self.num_heads})",
        )
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

    LIMITS: ClassVar[dict[str, Limit]] = {
        **LoopConfig.LIMITS,
        # AdamW shrinks each weight by lr * weight_decay a step; the usual are 0.01 to 0.1.
        "weight_decay": Span(0, 1),
        "sample_every": Whole(0, MAX_EPOCHS),
        "num_preview_samples": Whole(1, MAX_PREVIEWS),
        "ema_decay": Span(0, 1, high_open=True),
        "condition_dropout": Span(0, 1, high_open=True),
    }


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

    SECTION: ClassVar[str] = "augment"
    LIMITS: ClassVar[dict[str, Limit]] = {
        # Each copy is a whole encoded training split, held beside the others.
        "copies": Whole(0, 100),
        # Upper limits keep a copy recognisably the same slice (and a contrast factor
        # positive).
        "max_shift": Span(0, 0.5),
        "max_rotation_degrees": Span(0, 180),
        "max_scale": Span(0, 1),
        "max_gamma": Span(0, 1),
        "max_contrast": Span(0, 0.99),
        "seed": Whole(0, MAX_SEED),
    }

    def __post_init__(self) -> None:
        _check_limits(self)


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

    SECTION: ClassVar[str] = "sample"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "num_samples": Whole(1, MAX_SAMPLES),
        # The logits are divided by the temperature and the conditional ones' difference
        # multiplied by the guidance, in float32: these bounds keep them far from overflow
        # (1e-45 or 1e39 would turn them to inf and the draw to NaN). Already at 0.001 the
        # draw is all but the most likely code, at 100 all but uniform.
        "temperature": Span(1e-3, 100),
        "top_k": Whole(1, MAX_CODES),
        "top_p": Span(0, 1, low_open=True),
        "guidance": Span(0, 100),
        "decoding_steps": Whole(1, 1024),
        # Scales Gumbel noise added to log-probabilities: beyond it the noise alone decides.
        "choice_temperature": Span(0, 100),
        "batch_size": Whole(1, MAX_BATCH),
        "slice_position": Span(0, 1),
        "seed": Whole(0, MAX_SEED),
    }

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
        _check_limits(self)
        _check_choice("sample", "precision", self.precision, PRECISIONS)


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

    SECTION: ClassVar[str] = "sample_metrics"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "reference_slices": Whole(2, 10**6),
        "neighbour_candidates": Whole(1, 10**4),
        "diversity_pairs": Whole(1, 10**6),
        "seed": Whole(0, MAX_SEED),
    }

    def __post_init__(self) -> None:
        _check_choice("sample_metrics", "protocol", self.protocol, tuple(PROTOCOLS))
        _check_limits(self)

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
            _check_image_fits(self, tuple(self.data.image_size))
        # A pure function of the settings, so checked with them; the machine's own memory
        # is the running command's to compare with (check_memory's limit).
        check_memory(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML/JSON-safe values."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The settings as YAML, loadable by :func:`load_config`."""
        return yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False)


def _check_image_fits(config: Config, size: tuple[int, int]) -> None:
    """The VQ-VAE's downsamplings must divide each side. (The discriminator's depth against
    the size is checked where the size is known for certain, native ones included: by
    train.adversarial.AdversarialTerm, before training.)"""
    factor = 2**config.model.num_downsamplings
    _require(
        all(side % factor == 0 for side in size),
        f"data.image_size {size} is not divisible by 2**len(model.channel_multipliers) = {factor}",
    )


class _PlainDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` without anchors and aliases, which the loader refuses: a value
    that appears twice is written out twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# Settings whose estimated need for any stage exceeds this are refused before anything is
# allocated: it is above what any one accelerator holds (an H200 has 141 GB). The machine's
# own memory is smaller; a command compares with it through check_memory's limit.
MAX_ESTIMATED_BYTES = 256 * 2**30
_FLOAT = 4  # bytes of a float32
# Floats per trained parameter: the weight, its gradient and Adam's two moments.
_TRAINED = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough bytes one stage needs, as float32: its parameters (with gradients and Adam's
    moments when it trains) and the activations of one batch. An order of magnitude, to refuse
    the impossible before allocating; the real peak depends on the kernels."""

    stage: str
    parameters: int
    parameter_bytes: int
    activation_bytes: int  # 0 when the image size is known only from the data
    activations: str  # what those bytes hold, for a refusal
    settings: str  # those that enter it, named in a refusal

    @property
    def total_bytes(self) -> int:
        """Parameters and activations together."""
        return self.parameter_bytes + self.activation_bytes


def memory_estimates(
    config: Config, image_size: tuple[int, int] | None = None
) -> list[MemoryEstimate]:
    """What training the VQ-VAE, training the prior and sampling need at ``image_size``
    (``data.image_size`` when not given; with neither, the parameters alone)."""
    size = image_size or config.data.image_size
    if size is None:
        pixels, grid = 0, (0, 0)
    else:
        factor = 2 ** len(config.model.channel_multipliers)
        pixels, grid = size[0] * size[1], (size[0] // factor, size[1] // factor)
    return [
        _vqvae_memory(config, pixels),
        _prior_memory(config, grid),
        _sampling_memory(config, pixels, grid),
    ]


def check_memory(
    config: Config,
    *,
    image_size: tuple[int, int] | None = None,
    limit: int = MAX_ESTIMATED_BYTES,
) -> None:
    """Refuse settings whose estimated need for any stage exceeds ``limit`` bytes, saying the
    estimate and what to lower. Config validation calls it with the fixed cap; a command can
    call it again with the slices' own size and its device's memory (physical_memory_bytes on
    a CPU) before building a model."""
    for estimate in memory_estimates(config, image_size):
        if estimate.total_bytes > limit:
            raise ConfigError(
                f"{estimate.stage} would need about {_bytes_text(estimate.total_bytes)} "
                f"({_bytes_text(estimate.parameter_bytes)} for {estimate.parameters:,} "
                f"parameters, {_bytes_text(estimate.activation_bytes)} for "
                f"{estimate.activations}), more than the {_bytes_text(limit)} allowed; lower "
                f"{estimate.settings}"
            )


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _bytes_text(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _vqvae_memory(config: Config, pixels: int) -> MemoryEstimate:
    """Training the VQ-VAE: per level a 4x4 (down/up)sampling and, in the resnet
    architecture, residual blocks of two 3x3 convolutions, in the encoder and the decoder;
    the seed's residual stack at the bottleneck; the codebook; the discriminator when it
    trains. Each block keeps about six maps of its width for the backward pass."""
    model, train = config.model, config.train
    widths = [model.channels * m for m in model.channel_multipliers]
    blocks = model.num_residual_layers if model.architecture == "resnet" else 0
    parameters, previous = 0, model.in_channels
    floats, area = 4 * pixels, pixels  # the images, reconstructions and loss maps
    for width in widths:
        parameters += 2 * (16 * previous * width + blocks * 18 * width * width)
        area //= 4
        floats += 2 * area * width * (2 + 6 * blocks)
        previous = width
    if model.architecture == "seed":
        stack = model.num_residual_layers * 10 * widths[-1] * model.residual_hidden_channels
        parameters += 2 * (9 * widths[-1] ** 2 + stack)
        floats += 2 * area * model.num_residual_layers * 3 * model.residual_hidden_channels
    parameters += (2 * widths[-1] + model.num_embeddings) * model.embedding_dim
    # Every latent's distance to every code, and its one-hot assignment.
    floats += 2 * area * model.num_embeddings
    settings = (
        "data.image_size, train.batch_size, model.channels, model.channel_multipliers, "
        "model.num_residual_layers, model.residual_hidden_channels, model.embedding_dim or "
        "model.num_embeddings"
    )
    if train.adversarial_weight > 0:
        extra_parameters, extra_floats = _discriminator_size(train, pixels)
        parameters, floats = parameters + extra_parameters, floats + extra_floats
        settings = f"{settings}, train.discriminator_channels or train.discriminator_layers"
    return MemoryEstimate(
        stage="training the VQ-VAE",
        parameters=parameters,
        parameter_bytes=parameters * _TRAINED * _FLOAT,
        activation_bytes=train.batch_size * floats * _FLOAT,
        activations=f"the activations of a batch of {train.batch_size}",
        settings=settings,
    )


def _discriminator_size(train: TrainConfig, pixels: int) -> tuple[int, int]:
    """The PatchGAN's parameters and the floats it keeps per image (it sees real and
    reconstructed ones): 4x4 convolutions, each but the last two halving the sides."""
    channels, layers = train.discriminator_channels, train.discriminator_layers
    area = pixels // 4
    parameters, floats, previous = 16 * channels, area * channels, channels
    for index in range(1, layers + 1):
        width = channels * min(2**index, 8)
        area //= 4 if index < layers else 1
        parameters += 16 * previous * width
        floats += 3 * area * width  # convolution, normalisation, activation
        previous = width
    return parameters + 16 * previous, 2 * floats


def _prior_parameters(config: Config, grid: tuple[int, int]) -> int:
    """A transformer block holds about 12 width^2 weights (attention 4, its 4x MLP 8), a
    gated PixelCNN layer about 30 on average (its first, 7 wide, more); the embeddings and
    the output head add codes x width."""
    prior, codes = config.prior, config.model.num_embeddings
    per_layer = 30 if prior.architecture == "pixelcnn" else 12
    embeddings = (2 * codes + 2 + grid[0] + grid[1]) * prior.width + prior.width**2
    return prior.num_layers * per_layer * prior.width**2 + embeddings


def _prior_memory(config: Config, grid: tuple[int, int]) -> MemoryEstimate:
    """Training the prior: per code position about 16 width-sized vectors per layer (the
    fused attention keeps no length^2 table), and the logits with their log-softmax."""
    prior, codes = config.prior, config.model.num_embeddings
    parameters = _prior_parameters(config, grid)
    positions = grid[0] * grid[1]
    floats = positions * (prior.num_layers * 16 * prior.width + 2 * codes)
    return MemoryEstimate(
        stage="training the prior",
        parameters=parameters,
        parameter_bytes=parameters * _TRAINED * _FLOAT,
        activation_bytes=config.prior_train.batch_size * floats * _FLOAT,
        activations=f"the activations of a batch of {config.prior_train.batch_size}",
        settings="data.image_size, model.channel_multipliers, model.num_embeddings, "
        "prior.width, prior.num_layers or prior_train.batch_size",
    )


def _sampling_memory(config: Config, pixels: int, grid: tuple[int, int]) -> MemoryEstimate:
    """Sampling: a batch of maps (doubled when guidance mixes a conditioned prior's two
    forward passes) with a transformer's key/value cache (two width-sized vectors per layer
    and position) or a forward pass's maps, and its logits; the decoder's finest level for a
    batch; then every decoded sample, with its texture, held together."""
    prior, sample = config.prior, config.sample
    parameters = _prior_parameters(config, grid)
    positions = grid[0] * grid[1]
    batch = min(sample.batch_size, sample.num_samples)
    conditioned = prior.condition_on_slice_position or bool(prior.condition_labels)
    guided = conditioned and sample.guidance not in (0, 1)
    per_map = positions * (prior.num_layers * 2 * prior.width + config.model.num_embeddings)
    decoding = batch * pixels // 4 * config.model.channels * 2
    floats = (2 if guided else 1) * batch * per_map + decoding + 2 * sample.num_samples * pixels
    return MemoryEstimate(
        stage="sampling",
        parameters=parameters,
        parameter_bytes=parameters * _FLOAT,
        activation_bytes=floats * _FLOAT,
        activations=f"a batch of {batch} maps and {sample.num_samples} decoded samples",
        settings="data.image_size, sample.num_samples, sample.batch_size, "
        "model.num_embeddings, prior.width or prior.num_layers",
    )


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


_PLAIN_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


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
        # PyYAML reads "1e-3" (no dot) as a string; Python's float() would also take "1_0",
        # " 1 " and "infinity", which are no numbers in YAML.
        if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {shown(value)}")
        # An integer beyond float's range stays one, for the setting's limit to name.
        with contextlib.suppress(OverflowError):
            value = float(value)
        return value
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


class _Refused(yaml.MarkedYAMLError):
    """YAML the strict loader refuses to read: an anchor or alias, a key given twice, a
    YAML 1.1 scalar that YAML 1.2 reads otherwise."""


def _refuse(node: Any, problem: str) -> NoReturn:
    raise _Refused(problem=problem, problem_mark=node.start_mark)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_yaml11_number(node: Any, value: float) -> None:
    """Refuse the number forms of YAML 1.1 that YAML 1.2 reads as text: digits grouped by
    underscores and base-60 (sexagesimal) numbers."""
    text = node.value
    if "_" in text:
        problem = f"{text} groups digits with _, which YAML 1.2 reads as text"
        _refuse(node, f"{problem}; write {text.replace('_', '')}")
    if ":" in text:
        problem = f"{text} is the base-60 number {value} to YAML 1.1, text to YAML 1.2"
        _refuse(node, f"{problem}; write the number, or quote the text")


class StrictLoader(yaml.SafeLoader):
    """The one YAML reader of the tool's settings, ``yaml.SafeLoader`` refusing what reads
    surprisingly: anchors and aliases (a kilobyte of them expands to gigabytes, or loops
    forever), merge keys, a key given twice in one mapping (the later would silently replace
    the earlier) and the YAML 1.1 scalars YAML 1.2 reads otherwise: ``010`` (octal 8),
    ``1:30`` (base 60, 90), ``1_000`` and the booleans yes/no/on/off. Dates stay text."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            _refuse(
                event,
                "anchors and aliases (&name, *name) are not read here; write each value out",
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                _refuse(key_node, "merge keys (<<) are not read here; write the settings out")
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key is refused below
                if key in seen:
                    _refuse(
                        key_node,
                        f"{shown(key)} is given twice in one mapping, and the second would "
                        "silently replace the first; give it once",
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_strict_int(self, node: Any) -> int:
        value = self.construct_yaml_int(node)
        _refuse_yaml11_number(node, value)
        text = node.value
        digits = text.lstrip("+-")
        if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
            problem = f"{text} is the octal number {value} to YAML 1.1, {int(text)} to YAML 1.2"
            _refuse(node, f"{problem}; write it without the leading zero, or quote the text")
        return value

    def construct_strict_float(self, node: Any) -> float:
        value = self.construct_yaml_float(node)
        _refuse_yaml11_number(node, value)
        return value

    def construct_strict_bool(self, node: Any) -> bool:
        value = self.construct_yaml_bool(node)
        text = node.value
        if text.lower() not in ("true", "false"):
            problem = f"{text} is {str(value).lower()} to YAML 1.1, text to YAML 1.2"
            _refuse(node, f"{problem}; write true or false, or quote the text")
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_strict_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_strict_float)
StrictLoader.add_constructor("tag:yaml.org,2002:bool", StrictLoader.construct_strict_bool)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_str)


def _parse_yaml(text: str, what: str, *, in_file: bool = False) -> Any:
    """``text`` read by :class:`StrictLoader`, or a :class:`ConfigError` naming ``what`` (the
    file or the override), and the line ``in_file``, for text that is no YAML, that the
    strict loader refuses or that nests too deeply for the parser."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _Refused as err:
        where = f", line {err.problem_mark.line + 1}" if in_file else ""
        raise ConfigError(f"{what}{where}: {err.problem}") from err
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
    loaded = _parse_yaml(text, f"config file {path}", in_file=True)
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
        what = f"the value of override {shown(item)}"
        parsed = _parse_yaml(raw, what) if raw.strip() else None
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
