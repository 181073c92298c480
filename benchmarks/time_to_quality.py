"""Quality against wall-clock time: the seed preset, today's default and candidate recipes, side
by side in one run on the same machine, for the VQ-VAE (validation SSIM against seconds) and the
prior (validation bits per code against seconds).

Each VQ-VAE recipe trains for ``--minutes`` (the learning rate annealed by that budget, as a
user's ``--max-minutes`` run does), then scores its best checkpoint on the test split. The table
gives, per recipe, the minute its validation SSIM first reached: the seed preset's figure at the
end of the budget, 0.90, 0.93, and today's default's figure at ``--reference-minute``. Then
each prior recipe trains for ``--prior-minutes`` on the codes of the default VQ-VAE trained
above, and the table gives the minute each first reached the default prior's final validation
bits per code. Plots: ``time_to_quality_<dataset>.png``.

    python benchmarks/time_to_quality.py --datasets mni phantom --minutes 20 --prior-minutes 8

Candidates: ``--candidate NAME section.key=value ...`` (repeatable) adds a VQ-VAE recipe (the
default with those settings); ``--prior-candidate`` the same for the prior. Without any, the
candidates are the ones issue 17 measured (below). Needs the benchmark extras for MNI (nilearn).
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
from mri_vqvae import workflows
from mri_vqvae.config import DataConfig, load_config
from mri_vqvae.data.dataset import load_splits, resolve_split_files
from mri_vqvae.errors import UserError
from mri_vqvae.evaluate.split import evaluate_split
from mri_vqvae.protocol import PROTOCOLS
from mri_vqvae.trained import TrainedVQVAE
from quality import add_precision_option, cpu_name, recipe_config, value_at_minute, write_dataset

# Less work at full resolution: the finest level at 16 channels instead of 32 (widths 16, 64,
# 128), which train_step spends about a quarter of its time on (benchmarks/breakdown.py).
VQVAE_CANDIDATES = {"narrow-fine": ["model.channels=16", "model.channel_multipliers=[1, 4, 8]"]}
# The prior's default has 4 blocks since this benchmark measured them against 6; the old
# default stays beside it.
PRIOR_CANDIDATES = {"6 layers": ["prior.num_layers=6"]}
THRESHOLDS = (0.90, 0.93)


def first_minute(history: list[dict], column: str, target: float, lower: bool = False):
    """The minute (elapsed, validation included) the first epoch reached ``target``."""
    for row in history:
        value = row[column]
        if (value <= target) if lower else (value >= target):
            return round(row["elapsed_seconds"] / 60, 2)
    return None


def train_vqvae_recipe(name: str, overrides: list[str], root: Path, out: Path, options) -> dict:
    # quality.py's recipe settings: the seed preset, or the 8x default with the candidate's
    # overrides, ended by the time budget, in --precision (by default the one the tool picks).
    recipe = "seed" if name == "seed" else "default"
    config = recipe_config(recipe, 8, options.minutes, options.precision, overrides)
    started = time.monotonic()
    result = workflows.train_vqvae_run(out, workflows.DataSources(root=root), config)
    seconds = time.monotonic() - started
    model = TrainedVQVAE.load(result.best_checkpoint, torch.device("cpu")).model
    test = load_splits(
        resolve_split_files(root), replace(DataConfig(), image_size=(256, 128)), ("test",)
    )["test"]
    evaluation = evaluate_split(model, test, batch_size=32, protocol=PROTOCOLS["frozen-v3"])
    summary = evaluation.summary("test")
    history = [
        {k: row[k] for k in ("epoch", "elapsed_seconds", "images_seen", "val_ssim")}
        for row in result.history
    ]
    return {
        "recipe": name,
        "overrides": overrides,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 1),
        "images_per_second": round(history[-1]["images_seen"] / history[-1]["elapsed_seconds"], 1),
        "history": history,
        "best_checkpoint": str(result.best_checkpoint),
        "test": {
            key: getattr(summary, key)
            for key in ("ssim_mean", "foreground_ssim_mean", "psnr_mean", "codebook_usage")
        },
    }


def train_prior_recipe(
    name: str, overrides: list[str], *, vqvae: str, root: Path, out: Path, options
) -> dict:
    config = load_config(
        None,
        [
            "prior_train.epochs=100000",
            f"prior_train.max_minutes={options.prior_minutes}",
            f"prior_train.precision={options.precision}",
            "prior_train.sample_every=0",
            *overrides,
        ],
    )
    result = workflows.train_prior_run(out, vqvae, workflows.DataSources(root=root), config)
    history = [
        {k: row[k] for k in ("epoch", "elapsed_seconds", "val_nll_bits")}
        for row in result.fit.history
    ]
    return {"recipe": name, "overrides": overrides, "history": history}


def vqvae_table(rows: list[dict], options) -> tuple[str, dict]:
    seed = next((r for r in rows if r["recipe"] == "seed"), None)
    default = next((r for r in rows if r["recipe"] == "default"), None)
    targets: dict[str, float] = {}
    if seed is not None:
        targets[f"seed's {options.minutes:g}-min"] = seed["history"][-1]["val_ssim"]
    for threshold in THRESHOLDS:
        targets[f"{threshold:.2f}"] = threshold
    if default is not None:
        reference = value_at_minute(default["history"], "val_ssim", options.reference_minute)
        if reference is not None:
            targets[f"default's {options.reference_minute:g}-min"] = reference
    header = "| recipe | params | img/s | " + " | ".join(
        f"min to {name} ({value:.3f})" for name, value in targets.items()
    )
    header += " | test SSIM | fg SSIM | PSNR dB |"
    lines = [header, "|" + "---|" * (6 + len(targets))]
    for row in rows:
        reached = [first_minute(row["history"], "val_ssim", value) for value in targets.values()]
        row["minutes_to"] = dict(zip(targets, reached, strict=True))
        test = row["test"]
        lines.append(
            f"| {row['recipe']} | {row['parameters'] / 1e6:.2f}M | {row['images_per_second']} | "
            + " | ".join("-" if m is None else f"{m:.1f}" for m in reached)
            + f" | {test['ssim_mean']:.4f} | {test['foreground_ssim_mean']:.4f} | "
            f"{test['psnr_mean']:.2f} |"
        )
    return "\n".join(lines), targets


def prior_table(rows: list[dict]) -> str:
    target = rows[0]["history"][-1]["val_nll_bits"] if rows else None
    best = {r["recipe"]: min(h["val_nll_bits"] for h in r["history"]) for r in rows}
    lines = [
        "| prior recipe | epochs | best val bits/code | "
        f"min to the default's final ({target:.3f}) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        reached = first_minute(row["history"], "val_nll_bits", target, lower=True)
        row["minutes_to_default_final"] = reached
        lines.append(
            f"| {row['recipe']} | {len(row['history'])} | {best[row['recipe']]:.3f} | "
            f"{'-' if reached is None else f'{reached:.1f}'} |"
        )
    return "\n".join(lines)


def plot(dataset: str, vqvae_rows: list[dict], targets: dict, prior_rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in vqvae_rows:
        minutes = [h["elapsed_seconds"] / 60 for h in row["history"]]
        left.plot(minutes, [h["val_ssim"] for h in row["history"]], label=row["recipe"])
    for name, value in targets.items():
        left.axhline(value, color="grey", linewidth=0.6, linestyle=":")
        left.annotate(name, (0, value), fontsize=7, color="grey", va="bottom")
    floor = min(
        min(h["val_ssim"] for h in r["history"][len(r["history"]) // 4 :]) for r in vqvae_rows
    )
    left.set(xlabel="minutes", ylabel="validation SSIM", title=f"{dataset}: VQ-VAE")
    left.set_ylim(max(floor - 0.02, 0), None)
    left.legend()
    for row in prior_rows:
        minutes = [h["elapsed_seconds"] / 60 for h in row["history"]]
        right.plot(minutes, [h["val_nll_bits"] for h in row["history"]], label=row["recipe"])
    right.set(xlabel="minutes", ylabel="validation bits per code", title=f"{dataset}: prior")
    if prior_rows:
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mni", "phantom"])
    parser.add_argument("--minutes", type=float, default=20.0, help="VQ-VAE budget per recipe")
    parser.add_argument("--prior-minutes", type=float, default=8.0, help="prior budget; 0 skips")
    parser.add_argument("--reference-minute", type=float, default=8.0)
    parser.add_argument("--no-seed", action="store_true", help="leave the seed preset out")
    parser.add_argument("--candidate", nargs="+", action="append", metavar="NAME OVERRIDE")
    parser.add_argument("--prior-candidate", nargs="+", action="append", metavar="NAME OVERRIDE")
    add_precision_option(parser, "every recipe's training precision")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_quality"))
    options = parser.parse_args()
    given = {c[0]: c[1:] for c in options.candidate} if options.candidate else None
    options.vqvae_recipes = {} if options.no_seed else {"seed": []}
    options.vqvae_recipes.update({"default": [], **(given or VQVAE_CANDIDATES)})
    given = {c[0]: c[1:] for c in options.prior_candidate} if options.prior_candidate else None
    options.prior_recipes = {"default": [], **(given or PRIOR_CANDIDATES)}
    return options


def main() -> None:
    options = parse_options()
    report = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": options.precision,
        "command": "python benchmarks/time_to_quality.py " + " ".join(sys.argv[1:]),
        "datasets": {},
    }
    for dataset in options.datasets:
        root = options.out / "data" / dataset
        if not root.exists():
            print(f"{dataset}: writing slices to {root}: {write_dataset(dataset, root)}")
        entry = report["datasets"][dataset] = {"vqvae": [], "prior": []}
        for name, overrides in options.vqvae_recipes.items():
            run = options.out / "runs" / dataset / name.replace(" ", "_")
            print(f"[{dataset}] VQ-VAE {name}: {options.minutes} min ...", flush=True)
            entry["vqvae"].append(train_vqvae_recipe(name, overrides, root, run, options))
            (options.out / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")
        text, targets = vqvae_table(entry["vqvae"], options)
        print(f"\n## {dataset}: VQ-VAE, {options.minutes:g} min per recipe\n\n{text}\n", flush=True)
        vqvae = next(r for r in entry["vqvae"] if r["recipe"] == "default")["best_checkpoint"]
        for name, overrides in options.prior_recipes.items() if options.prior_minutes else ():
            run = options.out / "runs" / dataset / f"prior_{name.replace(' ', '_')}"
            print(f"[{dataset}] prior {name}: {options.prior_minutes} min ...", flush=True)
            entry["prior"].append(
                train_prior_recipe(
                    name, overrides, vqvae=vqvae, root=root, out=run, options=options
                )
            )
            (options.out / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")
        if entry["prior"]:
            print(f"## {dataset}: prior\n\n{prior_table(entry['prior'])}\n", flush=True)
        (options.out / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(
            dataset,
            entry["vqvae"],
            targets,
            entry["prior"],
            options.out / f"time_to_quality_{dataset}.png",
        )


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # an existing run folder, bad data: one line, as the CLI does
        raise SystemExit(f"time_to_quality: {err}") from None
