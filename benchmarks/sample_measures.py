"""Time the sample measures of ``evaluate-samples`` on phantom slices, no model needed.

Phantom slices stand in for every set: samples are the training cases' slices in other weeks;
held-out slices are other cases; "reconstructions" are slices smoothed by a 3x3 box filter
(a decoder's loss of fine texture). Times every measure of one evaluation: the two-sample
tests, KID and density/coverage with their nulls and shifts (feature networks included), the
nearest training slice of every sample and held-out slice, and pairwise SSIM. Prints a table
and writes ``sample_measures.json`` under ``--out``.

    python benchmarks/sample_measures.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from mri_vqvae.config import SampleMetricsConfig
from mri_vqvae.data.phantom import case_id, phantom_slice
from mri_vqvae.evaluate.comparisons import ReferenceSets, compare_sets, split_in_halves
from mri_vqvae.evaluate.sample_metrics import mean_pairwise_ssim, nearest_by_ssim
from mri_vqvae.evaluate.samples import as_loaded
from quality import cpu_name

WEEKS, SLICES_PER_VOLUME = 2, 16


def phantom_images(split: str, count: int, first_week: int = 0) -> torch.Tensor:
    """``count`` phantom slices ``(N, 1, 256, 128)`` in [-1, 1], case after case."""
    slices = []
    case = 0
    while len(slices) < count:
        for week in range(first_week, first_week + WEEKS):
            for number in range(SLICES_PER_VOLUME):
                position = number / (SLICES_PER_VOLUME - 1)
                pixels, _ = phantom_slice(0, case_id(split, case), week, position)
                slices.append(torch.from_numpy(np.asarray(pixels, dtype=np.float32)))
        case += 1
    return as_loaded(torch.stack(slices[:count])[:, None])


def smoothed(images: torch.Tensor) -> torch.Tensor:
    return as_loaded(F.avg_pool2d(images, 3, stride=1, padding=1))


def measure(options: argparse.Namespace) -> dict[str, float]:
    train = phantom_images("train", options.train)
    # Samples as a prior that learned the training cases draws them: the training cases'
    # anatomy in other weeks (other filling, shifts and noise), decoded.
    samples = smoothed(phantom_images("train", options.samples, first_week=WEEKS))
    held_out = phantom_images("val", options.held_out)
    settings = SampleMetricsConfig()
    protocol = settings.measures
    started = time.perf_counter()
    reconstructions = smoothed(train)
    half_a, half_b = split_in_halves(len(train), settings.seed)
    held_out_reconstructions = smoothed(held_out)
    sets = ReferenceSets(
        samples=samples,
        samples_as_written=samples,  # untextured samples: the same images either way
        train_half_a=reconstructions[half_a],
        train_half_b=reconstructions[half_b],
        held_out_reconstructions=held_out_reconstructions,
        held_out_real=held_out,
        train_real=train,
    )
    result = compare_sets(sets, protocol, settings.seed)
    seconds = dict(result.seconds_by_measure)
    lap = time.perf_counter()
    train_half = train.half()  # stored as a loaded split is
    nearest_by_ssim(samples, train_half, settings.neighbour_candidates)
    nearest_by_ssim(held_out, train_half, settings.neighbour_candidates)
    seconds["memorisation"] = time.perf_counter() - lap
    lap = time.perf_counter()
    for images in (samples, held_out, held_out_reconstructions):
        mean_pairwise_ssim(images, settings.diversity_pairs, settings.seed)
    seconds["diversity"] = time.perf_counter() - lap
    seconds["total"] = time.perf_counter() - started
    two_sample = result.two_sample
    figures = {
        "samples_vs_train_reconstructions": two_sample.samples_vs_train_reconstructions.accuracy,
        "null_train_halves": two_sample.null_train_halves.accuracy,
        "kid_random_cnn_ratio_to_null": result.kid["random_cnn"].ratio_to_null,
    }
    return {"seconds": seconds, "figures": figures, "trustworthy": two_sample.trustworthy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--train", type=int, default=512, help="training slices (two halves)")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_measures"))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    result = measure(options)
    print(f"{cpu_name()}, {options.threads} threads, torch {torch.__version__}")
    print(
        f"{options.samples} samples, {options.train} training slices "
        f"(halves of {options.train // 2}), {options.held_out} held-out slices, 256x128"
    )
    print(f"{'measure':24} {'seconds':>8}")
    for name, seconds in result["seconds"].items():
        print(f"{name:24} {seconds:8.2f}")
    print(json.dumps(result["figures"]), "trustworthy:", result["trustworthy"])
    options.out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {options.threads} threads",
        "torch": str(torch.__version__),
        "command": "python " + " ".join(sys.argv),
        "sizes": {"samples": options.samples, "train": options.train, "held_out": options.held_out},
        **result,
    }
    (options.out / "sample_measures.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {options.out / 'sample_measures.json'}")


if __name__ == "__main__":
    main()
