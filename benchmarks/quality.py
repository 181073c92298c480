"""Reconstruction quality at an equal wall-clock budget: the seed's recipe, the default recipe,
the adversarial preset (``gan``: ``8x-gan``/``4x-gan``) and MONAI's VQVAE, trained by the same
loop on the same data, side by side in one run. Besides SSIM and PSNR, each recipe's test
reconstructions are told from the real test slices by the sample measures' frozen two-sample
classifier, and their power spectrum is compared with the real slices' (``spectra_*.png``);
``pictures_*.png`` shows three test slices and their enlarged centres as each recipe draws them.

Datasets: the demo phantom, and real MRI: nilearn's bundled MNI152 T1 template (1 mm,
197x233x189) cut into axial, coronal and sagittal slices, resized to 256x128. Slices are split
in blocks of 10 neighbours (every 10th block to test, the one 4 later to validation) so test
slices are mostly not next to training slices.

    python benchmarks/quality.py --minutes 20 --datasets mni phantom --compressions 8 4

Prints a table per dataset and compression and writes ``quality.json`` (and every run's folder)
under ``--out``. Needs the benchmark extras: ``pip install -e '.[bench]'`` (MONAI, nilearn).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from mri_vqvae.config import Config, DataConfig, load_config
from mri_vqvae.data.dataset import (
    HIPMRI_SPLIT_FOLDERS,
    SliceSet,
    load_splits,
    resolve_split_files,
)
from mri_vqvae.data.nifti import write_slice
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from mri_vqvae.evaluate.realism import realism_summary
from mri_vqvae.evaluate.split import SplitEvaluation, evaluate_split
from mri_vqvae.metrics import perplexity as histogram_perplexity
from mri_vqvae.model import VQVAEOutput
from mri_vqvae.protocol import PROTOCOLS, SampleProtocol
from mri_vqvae.records import to_plain
from mri_vqvae.runtime import seed_everything
from mri_vqvae.train.texture import fit_texture
from mri_vqvae.train.vqvae import train_vqvae

RECIPES = ("seed", "default", "gan", "monai")


# Environment settings under which a CPU with AMX runs torch's, oneDNN's and MKL's AVX2 kernels
# and precision auto picks float32: a stand-in for a CPU without bfloat16 units
# (docs/benchmarks.md, 2026-12-03).
AVX2_STAND_IN = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"


def add_precision_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--precision`` (auto, float32 or bfloat16) for ``what``."""
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help=f"{what}; auto under {AVX2_STAND_IN} stands in for a CPU without bfloat16 units",
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mni_template() -> Path:
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    return folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def write_mni_dataset(root: Path, min_foreground: float = 0.15, block: int = 10) -> dict:
    """Cut the MNI152 T1 template into 2D slices in the HipMRI layout; returns counts."""
    volume = np.asarray(nib.load(str(mni_template())).dataobj, dtype=np.float32)
    counts = dict.fromkeys(HIPMRI_SPLIT_FOLDERS, 0)
    for axis, orientation in enumerate(("sagittal", "coronal", "axial")):
        for position in range(volume.shape[axis]):
            pixels = np.take(volume, position, axis=axis)
            if (pixels > 0).mean() < min_foreground:
                continue
            group = (position // block) % 10
            split = "test" if group == 3 else "val" if group == 7 else "train"
            # Rows from anterior/superior down, so every orientation stands upright.
            pixels = np.rot90(pixels)
            # "_slice_<S>" as in HipMRI names, so a prior can condition on the position.
            name = f"mni_{orientation}_slice_{position:03d}.nii.gz"
            write_slice(pixels, root / HIPMRI_SPLIT_FOLDERS[split] / name)
            counts[split] += 1
    return counts


def write_dataset(name: str, root: Path) -> dict:
    if name == "mni":
        return write_mni_dataset(root)
    if name == "phantom":
        return write_phantom_dataset(root, PhantomSpec())
    raise ValueError(f"unknown dataset {name!r}")


class MonaiVQVAE(nn.Module):
    """MONAI's VQVAE behind this project's model interface, so the same loop trains it.

    Configured to the seed's shape: channels 64/128/128 (one level per downsampling), 2
    residual layers of 32 channels, a 512 x 128 codebook with EMA decay 0.99.
    """

    def __init__(self, num_downsamplings: int) -> None:
        super().__init__()
        from monai.networks.nets import VQVAE

        self.net = VQVAE(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(64, 128, 128)[-num_downsamplings:],
            num_res_layers=2,
            num_res_channels=32,
            downsample_parameters=((2, 4, 1, 1),) * num_downsamplings,
            upsample_parameters=((2, 4, 1, 1, 0),) * num_downsamplings,
            num_embeddings=512,
            embedding_dim=128,
            commitment_cost=0.25,
            decay=0.99,
            ddp_sync=False,
        )
        self.downsampling_factor = 2**num_downsamplings
        self.num_embeddings = 512
        self.bounded_output = False  # no output activation
        # Not the seed's: the loop picks channels-last for it on GPUs only, as for the default.
        self.architecture = "monai"
        # The training loop logs restarts; MONAI's quantiser never restarts a code.
        self.quantizer = nn.Module()
        self.quantizer.register_buffer("restart_count", torch.zeros((), dtype=torch.long))

    def check_image_size(self, height: int, width: int) -> None:
        if height % self.downsampling_factor or width % self.downsampling_factor:
            raise ValueError(f"image sides must divide by {self.downsampling_factor}")

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quantized, loss, indices = self.net.quantizer.quantizer(self.net.encode(images))
        counts = torch.bincount(indices.flatten(), minlength=self.num_embeddings)
        return VQVAEOutput(
            reconstruction=self.net.decode(quantized),
            quantization_loss=loss,
            indices=indices,
            perplexity=histogram_perplexity(counts),
        )


def build_model(recipe: str, config: Config) -> nn.Module:
    if recipe == "monai":
        return MonaiVQVAE(config.model.num_downsamplings)
    from mri_vqvae.model import VQVAE

    return VQVAE.from_config(config.model)


def recipe_config(
    recipe: str, compression: int, minutes: float, precision: str, extra: list[str]
) -> Config:
    """The settings of one recipe; the time budget, not the epoch count, ends training."""
    preset = {
        "seed": "seed",
        "default": f"{compression}x",
        "gan": f"{compression}x-gan",
        "monai": f"{compression}x",
    }[recipe]
    overrides = [
        "train.epochs=100000",
        f"train.max_minutes={minutes}",
        "train.device=cpu",
        "data.image_size=[256, 128]",
        f"train.precision={precision}",
    ]
    if recipe == "seed" and compression == 4:
        overrides.append("model.channel_multipliers=[1, 2]")
    if recipe in ("default", "gan"):
        overrides += extra
    return load_config(None, overrides, preset=preset)


def value_at_minute(history: list[dict], column: str, minute: float):
    """``column`` of the last epoch finished by ``minute`` (None before the first)."""
    done = [row for row in history if row["elapsed_seconds"] <= minute * 60]
    return done[-1][column] if done else None


def ssim_by_minute(history: list[dict], minutes: float) -> list[float | None]:
    """Validation SSIM of the last epoch finished by the end of each whole minute."""
    reached = [value_at_minute(history, "val_ssim", m) for m in range(1, int(minutes) + 1)]
    return [None if ssim is None else round(ssim, 4) for ssim in reached]


def run_recipe(
    recipe: str, *, compression: int, data: dict, out: Path, args: argparse.Namespace
) -> dict:
    """Train ``recipe`` for ``args.minutes`` into ``out/<recipe>`` and score its best
    checkpoint on the test split."""
    minutes = args.minutes
    config = recipe_config(recipe, compression, minutes, args.precision, args.default_overrides)
    seed_everything(config.train.seed)
    model = build_model(recipe, config)
    parameters = sum(p.numel() for p in model.parameters())
    device = torch.device("cpu")
    started = time.monotonic()
    result = train_vqvae(
        model,
        train_set=data["train"],
        val_set=data["val"],
        config=config,
        run_dir=out / recipe,
        device=device,
    )
    seconds = time.monotonic() - started
    best = torch.load(result.best_checkpoint, weights_only=True)["model"]
    model.load_state_dict(best)
    # The acquisition texture as `train` fits it (train.texture_slices training slices).
    texture = fit_texture(model, data["train"], count=config.train.texture_slices)
    protocol = PROTOCOLS["frozen-v3"]
    evaluation = evaluate_split(
        model, data["test"], batch_size=32, protocol=protocol, texture=texture
    )
    history = result.history
    return {
        "recipe": recipe,
        "parameters": parameters,
        "train_seconds": round(seconds, 1),
        "epochs": len(history),
        "images_seen": history[-1]["images_seen"],
        "images_per_second": round(history[-1]["images_seen"] / seconds, 2),
        "ssim_by_minute": ssim_by_minute(history, minutes),
        "test": test_figures(evaluation, protocol),
    }


def test_figures(evaluation: SplitEvaluation, protocol: SampleProtocol) -> dict:
    """The test split's summary as plain values (its SSIM protocols aside), with the
    two-sample accuracies and spectrum gaps the table shows beside the full records (every
    figure with its spread over the halvings)."""
    realism = realism_summary(evaluation, protocol)
    summary = to_plain(evaluation.summary("test", realism))
    two_sample, spectrum = realism.two_sample, realism.power_spectrum
    return {
        **{k: v for k, v in summary.items() if k != "protocols"},
        "two_sample_vs_real": two_sample.reconstructions_vs_real.accuracy,
        "two_sample_textured_vs_real": two_sample.textured_reconstructions_vs_real.accuracy,
        "two_sample_null": two_sample.null_real_halves.accuracy,
        "spectrum_gap_db": spectrum.largest_gap_db_up_to_half_nyquist,
        "textured_spectrum_gap_db": spectrum.textured.largest_gap_db_up_to_half_nyquist,
    }


def table(results: list[dict]) -> str:
    header = (
        "| recipe | params | images seen | img/s | SSIM mean | SSIM min | fg SSIM | PSNR dB | "
        "fg PSNR dB | seed-protocol SSIM | codes used | perplexity | 2-sample vs real (null) | "
        "spectrum gap dB |"
    )
    lines = [header, "|" + "---|" * 14]
    for row in results:
        t = row["test"]
        lines.append(
            f"| {row['recipe']} | {row['parameters'] / 1e6:.2f}M | {row['images_seen']} | "
            f"{row['images_per_second']:.1f} | {t['ssim_mean']:.4f} | {t['ssim_min']:.4f} | "
            f"{t['foreground_ssim_mean']:.4f} | {t['psnr_mean']:.2f} | "
            f"{t['foreground_psnr_mean']:.2f} | {t['ssim_seed_protocol_mean']:.4f} | "
            f"{t['codes_used']}/512 ({100 * t['codebook_usage']:.1f}%) | {t['perplexity']:.1f} | "
            f"{t['two_sample_vs_real']:.3f} ({t['two_sample_null']:.3f}) | "
            f"{t['spectrum_gap_db']:.2f} |"
        )
    lines.append("")
    lines.append(
        "With the acquisition texture (train.texture_slices training slices' residuals) added "
        "to the same reconstructions:"
    )
    lines.append("| recipe | SSIM mean | PSNR dB | 2-sample vs real (null) | spectrum gap dB |")
    lines.append("|" + "---|" * 5)
    for row in results:
        t = row["test"]
        lines.append(
            f"| {row['recipe']} + texture | {t['textured_ssim_mean']:.4f} | "
            f"{t['textured_psnr_mean']:.2f} | {t['two_sample_textured_vs_real']:.3f} "
            f"({t['two_sample_null']:.3f}) | {t['textured_spectrum_gap_db']:.2f} |"
        )
    lines.append("")
    lines.append("SSIM (validation) reached after each minute:")
    for row in results:
        lines.append(f"  {row['recipe']:8s} {row['ssim_by_minute']}")
    return "\n".join(lines)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per recipe")
    parser.add_argument("--datasets", nargs="+", default=["mni", "phantom"])
    parser.add_argument("--compressions", nargs="+", type=int, default=[8, 4], choices=[8, 4])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    parser.add_argument(
        "--precision",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="training precision, the same for every recipe",
    )
    parser.add_argument(
        "--default-overrides",
        nargs="*",
        default=[],
        metavar="section.key=value",
        help="settings changed in the default and gan recipes, not the seed's or MONAI's",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_options()
    if args.threads:
        torch.set_num_threads(args.threads)

    report = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python benchmarks/quality.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v not in (None, [])
        ),
        "minutes_per_recipe": args.minutes,
        "runs": {},
    }
    for dataset in args.datasets:
        root = args.out / "data" / dataset
        if not root.exists():
            print(f"{dataset}: writing slices to {root}: {write_dataset(dataset, root)}")
        files = resolve_split_files(root)
        data = load_splits(files, replace(DataConfig(), image_size=(256, 128)))
        for compression in args.compressions:
            run_compression(f"{dataset}_{compression}x", compression, data, report, args)


def run_compression(
    key: str, compression: int, data: dict, report: dict, args: argparse.Namespace
) -> None:
    """Every recipe at one dataset and compression: trained, scored, tabled and drawn;
    ``report`` (``quality.json``) rewritten after each recipe."""
    run_dir = args.out / "runs" / key
    results = []
    for recipe in args.recipes:
        if (run_dir / recipe).exists():
            raise SystemExit(f"{run_dir / recipe} exists; remove it or choose --out")
        print(f"[{key}] training {recipe} for {args.minutes} min ...", flush=True)
        results.append(
            run_recipe(recipe, compression=compression, data=data, out=run_dir, args=args)
        )
        report["runs"][key] = results
        (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n## {key}, {args.minutes} min per recipe\n{table(results)}\n", flush=True)
    plot_spectra(results, args.out / f"spectra_{key}.png", key)
    configs = {
        recipe: recipe_config(recipe, compression, 1.0, "float32", args.default_overrides)
        for recipe in args.recipes
    }
    plot_reconstructions(run_dir, configs, data["test"], args.out / f"pictures_{key}.png")


def plot_spectra(results: list[dict], path: Path, key: str) -> None:
    """The test slices' power spectrum and each recipe's reconstructions', plain and with the
    acquisition texture, on one plot."""
    from mri_vqvae import plots

    spectra = results[0]["test"]["power_spectrum"]
    curves = {"real slices": spectra["real"]}
    for row in results:
        curves[row["recipe"]] = row["test"]["power_spectrum"]["reconstructions"]
        curves[f"{row['recipe']} + texture"] = row["test"]["power_spectrum"][
            "textured_reconstructions"
        ]
    plots.save_figure(plots.power_spectra(spectra["frequencies"], curves, f"{key} test"), path)


def plot_reconstructions(
    run_dir: Path, configs: dict[str, Config], test: SliceSet, path: Path, count: int = 3
) -> None:
    """``count`` test slices, evenly spaced through the split, each beside its centre enlarged
    four-fold (where the noise and the thinnest lines a decoder drops or draws can be seen): a
    row of the real slices, then a row per recipe's best checkpoint reconstructing them.
    ``configs`` holds each recipe's settings as trained, so its model is built to fit."""
    from mri_vqvae import plots

    indices = np.linspace(0, len(test) - 1, count).round().astype(int).tolist()
    real = test.batch(indices)
    height, width = real.shape[-2:]
    top, left = (height - height // 4) // 2, (width - width // 4) // 2

    def with_centres(images: torch.Tensor) -> np.ndarray:
        centres = images[..., top : top + height // 4, left : left + width // 4]
        centres = centres.repeat_interleave(4, -2).repeat_interleave(4, -1)
        return torch.stack([images, centres], 1).flatten(0, 1).numpy()

    rows = [with_centres(real)]
    for recipe, config in configs.items():
        model = build_model(recipe, config)
        model.load_state_dict(torch.load(run_dir / recipe / "best.pt", weights_only=True)["model"])
        model.eval()
        with torch.no_grad():
            rows.append(with_centres(model(real).reconstruction.clamp(-1, 1)))
    titles = [title for i in indices for title in (test.names[i][:28], "centre x4")]
    plots.image_rows(rows, ["real", *configs], path, f"{path.stem}: test slices", titles)


if __name__ == "__main__":
    main()
