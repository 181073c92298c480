"""Per-image reconstruction metrics on a split, their summary, figures and the arrays a run's
report shows (example reconstructions, the codebook atlas); reconstructing a file."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mri_vqvae import plots
from mri_vqvae.config import DataConfig
from mri_vqvae.data.dataset import SliceSet, postprocess, preprocess
from mri_vqvae.data.nifti import read_slice, write_slice
from mri_vqvae.evaluate.comparisons import split_in_halves
from mri_vqvae.evaluate.features import RandomFeatureNet, extract_features
from mri_vqvae.evaluate.protocol import PROTOCOLS, SampleProtocol
from mri_vqvae.evaluate.sample_metrics import (
    classifier_two_sample_test,
    clopper_pearson,
    null_verdict,
)
from mri_vqvae.files import (
    BEST_IMAGE,
    CODEBOOK_FILE,
    EVALUATION_SUMMARY,
    EXAMPLES_FILE,
    PER_IMAGE_METRICS,
    POWER_SPECTRUM,
    RANDOM_RECONSTRUCTIONS,
    TEXTURED_RECONSTRUCTIONS,
    WORST_IMAGE,
    replaced_atomically,
    ssim_scores_file,
    write_text_atomic,
)
from mri_vqvae.metrics import (
    codebook_usage,
    foreground_ssim_psnr,
    perplexity,
    psnr_per_image,
    radial_power_spectrum,
    spectrum_gap_db,
    ssim_per_image,
    ssim_seed_protocol,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.model.texture import ResidualTexture, texture_generator
from mri_vqvae.runtime import autocast, resolve_precision

SSIM_PROTOCOLS = {
    "ssim": "Wang et al. 2004 on [0, 1], data range 1, 11x11 Gaussian window (sigma 1.5); "
    "reconstructions clamped to the image range",
    "foreground": "the same SSIM map and PSNR averaged inside the anatomy only (pixels above "
    "10% of the slice's range, closed and hole-filled)",
    "ssim_seed_protocol": "the seed's protocol, for comparison with its published 0.799 only: "
    "on [-1, 1], data range from each unclamped reconstruction, 7x7 uniform window, sample "
    "covariance (scikit-image defaults), at this run's image size",
}


# Beside metrics.json: the arrays a run's report draws (numpy archives, read without pickle).


@dataclass
class SplitEvaluation:
    """Per-image scores on a split, and its code histogram."""

    names: list[str]
    ssim: np.ndarray
    psnr: np.ndarray
    foreground_ssim: np.ndarray
    foreground_psnr: np.ndarray
    ssim_seed_protocol: np.ndarray
    code_counts: torch.Tensor
    code_maps: torch.Tensor  # (N, h, w) code indices, on the CPU
    # Random-CNN features (N, F) of the real slices and of their reconstructions, for the
    # two-sample test between them, and both sets' radially averaged power spectra.
    real_features: torch.Tensor
    reconstruction_features: torch.Tensor
    frequencies: np.ndarray
    real_power: np.ndarray
    reconstruction_power: np.ndarray
    # The same for the reconstructions with a draw of the acquisition texture added, and their
    # mean SSIM and PSNR against the real slices; None without a texture.
    textured_features: torch.Tensor | None = None
    textured_power: np.ndarray | None = None
    textured_ssim_mean: float | None = None
    textured_psnr_mean: float | None = None

    def per_image(self) -> dict[str, np.ndarray]:
        """The per-image columns of ``per_image_metrics.csv``."""
        return {
            "ssim": self.ssim,
            "psnr": self.psnr,
            "foreground_ssim": self.foreground_ssim,
            "foreground_psnr": self.foreground_psnr,
            "ssim_seed_protocol": self.ssim_seed_protocol,
        }

    def summary(self) -> dict:
        """The figures of ``metrics.json``."""
        best, worst = int(self.ssim.argmax()), int(self.ssim.argmin())
        summary: dict = {"n_images": len(self.names)}
        for name, values in self.per_image().items():
            # NaN marks an image without foreground; it is left out of the foreground figures.
            finite = values[~np.isnan(values)]
            summary[f"{name}_mean"] = float(finite.mean()) if finite.size else float("nan")
            summary[f"{name}_min"] = float(finite.min()) if finite.size else float("nan")
            if name == "ssim":
                summary["ssim_std"] = float(self.ssim.std())
                summary["ssim_max"] = float(self.ssim.max())
        summary["images_without_foreground"] = int(np.isnan(self.foreground_ssim).sum())
        summary["codebook_usage"] = codebook_usage(self.code_counts)
        summary["codes_used"] = int((self.code_counts > 0).sum())
        summary["perplexity"] = float(perplexity(self.code_counts))
        summary["best_image"] = self.names[best]
        summary["worst_image"] = self.names[worst]
        summary["protocols"] = SSIM_PROTOCOLS
        if self.textured_ssim_mean is not None:
            summary["textured_ssim_mean"] = self.textured_ssim_mean
            summary["textured_psnr_mean"] = self.textured_psnr_mean
        return summary


@torch.no_grad()
def reconstruct_batches(model: VQVAE, slices: SliceSet, batch_size: int, device: torch.device):
    """Yield ``(start, images, output)`` over a split, in eval mode."""
    model.eval()
    for start in range(0, len(slices), batch_size):
        images = slices.batch(slice(start, start + batch_size)).to(device)
        yield start, images, model(images)


def evaluate_split(
    model: VQVAE,
    slices: SliceSet,
    batch_size: int,
    device: torch.device,
    protocol: SampleProtocol = PROTOCOLS["frozen-v3"],
    texture: ResidualTexture | None = None,
    seed: int = 0,
) -> SplitEvaluation:
    """SSIM and PSNR of every image's reconstruction (clamped to the image range), code use,
    and what tells reconstructions from the real slices: ``protocol``'s random-CNN features
    of both, and both power spectra; with a ``texture``, the same for the reconstructions
    with a draw of it (from ``seed``) added."""
    columns: dict[str, list[torch.Tensor]] = {
        "ssim": [],
        "psnr": [],
        "foreground_ssim": [],
        "foreground_psnr": [],
        "ssim_seed_protocol": [],
    }
    counts = torch.zeros(model.num_embeddings, dtype=torch.long)
    code_maps = []
    realism = _RealismTally(protocol, device, texture, seed)
    for _, images, output in reconstruct_batches(model, slices, batch_size, device):
        reconstruction = output.reconstruction.clamp(-1, 1)
        realism.add(images, reconstruction)
        foreground_ssim, foreground_psnr = foreground_ssim_psnr(images, reconstruction)
        scores = {
            "ssim": ssim_per_image(images, reconstruction),
            "psnr": psnr_per_image(images, reconstruction),
            "foreground_ssim": foreground_ssim,
            "foreground_psnr": foreground_psnr,
            "ssim_seed_protocol": ssim_seed_protocol(images, output.reconstruction),
        }
        for name, values in scores.items():
            columns[name].append(values.cpu())
        counts += torch.bincount(output.indices.flatten().cpu(), minlength=model.num_embeddings)
        code_maps.append(output.indices.cpu())
    arrays = {name: torch.cat(values).double().numpy() for name, values in columns.items()}
    return SplitEvaluation(
        names=list(slices.names),
        code_counts=counts,
        code_maps=torch.cat(code_maps),
        **realism.results(len(slices)),
        **arrays,
    )


class _RealismTally:
    """Random-CNN features, power spectra and (textured) scores, batch by batch."""

    def __init__(
        self,
        protocol: SampleProtocol,
        device: torch.device,
        texture: ResidualTexture | None,
        seed: int,
    ) -> None:
        self.features = RandomFeatureNet(
            protocol.random_features_widths, protocol.random_features_seed
        ).to(device)
        self.texture = texture
        self.generator = texture_generator(seed, "evaluation")
        names = ("real", "reconstruction") + (("textured",) if texture is not None else ())
        self.vectors: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.power: dict[str, np.ndarray | float] = {name: 0.0 for name in names}
        self.textured_scores: dict[str, list[torch.Tensor]] = {"ssim": [], "psnr": []}
        self.frequencies = np.zeros(0)

    def add(self, images: torch.Tensor, reconstruction: torch.Tensor) -> None:
        batches = {"real": images, "reconstruction": reconstruction}
        if self.texture is not None:
            textured = self.texture.sample(reconstruction, self.generator).to(images.device)
            batches["textured"] = textured
            self.textured_scores["ssim"].append(ssim_per_image(images, textured).cpu())
            self.textured_scores["psnr"].append(psnr_per_image(images, textured).cpu())
        for name, batch in batches.items():
            self.vectors[name].append(extract_features(self.features, batch.float()).cpu())
            self.frequencies, batch_power = radial_power_spectrum(batch.cpu())
            self.power[name] = self.power[name] + batch_power * len(batch)

    def results(self, count: int) -> dict:
        result = {
            "real_features": torch.cat(self.vectors["real"]),
            "reconstruction_features": torch.cat(self.vectors["reconstruction"]),
            "frequencies": self.frequencies,
            "real_power": np.asarray(self.power["real"]) / count,
            "reconstruction_power": np.asarray(self.power["reconstruction"]) / count,
        }
        if self.texture is not None:
            result["textured_features"] = torch.cat(self.vectors["textured"])
            result["textured_power"] = np.asarray(self.power["textured"]) / count
            result["textured_ssim_mean"] = float(torch.cat(self.textured_scores["ssim"]).mean())
            result["textured_psnr_mean"] = float(torch.cat(self.textured_scores["psnr"]).mean())
        return result


@torch.no_grad()
def fit_texture(
    model: VQVAE,
    slices: SliceSet,
    device: torch.device,
    count: int = 512,
    seed: int = 0,
    batch_size: int = 32,
    precision: str = "auto",
) -> ResidualTexture:
    """The acquisition texture of ``count`` random slices of ``slices`` (the training split)
    against their reconstructions by ``model``, decoded in ``precision`` (``"auto"``:
    bfloat16 where training would use it; 2.7x faster on AMX at a mean difference of 0.002)."""
    rows = torch.randperm(len(slices), generator=torch.Generator().manual_seed(seed))
    rows = rows[:count].sort().values
    images = slices.batch(rows)
    model.eval()
    with autocast(device, resolve_precision(precision, device)):
        reconstructions = torch.cat(
            [
                model(images[start : start + batch_size].to(device)).reconstruction.float().cpu()
                for start in range(0, len(images), batch_size)
            ]
        )
    return ResidualTexture.fit(images, reconstructions, seed=seed)


def realism_summary(
    result: SplitEvaluation, protocol: SampleProtocol, seed: int = 0
) -> dict[str, object]:
    """How far reconstructions are from passing for the real slices: the two-sample
    classifier of the sample measures, and the power spectra's gap in dB; the same for the
    textured reconstructions where the evaluation has them.

    The slices are split into two random halves, A and B. The figure tells reconstructions
    of half A from the real slices of half B: unpaired, since a slice and its own
    reconstruction in the classifier's training and held-out folds would leak; the null
    tells real half A from real half B, at the same size. Each figure is the mean over
    ``protocol.realism_halvings`` random halvings (seeds ``seed``, ``seed + 1``, ...), so it
    does not hang on one draw of the halves. Both are left out (with the reason) when a half
    is smaller than the classifier's folds."""
    halvings = protocol.realism_halvings
    if halvings < 1:
        raise ValueError(f"{protocol.name}: realism_halvings must be at least 1, got {halvings}")
    half = len(result.names) // 2
    two_sample: dict[str, object] = {"features": "random_cnn", "protocol": protocol.name}
    if half < protocol.classifier_folds:
        two_sample["skipped"] = (
            f"{len(result.names)} slices: halves of {half} are fewer than the "
            f"classifier's {protocol.classifier_folds} folds"
        )
    else:
        compared = {
            "reconstructions_vs_real": result.reconstruction_features,
            "textured_reconstructions_vs_real": result.textured_features,
            "null_real_halves": result.real_features,
        }
        two_sample["halvings"] = halvings
        # One set of halvings for every figure, so plain, textured and null are comparable.
        halves = [
            (seed + offset, *split_in_halves(len(result.names), seed + offset))
            for offset in range(halvings)
        ]
        for name, features in compared.items():
            if features is not None:
                two_sample[name] = _over_halvings(features, result.real_features, halves, protocol)
        two_sample.update(null_verdict(two_sample["null_real_halves"], protocol))
    spectrum = {
        "frequencies": result.frequencies.round(6).tolist(),
        "real": result.real_power.tolist(),
        "reconstructions": result.reconstruction_power.tolist(),
        **_spectrum_gaps(result, result.reconstruction_power),
    }
    if result.textured_power is not None:
        spectrum["textured_reconstructions"] = result.textured_power.tolist()
        spectrum["textured"] = _spectrum_gaps(result, result.textured_power)
    return {"two_sample": two_sample, "power_spectrum": spectrum}


def _over_halvings(
    half_a_features: torch.Tensor,
    real_features: torch.Tensor,
    halves: list[tuple[int, torch.Tensor, torch.Tensor]],
    protocol: SampleProtocol,
) -> dict[str, object]:
    """The two-sample test of ``half_a_features`` (rows of half A) against ``real_features``
    (rows of half B), averaged over the ``halves``, each ``(seed, half A, half B)``. The 95%
    interval is one halving's Clopper-Pearson interval about the mean (the mean of several
    halvings of the same slices is no less certain than one), and ``accuracy_sd`` the spread
    between halvings (ddof 0), not an uncertainty of the mean."""
    runs = [
        classifier_two_sample_test(half_a_features[first], real_features[second], protocol, seed)
        for seed, first, second in halves
    ]
    accuracies = [run["accuracy"] for run in runs]
    trials = 2 * runs[0]["images_per_set"]
    mean = float(np.mean(accuracies))
    low, high = clopper_pearson(round(mean * trials), trials)
    return {
        "accuracy": mean,
        "ci95_low": low,
        "ci95_high": high,
        "images_per_set": runs[0]["images_per_set"],
        "train_accuracy": float(np.mean([run["train_accuracy"] for run in runs])),
        "halvings": len(halves),
        "accuracy_sd": float(np.std(accuracies)),
        "accuracy_range": [min(accuracies), max(accuracies)],
    }


def _spectrum_gaps(result: SplitEvaluation, power: np.ndarray) -> dict[str, float | None]:
    gap = spectrum_gap_db(result.real_power, power)
    # The two lowest rings hold a handful of coefficients each, too few for a steady mean.
    steady = np.arange(len(gap)) >= 2
    up_to_half_nyquist = result.frequencies <= 0.25
    return {
        "largest_gap_db_up_to_half_nyquist": float(np.abs(gap[steady & up_to_half_nyquist]).max()),
        "mean_gap_db_above_half_nyquist": float(gap[~up_to_half_nyquist].mean())
        if (~up_to_half_nyquist).any()
        else None,
    }


def write_evaluation(
    model: VQVAE,
    slices: SliceSet,
    out_dir: str | Path,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "test",
    protocol: SampleProtocol = PROTOCOLS["frozen-v3"],
    texture: ResidualTexture | None = None,
) -> dict:
    """Evaluate a split (named ``split`` in the outputs) and write ``per_image_metrics.csv``,
    ``metrics.json``, the figures and the arrays of the run's report; with the VQ-VAE's
    ``texture``, textured reconstructions are scored beside the plain ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_split(model, slices, batch_size, device, protocol, texture, seed)
    summary = {"split": split, **result.summary(), **realism_summary(result, protocol, seed)}
    with open(out_dir / PER_IMAGE_METRICS, "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = result.per_image()
        writer.writerow(["file", *columns])
        for index, name in enumerate(result.names):
            writer.writerow([name, *(f"{values[index]:.6f}" for values in columns.values())])
    write_text_atomic(out_dir / EVALUATION_SUMMARY, json.dumps(summary, indent=2) + "\n")

    plots.ssim_scores(result.ssim, out_dir / ssim_scores_file(split), split=split)
    examples = write_examples(model, slices, result, out_dir / EXAMPLES_FILE, device, seed)
    for label in ("best", "worst"):
        index = int(np.flatnonzero(examples["kind"] == label)[0])
        name = examples["names"][index]
        plots.pair_with_error(
            examples["images"][index].astype(np.float32),
            examples["reconstructions"][index].astype(np.float32),
            out_dir / (BEST_IMAGE if label == "best" else WORST_IMAGE),
            title=f"{label}: {name} (SSIM {examples['ssim'][index]:.4f}, "
            f"PSNR {examples['psnr'][index]:.2f} dB)",
        )
    chosen = torch.randperm(len(slices), generator=torch.Generator().manual_seed(seed))[:8]
    images = slices.batch(chosen.sort().values).to(device)
    model.eval()
    with torch.no_grad():
        reconstructions = model(images).reconstruction.clamp(-1, 1)
    plots.reconstruction_grid(
        images.cpu().numpy(),
        reconstructions.cpu().numpy(),
        out_dir / RANDOM_RECONSTRUCTIONS,
        title=f"{len(chosen)} random {split} images (mean SSIM over the split "
        f"{summary['ssim_mean']:.4f})",
    )
    if texture is not None:
        textured = texture.sample(reconstructions, texture_generator(seed, "evaluation"))
        plots.reconstruction_grid(
            images.cpu().numpy(),
            textured.numpy(),
            out_dir / TEXTURED_RECONSTRUCTIONS,
            title=f"the same {len(chosen)} {split} images over their reconstructions with a "
            "draw of the acquisition texture",
        )
    write_codebook_atlas(slices, result, out_dir / CODEBOOK_FILE, seed)
    plots.save_figure(
        plots.evaluation_spectra(summary["power_spectrum"], split), out_dir / POWER_SPECTRUM
    )
    return summary


@torch.no_grad()
def write_examples(
    model: VQVAE,
    slices: SliceSet,
    result: SplitEvaluation,
    path: Path,
    device: torch.device,
    seed: int = 0,
    per_kind: int = 4,
) -> dict[str, np.ndarray]:
    """Save the ``per_kind`` best, worst and randomly chosen reconstructions (by SSIM) with
    their originals, on [-1, 1] as float16, to ``path``; return the arrays saved."""
    order = np.argsort(result.ssim, kind="stable")
    count = min(per_kind, len(order))
    best, worst = order[::-1][:count], order[:count]
    rest = np.setdiff1d(order, np.concatenate([best, worst]))
    pool = rest if len(rest) >= count else order
    random_pick = np.random.default_rng(seed).choice(pool, size=count, replace=False)
    chosen = np.concatenate([best, worst, np.sort(random_pick)]).astype(np.int64)
    model.eval()
    images = slices.batch(torch.from_numpy(chosen)).to(device)
    reconstructions = model(images).reconstruction.clamp(-1, 1)
    arrays = {
        "kind": np.array(["best"] * count + ["worst"] * count + ["random"] * count),
        "names": np.array([result.names[i] for i in chosen]),
        "images": images[:, 0].float().cpu().numpy().astype(np.float16),
        "reconstructions": reconstructions[:, 0].float().cpu().numpy().astype(np.float16),
        "ssim": result.ssim[chosen],
        "psnr": result.psnr[chosen],
    }
    with replaced_atomically(Path(path), suffix=".npz") as partial:
        np.savez_compressed(partial, **arrays)
    return arrays


def write_codebook_atlas(
    slices: SliceSet,
    result: SplitEvaluation,
    path: Path,
    seed: int = 0,
    top_codes: int = 16,
    patches_per_code: int = 6,
) -> dict[str, np.ndarray]:
    """Save each code's count over the split and, for the ``top_codes`` most used codes, up
    to ``patches_per_code`` image patches where the code occurs, to ``path``.

    A patch is the code's cell of the image (the downsampling factor on each side) with half
    a cell of context around it, padded with the background value at the image's edge."""
    counts = result.code_counts.numpy()
    maps = result.code_maps.numpy()
    (height, width), (rows, columns) = slices.image_size, maps.shape[1:]
    cell_h, cell_w = height // rows, width // columns
    margin_h, margin_w = cell_h // 2, cell_w // 2
    ranked = np.argsort(-counts, kind="stable")
    used = ranked[counts[ranked] > 0][:top_codes]
    rng = np.random.default_rng(seed)
    patches = np.full(
        (len(used), patches_per_code, cell_h + 2 * margin_h, cell_w + 2 * margin_w),
        np.nan,
        dtype=np.float16,
    )
    sources = np.full((len(used), patches_per_code, 3), -1, dtype=np.int64)
    padded: dict[int, np.ndarray] = {}
    for row, code in enumerate(used):
        where = np.argwhere(maps == code)  # (n, 3): image, grid row, grid column
        picks = where[rng.choice(len(where), min(patches_per_code, len(where)), replace=False)]
        for column, (image, grid_row, grid_column) in enumerate(picks):
            if image not in padded:
                pixels = slices.batch([int(image)])[0, 0].float().numpy()
                padded[image] = np.pad(pixels, ((margin_h,), (margin_w,)), constant_values=-1)
            top, left = grid_row * cell_h, grid_column * cell_w
            patches[row, column] = padded[image][
                top : top + cell_h + 2 * margin_h, left : left + cell_w + 2 * margin_w
            ]
            sources[row, column] = (image, grid_row, grid_column)
    arrays = {
        "counts": counts.astype(np.int64),
        "top_codes": used.astype(np.int64),
        "patches": patches,
        "patch_sources": sources,
        "cell_size": np.array([cell_h, cell_w]),
        "grid_shape": np.array([rows, columns]),
    }
    with replaced_atomically(Path(path), suffix=".npz") as partial:
        np.savez_compressed(partial, **arrays)
    return arrays


@torch.no_grad()
def reconstruct_file(
    model: VQVAE,
    in_path: str | Path,
    out_path: str | Path,
    data_config: DataConfig,
    device: torch.device,
) -> Path:
    """Reconstruct one NIfTI slice; the output has the input's shape, intensity range,
    affine and header."""
    source = read_slice(in_path)
    size = data_config.image_size or source.pixels.shape
    image = preprocess(source.pixels, size)[None].to(device)
    model.eval()
    reconstruction = model(image).reconstruction.clamp(-1, 1)[0]
    low, high = float(source.pixels.min()), float(source.pixels.max())
    pixels = postprocess(reconstruction, source.pixels.shape, low, high)
    original_shape = tuple(int(s) for s in source.header.get_data_shape())
    write_slice(pixels.reshape(original_shape), out_path, source.affine, source.header)
    return Path(out_path)
