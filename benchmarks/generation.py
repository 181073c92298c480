"""Generation quality: train a prior on a VQ-VAE's codes, draw samples and measure them.

For each dataset: write the data (the phantom with 4 validation and 4 test cases, so 256
held-out slices; or MNI152 slices as in quality.py), train the default VQ-VAE (or take one
with --phantom-vqvae / --mni-vqvae), then for each prior architecture: `train-prior` for a time
budget, `sample` 256 slices at temperature 1 and `evaluate-samples`, all through the real
command line. Prints one table and writes ``generation.json`` under ``--out``.

    python benchmarks/generation.py --datasets phantom mni --prior-minutes 15

Needs the benchmark extras for MNI (nilearn): ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mri_vqvae import workflows
from mri_vqvae.config import Config, load_config
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from quality import cpu_name, write_mni_dataset


def write_data(name: str, root: Path) -> None:
    if (root / "keras_slices_train").is_dir():
        return
    if name == "phantom":
        write_phantom_dataset(root, PhantomSpec(val_cases=4, test_cases=4))
    else:
        write_mni_dataset(root)


def settings(*overrides: str) -> Config:
    return load_config(overrides=list(overrides))


def benchmark(dataset: str, vqvae: Path | None, options: argparse.Namespace) -> list[dict]:
    root = options.out / dataset
    data = root / "data"
    write_data(dataset, data)
    sources = workflows.DataSources(root=data)
    if vqvae is None:
        vqvae_run = root / "vqvae"
        if not (vqvae_run / "best.pt").is_file():
            minutes = f"train.max_minutes={options.vqvae_minutes}"
            config = settings("train.epochs=1000", minutes, "train.precision=bfloat16")
            workflows.train_vqvae_run(vqvae_run, sources, config)
        vqvae = vqvae_run / "best.pt"
    rows = []
    for architecture in options.architectures:
        prior = root / f"prior_{architecture}"
        if not (prior / "prior_summary.json").is_file():
            started = time.monotonic()
            config = settings(
                f"prior.architecture={architecture}",
                "prior_train.epochs=1000",
                f"prior_train.max_minutes={options.prior_minutes}",
                "prior_train.precision=bfloat16",
                "prior_train.sample_every=10",
            )
            workflows.train_prior_run(prior, vqvae, sources, config)
            print(f"prior trained in {time.monotonic() - started:.0f} s")
        samples = root / f"samples_{architecture}"
        if not (samples / "samples.json").is_file():
            config = settings(f"sample.num_samples={options.samples}")
            workflows.sample(vqvae, prior / "best.pt", samples, config)
        workflows.evaluate_samples(samples, sources, overwrite=True)
        summary = json.loads((prior / "prior_summary.json").read_text())
        history = [json.loads(line) for line in (prior / "metrics.jsonl").read_text().splitlines()]
        drawn = json.loads((samples / "samples.json").read_text())
        metrics = json.loads((samples / "evaluation" / "sample_metrics.json").read_text())
        rows.append(
            {
                "dataset": dataset,
                "architecture": architecture,
                "vqvae": str(vqvae),
                "prior_epochs": len(history),
                "prior_best_epoch": summary["best_epoch"],
                "val_nll_bits": summary["val_nll_bits"],
                "val_unigram_bits": summary["val_unigram_bits"],
                "nll_below_unigram": 1 - summary["val_nll_bits"] / summary["val_unigram_bits"],
                "test_nll_bits": summary["test_nll_bits"],
                "sampling_seconds": drawn["sampling_seconds"],
                "num_samples": drawn["num_samples"],
                **{key: value for key, value in metrics.items() if key != "settings"},
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'dataset':8} {'prior':12} {'val bits':>8} {'unigram':>8} {'below':>6} "
        f"{'C2ST train':>16} {'null':>6} {'shift':>6} {'C2ST real':>9} {'KID/null':>8} "
        f"{'>0.95':>6} {'div/real':>8} {'div/recon':>9} {'JSD':>7} {'s/256':>6}"
    )
    print(header)
    for row in rows:
        two_sample = row["two_sample"]
        train = two_sample["samples_vs_train_reconstructions"]
        ratio = row["kid"]["random_cnn"]["ratio_to_null"]
        print(
            f"{row['dataset']:8} {row['architecture']:12} {row['val_nll_bits']:8.3f} "
            f"{row['val_unigram_bits']:8.3f} {100 * row['nll_below_unigram']:5.1f}% "
            f"{train['accuracy']:.3f} [{train['ci95_low']:.2f},{train['ci95_high']:.2f}] "
            f"{two_sample['null_train_halves']['accuracy']:6.3f} "
            f"{two_sample['shift_train_vs_held_out_reconstructions']['accuracy']:6.3f} "
            f"{two_sample['samples_vs_held_out_real']['accuracy']:9.3f} "
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>8} "
            f"{100 * row['share_samples_above_0.95']:5.1f}% {row['diversity_ratio']:8.2f} "
            f"{row['diversity_ratio_vs_reconstructions']:9.2f} "
            f"{row['code_js_divergence_bits']:7.4f} {row['sampling_seconds']:6.1f}"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["phantom", "mni"])
    parser.add_argument("--architectures", nargs="+", default=["transformer"])
    parser.add_argument("--vqvae-minutes", type=float, default=8.0)
    parser.add_argument("--prior-minutes", type=float, default=15.0)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--phantom-vqvae", type=Path, help="reuse this VQ-VAE for the phantom")
    parser.add_argument("--mni-vqvae", type=Path, help="reuse this VQ-VAE for MNI slices")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation"))
    options = parser.parse_args()
    given = {"phantom": options.phantom_vqvae, "mni": options.mni_vqvae}
    rows = []
    for dataset in options.datasets:
        rows += benchmark(dataset, given.get(dataset), options)
    print_table(rows)
    options.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": str(torch.__version__),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    (options.out / "generation.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {options.out / 'generation.json'}")


if __name__ == "__main__":
    main()
