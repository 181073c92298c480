"""Sampling speed: codes per second and seconds per 64 samples of 32x16 codes, with and
without the transformer's key/value cache, for the masked prior (its default decoding steps)
and for the gated PixelCNN, in one run.

Priors are built at the default configuration (a trained prior costs the same per code; pass
--prior to time one). Uncached sampling recomputes the whole prefix for every code, so it is
timed on fewer maps (--uncached-samples, --pixelcnn-samples) and scaled to 64: each forward
then already holds thousands of positions, so the cost per map is close to a batch of 64's.

    python benchmarks/sampling.py --out benchmarks/results/sampling
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mri_vqvae.checkpoint import build_prior_model, load_prior_checkpoint
from mri_vqvae.config import PriorConfig, SampleConfig
from mri_vqvae.generate.sampling import sample_codes, sampling_precision
from mri_vqvae.model.prior import build_prior
from quality import add_precision_option, cpu_name


def time_sampling(prior, count: int, use_cache: bool, precision: str) -> float:
    settings = SampleConfig(use_cache=use_cache, batch_size=count, precision=precision)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    sample_codes(prior, count, settings, generator=generator)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=2, default=[32, 16], metavar=("H", "W"))
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--uncached-samples", type=int, default=16)
    parser.add_argument("--pixelcnn-samples", type=int, default=4)
    parser.add_argument("--prior", type=Path, help="time this trained prior's transformer")
    add_precision_option(parser, "sample.precision")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling"))
    options = parser.parse_args()
    torch.manual_seed(0)
    grid, num_embeddings = tuple(options.grid), options.num_embeddings
    if options.prior is not None:
        # The prior as sampling uses it: its moving-average weights, where the run kept them.
        transformer = build_prior_model(load_prior_checkpoint(options.prior), options.prior)
        grid, num_embeddings = tuple(transformer.grid_shape), transformer.num_embeddings
    else:
        transformer = build_prior(PriorConfig(), num_embeddings, grid)
    masked = build_prior(replace(PriorConfig(), architecture="masked"), num_embeddings, grid)
    pixelcnn = build_prior(replace(PriorConfig(), architecture="pixelcnn"), num_embeddings, grid)
    codes_per_map = grid[0] * grid[1]
    runs = [
        ("transformer, KV cache", transformer, True, options.samples),
        ("transformer, no cache", transformer, False, options.uncached_samples),
        (f"masked, {SampleConfig().decoding_steps} steps", masked, False, options.samples),
        ("gated PixelCNN (no cache)", pixelcnn, False, options.pixelcnn_samples),
    ]
    rows = []
    for name, prior, use_cache, count in runs:
        prior.eval()
        seconds = time_sampling(prior, count, use_cache, options.precision)
        per_64 = seconds * 64 / count
        rows.append(
            {
                "prior": name,
                "parameters": sum(p.numel() for p in prior.parameters()),
                "precision": sampling_precision(prior, options.precision, torch.device("cpu")),
                "maps_timed": count,
                "seconds_timed": seconds,
                "seconds_per_64": per_64,
                "codes_per_second": count * codes_per_map / seconds,
            }
        )
    cached = rows[0]["seconds_per_64"]
    print(
        f"{grid[0]}x{grid[1]} codes per map, {num_embeddings} codes, sample.precision "
        f"{options.precision}"
    )
    print(
        f"{'prior':28} {'precision':>9} {'maps timed':>10} {'s timed':>8} {'s per 64':>9} "
        f"{'codes/s':>9} {'x':>6}"
    )
    for row in rows:
        row["slowdown_vs_cached"] = row["seconds_per_64"] / cached
        print(
            f"{row['prior']:28} {row['precision']:>9} {row['maps_timed']:10d} "
            f"{row['seconds_timed']:8.1f} "
            f"{row['seconds_per_64']:9.1f} {row['codes_per_second']:9.0f} "
            f"{row['slowdown_vs_cached']:6.1f}"
        )
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": str(torch.__version__),
        "command": "python " + " ".join(sys.argv),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": options.precision,
        "grid": list(grid),
        "rows": rows,
    }
    (options.out / "sampling.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {options.out / 'sampling.json'}")


if __name__ == "__main__":
    main()
