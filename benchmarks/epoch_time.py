"""One epoch at HipMRI size, end to end: 11460 phantom training slices (and 660 validation
slices) at 256x128, from NIfTI files on disk to a validated checkpoint.

Measured in one run, side by side:
  decode      the first read of the NIfTI files into the in-memory float16 split
  cache load  a later run's read of the same split from the disk cache
  data path   drawing one epoch of shuffled batches of 32: this project's path (index
              into the float16 split tensor) against the conventional one (a per-item
              Dataset with per-item preprocessing, as the seed wrote it, batched by a
              torch DataLoader with 0 and 2 worker processes)
  epoch       ``train_vqvae`` for one epoch (training and validation, pictures and
              checkpoints included) for each recipe
  encode      every training slice to its code indices with the trained model

The phantom is written once to ``--data`` (about 6 minutes and 1.5 GB; not timed) and reused.

    python benchmarks/epoch_time.py --out benchmarks/results/epoch_time
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mri_vqvae.code_maps import encode_slices
from mri_vqvae.config import load_config
from mri_vqvae.data.dataset import load_splits, preprocess, resolve_split_files
from mri_vqvae.data.nifti import read_slice
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from mri_vqvae.model import VQVAE
from mri_vqvae.runtime import keep_freed_memory, resolve_device, seed_everything
from mri_vqvae.train.vqvae import train_vqvae

sys.path.insert(0, str(Path(__file__).parent))
from throughput import run_facts

# 191 cases x 2 weeks x 30 slices = 11460 train; 11 cases = 660 val; 9 cases = 540 test.
HIPMRI_SIZE = PhantomSpec(train_cases=191, val_cases=11, test_cases=9, weeks=2, slices=30)


class PerItemSlices(Dataset):
    """The seed's data path: decoded slices kept as arrays, preprocessed item by item."""

    def __init__(self, pixels: list, size: tuple[int, int]) -> None:
        self.pixels, self.size = pixels, size

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess(self.pixels[index], self.size)


def ensure_phantom(root: Path) -> Path:
    marker = root / "complete.json"
    if not marker.exists():
        print(f"writing the HipMRI-sized phantom to {root} (once)...", flush=True)
        counts = write_phantom_dataset(root, HIPMRI_SIZE)
        marker.write_text(json.dumps(counts))
    return root


def time_data_paths(train, files, size, device, batch_size: int = 32) -> dict:
    """Seconds to draw one epoch of shuffled batches (on ``device``) per data path."""
    results = {}
    images = train.images.to(device)
    order = torch.randperm(len(train)).to(device)
    start = time.perf_counter()
    for first in range(0, len(train), batch_size):
        batch = images[order[first : first + batch_size]].float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results["split tensor, by index"] = time.perf_counter() - start
    del batch
    pixels = [read_slice(path).pixels for path in files]
    for workers in (0, 2):
        loader = DataLoader(
            PerItemSlices(pixels, size), batch_size=batch_size, shuffle=True, num_workers=workers
        )
        start = time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results[f"per-item Dataset, DataLoader {workers} workers"] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("benchmarks/results/hipmri_phantom"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--recipes", nargs="+", default=["seed", "8x"], choices=["seed", "8x"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/epoch_time"))
    args = parser.parse_args()
    keep_freed_memory()
    device = resolve_device(args.device)
    root = ensure_phantom(args.data)
    files = resolve_split_files(root)
    report = {
        **run_facts(device),
        "slices": {split: len(paths) for split, paths in files.items()},
    }
    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(overrides=[f"data.cache_dir={scratch}/cache"])
        start = time.perf_counter()
        splits = load_splits(files, config.data, splits=("train", "val"))
        report["decode_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        splits = load_splits(files, config.data, splits=("train", "val"))
        report["cache_load_seconds"] = time.perf_counter() - start
        print(
            f"decode {report['decode_seconds']:.1f} s, cache load "
            f"{report['cache_load_seconds']:.1f} s",
            flush=True,
        )
        report["data_path_seconds"] = time_data_paths(
            splits["train"], files["train"], config.data.image_size, device
        )
        for name, seconds in report["data_path_seconds"].items():
            print(f"one epoch of batches, {name}: {seconds:.2f} s", flush=True)

        report["epochs"] = {
            recipe: time_recipe(recipe, splits=splits, scratch=Path(scratch), device=device)
            for recipe in args.recipes
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "epoch_time.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'epoch_time.json'}")


def time_recipe(recipe: str, *, splits: dict, scratch: Path, device: torch.device) -> dict:
    """One epoch of ``recipe`` by ``train_vqvae`` end to end, then every training slice
    encoded by the trained model."""
    config = load_config(
        preset=recipe,
        overrides=[f"data.cache_dir={scratch}/cache", "train.epochs=1"],
    )
    seed_everything(0)
    model = VQVAE.from_config(config.model)
    start = time.perf_counter()
    result = train_vqvae(
        model,
        train_set=splits["train"],
        val_set=splits["val"],
        config=config,
        run_dir=scratch / recipe,
        device=device,
    )
    wall = time.perf_counter() - start
    row = result.history[-1]
    start = time.perf_counter()
    codes = encode_slices(model, splits["train"], device)
    encode_seconds = time.perf_counter() - start
    precision = result_precision(scratch / recipe)
    print(
        f"{recipe}: one epoch {wall:.1f} s end to end ({precision}), val SSIM "
        f"{row['val_ssim']:.4f}; encoding {len(codes)} slices {encode_seconds:.1f} s",
        flush=True,
    )
    return {
        "wall_seconds": wall,
        "epoch_seconds": row["epoch_seconds"],
        "images_per_second_with_validation": len(splits["train"]) / row["epoch_seconds"],
        "val_ssim": row["val_ssim"],
        "precision": precision,
        "encode_seconds": encode_seconds,
        "encoded_shape": list(codes.shape),
    }


def result_precision(run_dir: Path) -> str:
    """The precision the run resolved ``auto`` to, as its saved config records it."""
    return load_config(run_dir / "config.yaml").train.precision


if __name__ == "__main__":
    main()
