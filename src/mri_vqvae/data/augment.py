"""Distribution augmentation (Jun et al. 2020): random small changes of a slice, described by
a parameter vector the prior is conditioned on.

A parameter vector has one component per name in :data:`AUGMENTATION_PARAMETERS`, each in
fixed units chosen so that the default ranges give values within about [-1, 1] (the prior
feeds the vector through a linear layer). The units do not depend on the settings, so a
vector means the same change whatever ranges drew it. All zeros is the identity: such rows
are returned untouched, so an unaugmented map is exactly the plain one.

Images are ``(N, 1, H, W)`` in [-1, 1]. Axis conventions: ``y`` runs down the rows (the first
image axis, left-right in HipMRI's storage and the phantom's), ``x`` along the columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mri_vqvae.config import AugmentConfig

AUGMENTATION_PARAMETERS: tuple[str, ...] = (
    "shift_y",  # content moved down the rows, in units of SHIFT_UNIT of the height
    "shift_x",  # content moved along the columns, in units of SHIFT_UNIT of the width
    "rotation",  # turn about the centre from +x towards +y, in units of ROTATION_UNIT degrees
    "log_scale",  # natural log of the zoom factor, in units of LOG_SCALE_UNIT
    "log_gamma",  # natural log of the gamma applied to [0, 1] intensities, in LOG_GAMMA_UNIT
    "contrast",  # contrast factor about the mean minus 1, in units of CONTRAST_UNIT
    "flip",  # 1: mirrored along the first image axis (left-right) before the rest; 0: not
)
# Bump when a parameter vector's meaning or the way it is applied changes: cached augmented
# code maps carry it in their stamp.
AUGMENT_FORMAT = 1

# Fixed units, about the default ranges (config.AugmentConfig), so defaults stay in [-1, 1].
SHIFT_UNIT = 0.05
ROTATION_UNIT = 5.0
LOG_SCALE_UNIT = 0.05
LOG_GAMMA_UNIT = 0.15
CONTRAST_UNIT = 0.1

_INDEX = {name: i for i, name in enumerate(AUGMENTATION_PARAMETERS)}
_GEOMETRIC = [_INDEX[n] for n in ("shift_y", "shift_x", "rotation", "log_scale")]
_INTENSITY = [_INDEX[n] for n in ("log_gamma", "contrast")]


def parameter_limits(config: AugmentConfig) -> torch.Tensor:
    """The largest absolute value :func:`sample_augmentations` gives each component,
    ``(len(AUGMENTATION_PARAMETERS),)`` float32."""
    limits = {
        "shift_y": config.max_shift / SHIFT_UNIT,
        "shift_x": config.max_shift / SHIFT_UNIT,
        "rotation": config.max_rotation_degrees / ROTATION_UNIT,
        "log_scale": math.log1p(config.max_scale) / LOG_SCALE_UNIT,
        "log_gamma": math.log1p(config.max_gamma) / LOG_GAMMA_UNIT,
        "contrast": config.max_contrast / CONTRAST_UNIT,
        "flip": 1.0 if config.flip_left_right else 0.0,
    }
    return torch.tensor([limits[name] for name in AUGMENTATION_PARAMETERS], dtype=torch.float32)


def sample_augmentations(
    count: int, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """``count`` random parameter vectors, ``(count, len(AUGMENTATION_PARAMETERS))`` float32:
    every continuous component uniform within the configured range, a flip with probability
    1/2 only where ``config.flip_left_right`` allows it."""
    draws = torch.rand((count, len(AUGMENTATION_PARAMETERS)), generator=generator)
    parameters = (draws * 2 - 1) * parameter_limits(config)
    flip = _INDEX["flip"]
    # Drawn even when flips are off, so turning them on changes no other component's draws.
    parameters[:, flip] = (draws[:, flip] < 0.5).float() if config.flip_left_right else 0.0
    return parameters


def apply_augmentations(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, 1, H, W)`` in [-1, 1] changed as ``parameters`` ``(N, A)`` say: flip,
    then zoom, turn and shift (bilinear; what comes in from outside is the image's minimum,
    the background), then gamma and contrast on [0, 1] intensities. Rows whose parameters are
    all zero are returned bit-identical."""
    if parameters.shape != (images.shape[0], len(AUGMENTATION_PARAMETERS)):
        raise ValueError(
            f"parameters of shape {tuple(parameters.shape)} do not fit images of shape "
            f"{tuple(images.shape)}: need ({images.shape[0]}, {len(AUGMENTATION_PARAMETERS)})"
        )
    parameters = parameters.to(device=images.device, dtype=torch.float32)
    result = images.clone()
    # Each part touches only the rows it changes, so a pure shift is not also rounded
    # through the intensity transform, and the identity is exact.
    flipped = parameters[:, _INDEX["flip"]] > 0.5
    if flipped.any():
        result[flipped] = result[flipped].flip(-2)
    moved = parameters[:, _GEOMETRIC].ne(0).any(dim=1)
    if moved.any():
        result[moved] = _transform_geometry(result[moved], parameters[moved])
    recoloured = parameters[:, _INTENSITY].ne(0).any(dim=1)
    if recoloured.any():
        result[recoloured] = _transform_intensity(result[recoloured], parameters[recoloured])
    return result


def _transform_geometry(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Zoom, turn and shift about the image centre, in pixels (so a turn stays a turn on a
    non-square image)."""
    height, width = images.shape[-2:]
    shift_y = parameters[:, _INDEX["shift_y"]] * SHIFT_UNIT
    shift_x = parameters[:, _INDEX["shift_x"]] * SHIFT_UNIT
    angle = torch.deg2rad(parameters[:, _INDEX["rotation"]] * ROTATION_UNIT)
    scale = torch.exp(parameters[:, _INDEX["log_scale"]] * LOG_SCALE_UNIT)
    # affine_grid maps each output position to the input position it reads, in coordinates
    # normalised to [-1, 1] per side: the inverse of "zoom, turn, then shift". In pixels that
    # is R(-angle) (out - shift) / scale; normalised, D^-1 R(-angle) D with D = (W/2, H/2).
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    aspect = width / height
    theta = torch.zeros((images.shape[0], 2, 3), dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin / aspect
    theta[:, 1, 0] = -sin * aspect
    theta[:, 1, 1] = cos
    # A shift by a fraction f of a side is 2f in normalised coordinates.
    offset = torch.stack([shift_x * 2, shift_y * 2], dim=1)
    theta[:, :, 2] = -(theta[:, :, :2] @ offset[:, :, None])[:, :, 0]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample fills from outside with zeros: sample the distance from the minimum so the
    # fill is the image's own background.
    floor = images.amin(dim=(1, 2, 3), keepdim=True)
    sampled = F.grid_sample(
        images - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled + floor


def _transform_intensity(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Gamma on [0, 1] intensities, then contrast scaled about each image's mean, clamped."""
    gamma = torch.exp(parameters[:, _INDEX["log_gamma"]] * LOG_GAMMA_UNIT).view(-1, 1, 1, 1)
    contrast = (1 + parameters[:, _INDEX["contrast"]] * CONTRAST_UNIT).view(-1, 1, 1, 1)
    unit = ((images + 1) / 2).clamp(0, 1) ** gamma
    mean = unit.mean(dim=(1, 2, 3), keepdim=True)
    unit = (mean + (unit - mean) * contrast).clamp(0, 1)
    return unit * 2 - 1
