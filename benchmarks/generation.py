"""Generation quality against prior training time: the autoregressive and the masked prior side
by side in one run, on the same VQ-VAE's codes, measured by ``evaluate-samples``.

For each dataset: write the data (the phantom with 64 training cases, 2048 training slices, and
4 validation and 4 test cases; or MNI152 slices as in quality.py, with their orientation as a
label in conditions.csv), train the default VQ-VAE (or take one with --phantom-vqvae /
--mni-vqvae), then for each prior architecture train one prior for --prior-minutes, keeping
the prior a user would sample (best.pt as it stands) at each of --marks minutes. Each snapshot
draws --samples slices, which ``evaluate-samples`` scores: two-sample accuracy against
reconstructions of training slices with its null and the shift, KID and density/coverage,
memorisation. Prints one table, writes ``generation.json`` and ``generation.png`` (each measure
against minutes) under ``--out``.

    python benchmarks/generation.py --datasets phantom mni --prior-minutes 15 --marks 1 2 4 8

With ``--augment-copies 0 4 8``, each architecture trains one prior per count of augmented code
maps per training slice (``augment.copies``), on the same data, so their payoff is measured side
by side. ``--slice-position off on`` does the same for conditioning on each slice's position in
its volume (parsed from ``..._slice_<S>`` in the file names).

Then, with ``--sweep``, the sampling controls (temperature, guidance, decoding steps) on the
last snapshot of each prior. Needs the benchmark extras for MNI (nilearn).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mri_vqvae import workflows
from mri_vqvae.checkpoint import Checkpoint, save_checkpoint
from mri_vqvae.config import Config, load_config
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from mri_vqvae.records import to_plain
from mri_vqvae.records.samples import SampleMeasures
from mri_vqvae.train import prior as prior_training
from quality import cpu_name, write_mni_dataset

PHANTOM = PhantomSpec(train_cases=64, val_cases=4, test_cases=4)


def write_data(name: str, root: Path) -> None:
    if (root / "keras_slices_train").is_dir():
        return
    if name == "phantom":
        write_phantom_dataset(root, PHANTOM)
        return
    write_mni_dataset(root)
    # The orientation, from names like mni_axial_slice_083.nii.gz, is a label to condition on.
    rows = [
        f"{path.name},{path.name.split('_')[1]}" for path in sorted(root.glob("keras_slices_*/*"))
    ]
    (root / "conditions.csv").write_text("file,orientation\n" + "\n".join(rows) + "\n")


def settings(*overrides: str) -> Config:
    return load_config(overrides=list(overrides))


class Snapshots:
    """Keeps, when training passes each mark (minutes since the task was made, after encoding),
    the prior a user would sample from had training stopped there: ``best.pt`` as it stands
    (the averaged weights of the epoch with the best validation loss so far), or the current
    averaged weights before the first epoch ends. Wraps PriorTask.after_step. The current
    weights would measure an overfitting prior: on MNI the validation loss rises after about
    5 minutes while best.pt, which ``sample`` is given, stays put."""

    def __init__(self, folder: Path, marks: list[float]) -> None:
        self.folder, self.marks, self.saved = folder, sorted(marks), {}
        self.original = prior_training.PriorTask.after_step
        self.original_init = prior_training.PriorTask.__init__

    def __enter__(self) -> Snapshots:
        snapshots = self

        def init(task, *args, **kwargs):
            snapshots.original_init(task, *args, **kwargs)
            snapshots.started = time.monotonic()

        def after_step(task):
            snapshots.original(task)
            minutes = (time.monotonic() - snapshots.started) / 60
            for mark in snapshots.marks:
                if mark <= minutes and mark not in snapshots.saved:
                    snapshots.save(task, mark)

        prior_training.PriorTask.__init__ = init
        prior_training.PriorTask.after_step = after_step
        return self

    def save(self, task, mark: float) -> None:
        path = self.folder / f"snapshot_{mark:g}min.pt"
        best = self.folder / "best.pt"
        if best.is_file():
            shutil.copyfile(best, path)
        else:
            # The averaged weights are the model's here.
            extras = replace(task.prior_extras(), ema=None).to_plain()
            checkpoint = Checkpoint(
                kind="prior",
                config=task.config,
                model_state=task.evaluated.state_dict(),
                extras=extras,
            )
            save_checkpoint(checkpoint, path)
        self.saved[mark] = path

    def __exit__(self, *exc) -> None:
        prior_training.PriorTask.__init__ = self.original_init
        prior_training.PriorTask.after_step = self.original


def vqvae_for(dataset: str, given: Path | None, root: Path, options) -> Path:
    if given is not None:
        return given
    run = root / "vqvae"
    if not (run / "best.pt").is_file():
        minutes = f"train.max_minutes={options.vqvae_minutes}"
        config = settings("train.epochs=1000", minutes, "train.precision=auto")
        workflows.train_vqvae_run(run, workflows.DataSources(root=root / "data"), config)
    return run / "best.pt"


def variant(architecture: str, copies: int, position: bool = False) -> str:
    """The folder-name part of one prior: its architecture, its augmented copies if any, and
    whether it is conditioned on slice position."""
    name = architecture if copies == 0 else f"{architecture}_{copies}copies"
    return f"{name}_position" if position else name


@dataclass(frozen=True)
class PriorVariant:
    """One prior the benchmark trains: its architecture, its augmented code maps per training
    slice, and whether it is conditioned on slice position."""

    architecture: str
    copies: int
    position: bool

    @property
    def name(self) -> str:
        return variant(self.architecture, self.copies, self.position)

    def folder(self, root: Path) -> Path:
        return root / f"prior_{self.name}"


@dataclass(frozen=True)
class Bench:
    """What every prior of one dataset shares: the dataset's name and folder, its slices, the
    VQ-VAE whose codes the priors model, and the command's options."""

    dataset: str
    root: Path
    sources: workflows.DataSources
    vqvae: Path
    options: argparse.Namespace


def train_with_snapshots(bench: Bench, prior: PriorVariant) -> dict:
    """Train ``prior`` (unless a finished run is there) and return its snapshots by minute,
    the last (``best.pt``) at ``--prior-minutes``."""
    options, folder = bench.options, prior.folder(bench.root)
    overrides = [
        f"prior.architecture={prior.architecture}",
        f"augment.copies={prior.copies}",
        f"prior.condition_on_slice_position={str(prior.position).lower()}",
        "prior_train.epochs=1000",
        f"prior_train.max_minutes={options.prior_minutes}",
        "prior_train.precision=auto",
        "prior_train.sample_every=0",
        *options.prior_overrides,
    ]
    if bench.dataset == "mni":
        overrides.append("prior.condition_labels=[orientation]")
    marks = [m for m in options.marks if m < options.prior_minutes]
    if not (folder / "prior_summary.json").is_file():
        with Snapshots(folder, marks) as snapshots:
            workflows.train_prior_run(
                folder, bench.vqvae, bench.sources, settings(*overrides), overwrite=True
            )
        paths = dict(snapshots.saved)
    else:
        paths = {m: folder / f"snapshot_{m:g}min.pt" for m in marks}
        paths = {m: p for m, p in paths.items() if p.is_file()}
    paths[options.prior_minutes] = folder / "best.pt"
    return paths


def measure(
    bench: Bench, prior: PriorVariant, *, minutes: float, prior_path: Path, sample_settings: dict
) -> dict:
    """Draw ``--samples`` slices from the prior at ``prior_path`` with ``sample_settings`` and
    score them with ``evaluate-samples``."""
    name = "_".join(f"{k}{v}" for k, v in sample_settings.items()) or "defaults"
    samples = bench.root / f"samples_{prior.name}_{minutes:g}min_{name}"
    overrides = [f"sample.{key}={value}" for key, value in sample_settings.items()]
    overrides.append(f"sample.num_samples={bench.options.samples}")
    run = workflows.sample(bench.vqvae, prior_path, samples, settings(*overrides), overwrite=True)
    started = time.monotonic()
    metrics = workflows.evaluate_samples(samples, bench.sources, overwrite=True)
    return {
        "dataset": bench.dataset,
        "architecture": prior.architecture,
        "augment_copies": prior.copies,
        "slice_position": prior.position,
        "minutes": minutes,
        "num_samples": metrics.num_samples,
        "sample_settings": sample_settings,
        "sampling_seconds": run.sampling_seconds,
        "scoring_seconds": time.monotonic() - started,
        "metrics": metrics,
    }


def benchmark(dataset: str, given_vqvae: Path | None, options) -> list[dict]:
    root = options.out / dataset
    write_data(dataset, root / "data")
    sources = workflows.DataSources(root=root / "data")
    vqvae = vqvae_for(dataset, given_vqvae, root, options)
    bench = Bench(dataset=dataset, root=root, sources=sources, vqvae=vqvae, options=options)
    rows = []
    variants = itertools.product(
        options.architectures, options.augment_copies, options.slice_position
    )
    for architecture, copies, position in variants:
        prior = PriorVariant(architecture, copies, position == "on")
        rows += benchmark_prior(bench, prior)
    return rows


def benchmark_prior(bench: Bench, prior: PriorVariant) -> list[dict]:
    """One prior's rows: each snapshot with the default sampling settings, then (with
    ``--sweep``) the sampling controls on its last snapshot."""
    options = bench.options
    snapshots = train_with_snapshots(bench, prior)
    summary = json.loads((prior.folder(bench.root) / "prior_summary.json").read_text())
    rows = []
    for minutes, path in sorted(snapshots.items()):
        if options.sweep_only:
            break
        row = measure(bench, prior, minutes=minutes, prior_path=path, sample_settings={})
        row["prior_summary"] = summary
        rows.append(row)
        print_table([row])
    if options.sweep or options.sweep_only:
        last = snapshots[options.prior_minutes]
        for sample_settings in sweep_settings(prior.architecture, bench.dataset == "mni"):
            rows.append(
                measure(
                    bench,
                    prior,
                    minutes=options.prior_minutes,
                    prior_path=last,
                    sample_settings=sample_settings,
                )
            )
            print_table(rows[-1:])
    return rows


def sweep_settings(architecture: str, conditioned: bool) -> list[dict]:
    """The sampling controls tried on each prior's last snapshot. Top-k 32 and top-p 0.9 raised
    both KIDs on the phantom (docs/benchmarks.md, the 8-minute entry of 2026-12-02) and are not
    repeated."""
    # Without the VQ-VAE's acquisition texture: what the texture changes, like for like.
    settings_tried: list[dict] = [{"texture": "false"}]
    if architecture == "transformer":
        settings_tried += [{"temperature": 0.9}, {"temperature": 1.1}]
    if conditioned:
        settings_tried += [{"guidance": 1.5}, {"guidance": 2.0}, {"guidance": 3.0}]
    if architecture == "masked":
        settings_tried += [{"decoding_steps": steps} for steps in (8, 16, 24)]
    return settings_tried


def flat(row: dict) -> dict:
    """The figures a table and a plot show, from a row's sample measures."""
    m: SampleMeasures = row["metrics"]
    two, kid = m.two_sample, m.kid
    trained = m.density_coverage["autoencoder"].samples_vs_train_reconstructions
    return {
        "c2st_train": two.samples_vs_train_reconstructions.accuracy,
        "c2st_null": two.null_train_halves.accuracy,
        "c2st_shift": two.shift_train_vs_held_out_reconstructions.accuracy,
        "c2st_held_out": two.samples_vs_held_out_reconstructions.accuracy,
        "c2st_real": two.samples_vs_held_out_real.accuracy,
        "kid_ratio_random": kid["random_cnn"].ratio_to_null,
        "kid_ratio_trained": kid["autoencoder"].ratio_to_null,
        "coverage_trained": trained.coverage,
        "density_trained": trained.density,
        "memorised": m.share_samples_memorised,
    }


def print_table(rows: list[dict]) -> None:
    columns = (
        "c2st_train", "c2st_null", "c2st_shift", "c2st_held_out", "c2st_real",
        "kid_ratio_random", "kid_ratio_trained", "coverage_trained", "density_trained",
        "memorised",
    )  # fmt: skip
    print(f"{'data':8} {'prior':20} {'min':>4} {'settings':22} " + " ".join(f"{c:>9.9}" for c in columns) + f" {'s/samp':>7} {'s/score':>7}")  # fmt: skip  # noqa: E501
    for row in rows:
        figures = flat(row)
        shown = json.dumps(row["sample_settings"])[:22] if row["sample_settings"] else "defaults"
        print(
            f"{row['dataset']:8} {row_variant(row):20} {row['minutes']:4g} {shown:22} "
            + " ".join(f"{figures[c]:9.3f}" for c in columns)
            + f" {row['sampling_seconds']:7.1f} {row['scoring_seconds']:7.1f}"
        )


def row_variant(row: dict) -> str:
    return variant(
        row["architecture"], row.get("augment_copies", 0), row.get("slice_position", False)
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [row for row in rows if not row["sample_settings"]]
    if not plain:
        return
    datasets = sorted({row["dataset"] for row in plain})
    measures = ("c2st_train", "kid_ratio_trained", "coverage_trained", "memorised")
    figure, axes = plt.subplots(
        len(datasets), len(measures), figsize=(4 * len(measures), 3.2 * len(datasets)),
        squeeze=False,
    )  # fmt: skip
    for i, dataset in enumerate(datasets):
        for j, measure_name in enumerate(measures):
            axis = axes[i][j]
            for name in sorted({row_variant(row) for row in plain}):
                chosen = [r for r in plain if (r["dataset"], row_variant(r)) == (dataset, name)]
                axis.plot(
                    [r["minutes"] for r in chosen],
                    [flat(r)[measure_name] for r in chosen],
                    "o-",
                    label=name,
                )
            if measure_name == "c2st_train":
                nulls = [flat(r)["c2st_null"] for r in plain if r["dataset"] == dataset]
                axis.axhline(sum(nulls) / len(nulls), color="grey", ls=":", label="null")
            axis.set_title(f"{dataset}: {measure_name}")
            axis.set_xlabel("prior training, minutes")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["phantom", "mni"])
    parser.add_argument("--architectures", nargs="+", default=["transformer", "masked"])
    parser.add_argument("--vqvae-minutes", type=float, default=8.0)
    parser.add_argument("--prior-minutes", type=float, default=15.0)
    parser.add_argument(
        "--augment-copies", type=int, nargs="+", default=[0],
        help="augmented code maps per training slice; each count trains its own prior",
    )  # fmt: skip
    parser.add_argument(
        "--slice-position", nargs="+", choices=["off", "on"], default=["off"],
        help="condition the prior on slice position (from the file names): off, on, or both",
    )  # fmt: skip
    parser.add_argument("--marks", type=float, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sweep", action="store_true", help="also sweep the sampling controls")
    parser.add_argument(
        "--sweep-only", action="store_true", help="only the sweep, on priors already trained"
    )
    parser.add_argument("--phantom-vqvae", type=Path, help="reuse this VQ-VAE for the phantom")
    parser.add_argument("--mni-vqvae", type=Path, help="reuse this VQ-VAE for MNI slices")
    parser.add_argument("--prior-overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation"))
    options = parser.parse_args()
    given = {"phantom": options.phantom_vqvae, "mni": options.mni_vqvae}
    options.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in options.datasets:
        rows += benchmark(dataset, given.get(dataset), options)
    print_table(rows)
    plot(rows, options.out / "generation.png")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": str(torch.__version__),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    # The rows' sample measures as sample_metrics.json holds them.
    plain = to_plain(result)
    (options.out / "generation.json").write_text(json.dumps(plain, indent=2, default=str))
    print(f"wrote {options.out / 'generation.json'} and generation.png")


if __name__ == "__main__":
    main()
