"""The report's sections, each built from the run's records: what the page's template shows,
as rows of labels and formatted figures and embedded pictures."""

from __future__ import annotations

import base64
import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from mri_vqvae import plots
from mri_vqvae.errors import InputError
from mri_vqvae.files import (
    BATCH_LOSSES,
    BEST_IMAGE,
    CLOSEST_TO_TRAINING,
    CODEBOOK_FILE,
    EXAMPLES_FILE,
    NEAREST_TRAINING_SSIM,
    PER_IMAGE_METRICS,
    PRIOR_SAMPLES_FOLDER,
    RANDOM_RECONSTRUCTIONS,
    SAMPLE_EVALUATION_FOLDER,
    SAMPLES_GRID,
    WORST_IMAGE,
)
from mri_vqvae.records import to_plain
from mri_vqvae.records.arrays import CodebookAtlas, ExampleReconstructions
from mri_vqvae.records.evaluation import EvaluationSummary
from mri_vqvae.records.measures import TwoSampleTest
from mri_vqvae.records.samples import SampleMeasures, SampleTexture
from mri_vqvae.report.sources import Loaded, RunRecords

# The top of the error maps' colour scale, on [0, 1] images: one scale for every run, so
# reports can be compared by eye.
ERROR_SCALE_MAX = 0.25


def number(value: Any, digits: int = 4) -> str:
    """A figure as the page shows it: thousands separated, floats to ``digits``, NaN as n/a."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _image(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(fig) -> str:
    return _image(plots.to_png(fig))


def _file_image(path: Path) -> str | None:
    return _image(path.read_bytes()) if path.is_file() else None


def _shown_path(folder: Path, run_dir: Path) -> str:
    """A folder as the page names it: relative to the run folder when inside it."""
    try:
        return str(folder.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(folder)


# -- training ---------------------------------------------------------------------------------


def training_section(run_dir: Path, records: RunRecords) -> dict:
    """The training curves and the table of epochs."""
    history = records.history.value or []
    epochs = [
        {
            "epoch": row.epoch,
            "train_loss": number(row.train_loss),
            "val_loss": number(row.val_loss),
            "val_ssim": number(row.val_ssim),
            "val_psnr": number(row.val_psnr, 2),
            "codes_used": _percent(row.val_codebook_usage),
            "perplexity": number(row.val_perplexity, 1),
            "restarts": number(row.train_dead_code_restarts),
            "skipped": number(row.train_skipped_steps),
            "seconds": number(row.epoch_seconds, 1),
        }
        for row in history
    ]
    plain = [to_plain(row) for row in history]
    return {
        "training_error": records.history.error,
        "epochs": epochs,
        "curves": _figure(plots.training_curves(plain)) if plain else None,
        "batch_losses": _file_image(run_dir / BATCH_LOSSES),
    }


# -- evaluation -------------------------------------------------------------------------------


def evaluation_section(
    folder: Path | None, loaded: Loaded[EvaluationSummary] | None, run_dir: Path
) -> dict | None:
    """The evaluation's figures, example reconstructions and codebook atlas; a dict holding
    only ``error`` where its files cannot be read."""
    if folder is None or loaded is None:
        return None
    if loaded.value is None:
        return {"error": loaded.error}
    try:
        return _evaluation(folder, loaded.value, run_dir)
    except InputError as err:
        return {"error": str(err)}


def _evaluation(folder: Path, summary: EvaluationSummary, run_dir: Path) -> dict:
    per_image = _per_image_ssim(folder / PER_IMAGE_METRICS)
    examples = _optional_archive(ExampleReconstructions, folder / EXAMPLES_FILE)
    atlas = _optional_archive(CodebookAtlas, folder / CODEBOOK_FILE)
    realism = {}
    if summary.two_sample is not None and summary.power_spectrum is not None:
        realism = _realism(summary)  # evaluations before issue 16 have neither
    return {
        "error": None,
        "folder": _shown_path(folder, run_dir),
        "split": summary.split,
        "metrics": _evaluation_rows(summary),
        "protocols": sorted(summary.protocols.items()),
        "distribution": _figure(plots.ssim_distribution(per_image, summary.split))
        if len(per_image)
        else None,
        "examples": _example_tables(examples) if examples is not None else [],
        # An evaluation written before the report existed: its own pictures instead.
        "pictures": _old_pictures(folder) if examples is None else [],
        "error_scale": _image(plots.colour_scale_png("magma")),
        "error_scale_max": ERROR_SCALE_MAX,
        "codebook": _codebook_section(atlas) if atlas is not None else None,
        "spectrum": None,
        **realism,
    }


def _optional_archive(record, path: Path):
    """The archive at ``path`` as ``record``; None where there is none."""
    return record.read(path) if path.is_file() else None


def _old_pictures(folder: Path) -> list[dict]:
    pictures = []
    for name, heading in (
        (BEST_IMAGE, "Best"),
        (WORST_IMAGE, "Worst"),
        (RANDOM_RECONSTRUCTIONS, "Random"),
    ):
        image = _file_image(folder / name)
        if image:
            pictures.append({"heading": heading, "image": image})
    return pictures


def _evaluation_rows(summary: EvaluationSummary) -> list[tuple[str, str]]:
    rows = [
        ("images", number(summary.n_images)),
        ("SSIM mean", number(summary.ssim_mean)),
        ("SSIM min", number(summary.ssim_min)),
        ("SSIM max", number(summary.ssim_max)),
        ("SSIM standard deviation", number(summary.ssim_std)),
        ("PSNR mean (dB)", number(summary.psnr_mean, 2)),
        ("PSNR min (dB)", number(summary.psnr_min, 2)),
        ("SSIM inside the anatomy", number(summary.foreground_ssim_mean)),
        ("PSNR inside the anatomy (dB)", number(summary.foreground_psnr_mean, 2)),
        ("SSIM, seed's protocol", number(summary.ssim_seed_protocol_mean)),
        ("codes used", f"{summary.codes_used} ({_percent(summary.codebook_usage)})"),
        ("codebook perplexity", number(summary.perplexity, 1)),
    ]
    two_sample, spectrum = summary.two_sample, summary.power_spectrum
    if two_sample is None or spectrum is None:  # evaluations before issue 16 have neither
        return rows
    plain = two_sample.reconstructions_vs_real
    rows += [
        (
            "two-sample accuracy, reconstructions vs real",
            number(plain.accuracy if plain else math.nan, 3),
        ),
        (
            "largest spectrum gap up to half Nyquist (dB)",
            number(spectrum.largest_gap_db_up_to_half_nyquist, 2),
        ),
    ]
    if spectrum.textured is None or not summary.textured:
        return rows
    textured = two_sample.textured_reconstructions_vs_real
    return [
        *rows,
        (
            "two-sample accuracy, textured reconstructions vs real",
            number(textured.accuracy if textured else math.nan, 3),
        ),
        (
            "largest spectrum gap up to half Nyquist, textured (dB)",
            number(spectrum.textured.largest_gap_db_up_to_half_nyquist, 2),
        ),
        ("SSIM, textured reconstructions", number(summary.textured_ssim_mean, 4)),
        ("PSNR, textured reconstructions (dB)", number(summary.textured_psnr_mean, 2)),
    ]


def _realism(summary: EvaluationSummary) -> dict:
    """The two-sample figure of reconstructions against real slices, and the spectra."""
    two_sample, spectrum = summary.two_sample, summary.power_spectrum
    figure = two_sample.reconstructions_vs_real
    textured = two_sample.textured_reconstructions_vs_real
    null = two_sample.null_real_halves
    return {
        "realism_skipped": two_sample.skipped,
        "realism_accuracy": f"{figure.accuracy:.3f} ({_halvings_note(figure)}95% interval "
        f"{figure.ci95_low:.3f}-{figure.ci95_high:.3f}, {figure.images_per_set} slices each)"
        if figure
        else None,
        "realism_null": number(null.accuracy, 3) if figure and null else None,
        "realism_trustworthy": bool(two_sample.trustworthy),
        "realism_halvings": two_sample.halvings or 1,
        "textured_accuracy": number(textured.accuracy, 3) if textured else None,
        "spectrum": _figure(plots.evaluation_spectra(spectrum, summary.split)),
    }


def _halvings_note(figure: TwoSampleTest) -> str:
    """How many random halvings a two-sample figure averages (evaluations before the
    averaging have one, and no record of it)."""
    if figure.halvings == 1 or figure.accuracy_range is None:
        return ""
    low, high = figure.accuracy_range
    return (
        f"the mean of {figure.halvings} random halvings, which ranged {low:.3f}-{high:.3f}; "
        "one halving's "
    )


def _display_scale(height: int, at_least: int = 128) -> int:
    """How many times to repeat each pixel so an image is drawn ``at_least`` pixels high."""
    return max(1, math.ceil(at_least / height))


def _example_tables(examples: ExampleReconstructions) -> list[dict]:
    """The best, worst and random reconstructions: one table row per image, with the
    original, the reconstruction and the per-pixel error map."""
    scale = _display_scale(examples.images.shape[-2])
    tables = []
    for kind in ExampleReconstructions.KINDS:
        rows = []
        for i in examples.rows_of(kind):
            image = examples.images[i].astype(np.float32)
            reconstruction = examples.reconstructions[i].astype(np.float32)
            rows.append(
                {
                    "name": str(examples.names[i]),
                    "ssim": f"{examples.ssim[i]:.4f}",
                    "psnr": f"{examples.psnr[i]:.2f}",
                    "original": _image(plots.gray_png(image, scale)),
                    "reconstruction": _image(plots.gray_png(reconstruction, scale)),
                    "error": _image(plots.error_png(image, reconstruction, ERROR_SCALE_MAX, scale)),
                }
            )
        if rows:
            tables.append({"heading": kind.capitalize(), "kind": kind, "rows": rows})
    return tables


def _per_image_ssim(path: Path) -> np.ndarray:
    """The SSIM column of ``per_image_metrics.csv`` (empty where there is none)."""
    if not path.is_file():
        return np.array([])
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header, *rows = csv.reader(handle)
            column = header.index("ssim")
            return np.array([float(row[column]) for row in rows])
    except (OSError, UnicodeDecodeError, IndexError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not the per-image table evaluate writes ({err})") from err


def _ranges(values: np.ndarray) -> str:
    """``[1, 2, 3, 7]`` as ``"1-3, 7"``."""
    parts: list[str] = []
    start = previous = None
    for value in (int(v) for v in values):
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(f"{start}" if start == previous else f"{start}\u2013{previous}")
        start = previous = value
    if start is not None:
        parts.append(f"{start}" if start == previous else f"{start}\u2013{previous}")
    return ", ".join(parts)


def _codebook_section(atlas: CodebookAtlas) -> dict:
    counts = atlas.counts
    total = max(int(counts.sum()), 1)
    unused = np.flatnonzero(counts == 0)
    top = atlas.top_codes
    patches, cell = atlas.patches, tuple(int(c) for c in atlas.cell_size)
    scale = _display_scale(patches.shape[-2], at_least=64)
    return {
        "size": len(counts),
        "used": int((counts > 0).sum()),
        "unused": _ranges(unused) if len(unused) else "",
        "unused_count": len(unused),
        "top_share": _percent(float(counts[top].sum() / total)) if len(top) else "0%",
        "top_count": len(top),
        "frequency": _figure(plots.code_frequency(counts)),
        "cell": "x".join(str(c) for c in cell),
        "top_rows": [
            {
                "code": int(code),
                "count": f"{int(counts[code]):,}",
                "share": _percent(float(counts[code] / total)),
                "patches": _image(
                    plots.image_png(plots.code_patch_strip(patches[row], cell), scale=scale)
                ),
            }
            for row, code in enumerate(top)
        ],
    }


# -- prior and samples ------------------------------------------------------------------------


def prior_section(folder: Path | None, records: RunRecords, run_dir: Path) -> dict | None:
    """The prior's summary, its curves and the last preview of samples it drew in training."""
    if folder is None or records.prior is None:
        return None
    summary = records.prior.value
    if summary is None:
        return {"error": records.prior.error}
    rows = [
        ("best epoch", number(summary.best_epoch)),
        ("validation NLL (bits per code)", number(summary.val_nll_bits, 3)),
        ("validation unigram (bits per code)", number(summary.val_unigram_bits, 3)),
        ("test NLL (bits per code)", number(summary.test_nll_bits, 3)),
        ("test unigram (bits per code)", number(summary.test_unigram_bits, 3)),
        ("test next-code accuracy", number(summary.test_accuracy, 3)),
        ("VQ-VAE", summary.vqvae),
    ]
    history = records.prior_history.value if records.prior_history else None
    previews = sorted(
        (
            path
            for path in (folder / PRIOR_SAMPLES_FOLDER).glob("epoch_*.png")
            if path.stem[6:].isdigit()
        ),
        key=lambda path: int(path.stem[6:]),
    )
    return {
        "error": None,
        "folder": _shown_path(folder, run_dir),
        "rows": rows,
        "curves": _figure(plots.nll_figure([to_plain(row) for row in history]))
        if history
        else None,
        "preview": _file_image(previews[-1]) if previews else None,
        "preview_epoch": previews[-1].stem[6:] if previews else None,
    }


def _texture_note(texture: SampleTexture | None) -> str:
    """What samples.json says of the acquisition texture, in a few words."""
    if texture is None:
        return "none (drawn before textures existed)"
    if texture.applied:
        return f"added (fitted to {texture.fitted_slices} training slices)"
    return f"none: {texture.reason or 'not applied'}"


def samples_section(folder: Path | None, records: RunRecords, run_dir: Path) -> dict | None:
    """The samples' settings and grid, and their measures once evaluate-samples ran."""
    if folder is None or records.samples is None:
        return None
    metadata = records.samples.value
    if metadata is None:
        return {"error": records.samples.error}
    settings = metadata.settings
    rows = [
        ("samples", number(metadata.num_samples)),
        ("temperature", number(settings.temperature, 2)),
        ("top-k", str(settings.top_k)),
        ("top-p", str(settings.top_p)),
        ("seed", number(metadata.seed)),
        ("sampling time (s)", number(metadata.sampling_seconds, 2)),
        ("acquisition texture", _texture_note(metadata.texture)),
        ("prior", metadata.prior),
    ]
    measures = records.measures
    pictures = []
    if measures is not None and measures.value is not None:
        for name in (CLOSEST_TO_TRAINING, NEAREST_TRAINING_SSIM):
            image = _file_image(folder / SAMPLE_EVALUATION_FOLDER / name)
            if image:
                pictures.append(image)
    return {
        "error": None,
        "folder": _shown_path(folder, run_dir),
        "path": str(folder),
        "rows": rows,
        "grid": _file_image(folder / SAMPLES_GRID),
        "measures_error": measures.error if measures is not None else None,
        "metrics_rows": _measure_rows(measures.value) if measures and measures.value else [],
        "pictures": pictures,
    }


def _measure_rows(measures: SampleMeasures) -> list[tuple[str, str]]:
    """Two-sample accuracy, KID and density/coverage of each comparison, then memorisation,
    diversity and code statistics."""
    two_sample = measures.two_sample
    verdict = "yes" if two_sample.trustworthy else str(two_sample.untrustworthy_reason)
    rows = [
        ("two-sample figures trustworthy (null near 0.5)", verdict),
        ("measure protocol", measures.protocol.name),
    ]
    for _, label, test in two_sample.by_comparison():
        rows.append(
            (
                f"two-sample accuracy, {label} (0.5 = indistinguishable)",
                f"{test.accuracy:.3f} [{test.ci95_low:.3f}, {test.ci95_high:.3f}]",
            )
        )
    for space, kid in measures.kid.items():
        for _, label, distance in kid.by_comparison():
            rows.append((f"KID ({space} features), {label}", number(distance.mean, 5)))
        rows.append((f"KID ({space}) / its null level", number(kid.ratio_to_null, 2)))
    for space, family in measures.density_coverage.items():
        for _, label, value in family.by_comparison():
            rows.append(
                (
                    f"density / coverage ({space} features), {label}",
                    f"{value.density:.3f} / {value.coverage:.3f}",
                )
            )
    return [
        *rows,
        (
            "share of samples above 0.95 SSIM to a training slice",
            number(measures.share_samples_memorised, 4),
        ),
        ("the same for held-out real slices", number(measures.share_held_out_memorised, 4)),
        ("pairwise SSIM among samples", number(measures.pairwise_ssim_samples, 3)),
        ("pairwise SSIM among held-out slices", number(measures.pairwise_ssim_held_out, 3)),
        ("pairwise SSIM among reconstructions", number(measures.pairwise_ssim_reconstructions, 3)),
        ("diversity ratio vs real (1 = as diverse)", number(measures.diversity_ratio, 3)),
        (
            "diversity ratio vs reconstructions",
            number(measures.diversity_ratio_vs_reconstructions, 3),
        ),
        ("code histogram JS divergence (bits)", number(measures.code_js_divergence_bits, 4)),
        (
            "the same between training and held-out codes",
            number(measures.code_js_divergence_train_vs_held_out_bits, 4),
        ),
    ]


# -- the summary at the top ----------------------------------------------------------------


def headline(records: RunRecords) -> list[tuple[str, str]]:
    """The page's first table: the run's headline figures."""
    history = records.history.value or []
    rows: list[tuple[str, str]] = [("epochs", number(len(history)))]
    if history:
        best = max(history, key=lambda row: row.val_ssim)
        rows.append(("best validation SSIM", f"{best.val_ssim:.4f} (epoch {best.epoch})"))
        rows.append(("training time", f"{history[-1].elapsed_seconds / 60:.1f} min"))
    evaluation = records.evaluation.value if records.evaluation else None
    if evaluation is not None:
        rows.append(
            (
                f"{evaluation.split} SSIM mean / min",
                f"{number(evaluation.ssim_mean)} / {number(evaluation.ssim_min)}",
            )
        )
        rows.append(
            (
                "codes used",
                f"{evaluation.codes_used} ({_percent(evaluation.codebook_usage)})",
            )
        )
    prior = records.prior.value if records.prior else None
    if prior is not None:
        rows.append(("prior validation NLL", f"{number(prior.val_nll_bits, 3)} bits per code"))
    samples = records.samples.value if records.samples else None
    if samples is not None:
        rows.append(("samples", number(samples.num_samples)))
    return rows
