"""Encoding time and sense of augmented code maps (issue 15): ``code_maps_for`` on N training
slices with 0, 2 and 4 augmented copies each, with a trained VQ-VAE.

For each copy count it reports the seconds to encode (a fresh cache each time), and for the
copies the share of code positions that differ from the plain map of the same slice, beside
two yardsticks: the share that differs between neighbouring slices of one volume and between
unrelated slices. Copies should sit well above 0 (they add something) and well below the
unrelated share (they are still the same anatomy). It also reports how well the codes of the
augmented images reconstruct them (SSIM), against the plain images' own, and the share of
codes that one change alone alters (a 1-pixel shift, a 1-degree turn, ...).

    python benchmarks/augment_encoding.py --vqvae runs/demo/best.pt --data demo_data --slices 64
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mri_vqvae.code_maps import code_maps_for
from mri_vqvae.config import AugmentConfig, DataConfig
from mri_vqvae.data.augment import AUGMENTATION_PARAMETERS, SHIFT_UNIT, apply_augmentations
from mri_vqvae.data.dataset import load_split, resolve_split_files
from mri_vqvae.metrics import ssim_per_image
from mri_vqvae.runtime import resolve_precision
from mri_vqvae.trained import TrainedVQVAE


def differing_share(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(first.ne(second).float().mean())


def reconstruction_ssim(model, images: torch.Tensor) -> float:
    with torch.no_grad():
        decoded = model.decode_indices(model.encode_to_indices(images))
    return float(ssim_per_image(images, decoded).mean())


def single_changes(height: int) -> dict[str, dict[str, float]]:
    """One component at a time, in the parameter vector's units."""
    return {
        "shift 0.5 px": {"shift_y": 0.5 / height / SHIFT_UNIT},
        "shift 1 px": {"shift_y": 1 / height / SHIFT_UNIT},
        "turn 1 degree": {"rotation": 0.2},
        "turn 4 degrees": {"rotation": 0.8},
        "zoom 1.02": {"log_scale": 0.396},
        "gamma 1.05": {"log_gamma": 0.325},
        "gamma 1.16": {"log_gamma": 1.0},
        "contrast 1.05": {"contrast": 0.5},
    }


def changed_by_one_change(model, images: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    shares = {}
    with torch.no_grad():
        noisy = images + 0.01 * torch.randn(
            images.shape, generator=torch.Generator().manual_seed(0)
        )
        shares["gaussian noise, std 0.01"] = differing_share(model.encode_to_indices(noisy), plain)
        for label, values in single_changes(images.shape[-2]).items():
            parameters = torch.zeros((len(images), len(AUGMENTATION_PARAMETERS)))
            for name, value in values.items():
                parameters[:, AUGMENTATION_PARAMETERS.index(name)] = value
            changed = model.encode_to_indices(apply_augmentations(images, parameters))
            shares[label] = differing_share(changed, plain)
    return {label: round(share, 3) for label, share in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vqvae", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a HipMRI-layout root")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--copies", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    vqvae = TrainedVQVAE.load(args.vqvae, device)
    model = vqvae.model
    files = resolve_split_files(args.data)["train"][: args.slices]
    with tempfile.TemporaryDirectory() as scratch:
        data = vqvae.data_settings(DataConfig(cache_dir=scratch))
        slices = load_split(files, data, label="train")
        results: dict = {
            "slices": len(slices),
            "image_size": list(slices.image_size),
            "precision": resolve_precision("auto", device),
            "threads": args.threads,
            "machine": platform.processor() or platform.machine(),
            "runs": [],
        }
        for copies in args.copies:
            augment = AugmentConfig(copies=copies)
            start = time.perf_counter()
            codes = code_maps_for(
                slices,
                vqvae=vqvae,
                cache_file=Path(scratch) / f"codes-{copies}.pt",
                augment=augment,
            )
            seconds = time.perf_counter() - start
            run = {"copies": copies, "maps": len(codes), "seconds": round(seconds, 2)}
            run["changed_share_by_copy"] = [round(s, 3) for s in codes.changed_share_by_copy()]
            results["runs"].append(run)
            if copies:
                rows = slice(len(slices), 2 * len(slices))  # the first copy
                changed = apply_augmentations(
                    slices.batch(slice(None)), codes.augmentation_parameters[rows]
                )
                results["ssim_plain"] = round(
                    reconstruction_ssim(model, slices.batch(slice(None))), 4
                )
                results["ssim_augmented"] = round(reconstruction_ssim(model, changed), 4)
        plain = codes.indices[: len(slices)]
        results["changed_share_neighbouring_slices"] = round(
            differing_share(plain[1:], plain[:-1]), 3
        )
        results["changed_share_unrelated_slices"] = round(
            differing_share(
                plain, plain[torch.randperm(len(plain), generator=torch.Generator().manual_seed(0))]
            ),
            3,
        )
        results["changed_share_by_one_change"] = changed_by_one_change(
            model, slices.batch(slice(None)), plain
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
