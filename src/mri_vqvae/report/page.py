"""A run at a glance: one self-contained HTML page (``report.html``) with the configuration,
training curves, reconstruction quality, the codebook atlas, and the prior and its samples
when the run folder holds them.

The page only reads what the commands wrote (``metrics.jsonl``, ``evaluation/``,
``prior/``, ``samples/``); it needs no model and no data, and every picture is embedded, so
it opens from a laptop's disk without a network.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mri_vqvae import __version__, plots
from mri_vqvae.errors import InputError
from mri_vqvae.files import (
    BATCH_LOSSES,
    BEST_IMAGE,
    CLOSEST_TO_TRAINING,
    CODEBOOK_FILE,
    CONFIG_FILE,
    EVALUATION_SUMMARY,
    EXAMPLES_FILE,
    METRICS_JSONL,
    NEAREST_TRAINING_SSIM,
    PER_IMAGE_METRICS,
    PRIOR_SUMMARY,
    RANDOM_RECONSTRUCTIONS,
    REPORT_FILE,
    SAMPLE_EVALUATION_FOLDER,
    SAMPLE_METRICS,
    SAMPLES_GRID,
    SAMPLES_SUMMARY,
    VQVAE_RUN,
    WORST_IMAGE,
    folder_kind,
    write_text_atomic,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSources:
    """The folders a report reads; ``None`` where the run has none yet."""

    run_dir: Path
    evaluation: Path | None = None
    prior: Path | None = None
    samples: Path | None = None


def find_sources(
    run_dir: str | Path,
    evaluation: str | Path | None = None,
    prior: str | Path | None = None,
    samples: str | Path | None = None,
) -> ReportSources:
    """The run folder's outputs: those given, else the newest sub-folder holding an
    evaluation of the test split (``mri-vqvae evaluate --out RUN_DIR/...``), or failing that
    ``validation/`` (written at the end of training), and the newest sub-folder holding a
    prior (``prior_summary.json``) or samples (``samples.json``)."""
    run_dir = Path(run_dir)
    kind = folder_kind(run_dir)
    if kind is not None and kind.key != VQVAE_RUN.key:
        raise InputError(
            f"{run_dir}: is a {kind.title} folder, not a VQ-VAE run; give the VQ-VAE's run "
            "folder (a prior inside it is found, or pass --prior)"
        )
    if not (run_dir / METRICS_JSONL).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise InputError(
            f"{run_dir}: not a training run folder (it needs the config.yaml and metrics.jsonl "
            "that `mri-vqvae train` writes)"
        )
    given = {"evaluation": evaluation, "prior": prior, "samples": samples}
    for kind, folder in given.items():
        if folder is not None and not (Path(folder) / _MARKERS[kind]).is_file():
            raise InputError(f"{folder}: no {_MARKERS[kind]} there, so it holds no {kind}")
    if evaluation is None:
        evaluations = _folders_with(run_dir, "evaluation")
        # An evaluation written before metrics.json named its split was of the test split.
        tests = [
            f
            for f in evaluations
            if _read_json(f / EVALUATION_SUMMARY).get("split") in (None, "test")
        ]
        evaluation = next(iter(tests + evaluations), None)
    if prior is None:
        prior = next(iter(_folders_with(run_dir, "prior")), None)
    if samples is None:
        samples = next(iter(_folders_with(run_dir, "samples")), None)
    return ReportSources(
        run_dir=run_dir,
        evaluation=Path(evaluation) if evaluation else None,
        prior=Path(prior) if prior else None,
        samples=Path(samples) if samples else None,
    )


# The file that marks a folder as holding each kind of output.
_MARKERS = {"evaluation": EVALUATION_SUMMARY, "prior": PRIOR_SUMMARY, "samples": SAMPLES_SUMMARY}


def _folders_with(run_dir: Path, kind: str) -> list[Path]:
    """The run folder's sub-folders holding a ``kind`` of output, newest first."""
    marker = _MARKERS[kind]
    found = [path.parent for path in run_dir.glob(f"*/{marker}")]
    return sorted(found, key=lambda folder: (folder / marker).stat().st_mtime, reverse=True)


def write_report(
    run_dir: str | Path,
    evaluation: str | Path | None = None,
    prior: str | Path | None = None,
    samples: str | Path | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write the run's report (``RUN_DIR/report.html`` unless ``out`` is given) and return
    its path. The page is written to a temporary file and renamed into place, so a reader
    never sees half of one."""
    sources = find_sources(run_dir, evaluation, prior, samples)
    out = Path(out) if out else sources.run_dir / REPORT_FILE
    html = render_report(sources)
    write_text_atomic(out, html)
    return out


def is_report_page(path: str | Path) -> bool:
    """Whether the file at ``path`` is a report page written by :func:`write_report` (its
    head names mri-vqvae as the generator)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return '<meta name="generator" content="mri-vqvae' in head


def render_report(sources: ReportSources) -> str:
    """The report's HTML."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("mri_vqvae.report", "templates"),
        autoescape=True,  # file names and settings come from the user
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    context = {
        "run_name": sources.run_dir.resolve().name,
        "run_dir": str(sources.run_dir),
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "version": __version__,
        **_section(_training_section, sources.run_dir),
        "evaluation": _section(_evaluation_section, sources.evaluation, sources.run_dir),
        "prior": _section(_prior_section, sources.prior, sources.run_dir),
        "samples": _section(_samples_section, sources.samples, sources.run_dir),
    }
    context["headline"] = _headline(context)
    return environment.get_template("report.html.j2").render(**context)


def _section(build, folder: Path | None, *args: Any):
    """``build(folder, *args)``, with a file that lacks what the page needs (a hand-edited
    or foreign ``metrics.json``, say) reported as a :class:`ValueError` naming the folder."""
    try:
        return build(folder, *args)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise InputError(
            f"{folder}: its files are not what mri-vqvae writes there ({type(err).__name__}: "
            f"{err}); pass the folder to use with --evaluation/--prior/--samples"
        ) from err


def _shown_path(folder: Path, run_dir: Path) -> str:
    """A folder as the page names it: relative to the run folder when inside it."""
    try:
        return str(folder.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(folder)


def _image(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(fig) -> str:
    return _image(plots.to_png(fig))


def _file_image(path: Path) -> str | None:
    return _image(path.read_bytes()) if path.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from err
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: not a JSON object")
    return loaded


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from err


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from err


def _number(value: Any, digits: int = 4) -> str:
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


def _config_rows(config: dict) -> list[tuple[str, str, str]]:
    rows = []
    for section, settings in config.items():
        if isinstance(settings, dict):
            for key, value in settings.items():
                rows.append((section, key, json.dumps(value)))
        else:
            rows.append(("", section, json.dumps(settings)))
    return rows


def _training_section(run_dir: Path) -> dict:
    config_text = (run_dir / CONFIG_FILE).read_text()
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{run_dir / CONFIG_FILE}: not valid YAML ({err})") from err
    history = _read_jsonl(run_dir / METRICS_JSONL)
    epochs = [
        {
            "epoch": row["epoch"],
            "train_loss": _number(row["train_loss"]),
            "val_loss": _number(row["val_loss"]),
            "val_ssim": _number(row["val_ssim"]),
            "val_psnr": _number(row.get("val_psnr", math.nan), 2),
            "codes_used": _percent(row["val_codebook_usage"]),
            "perplexity": _number(row["val_perplexity"], 1),
            "restarts": _number(row.get("train_dead_code_restarts", 0)),
            "skipped": _number(row.get("train_skipped_steps", 0)),
            "seconds": _number(row["epoch_seconds"], 1),
        }
        for row in history
    ]
    return {
        "config_rows": _config_rows(config),
        "config_text": config_text,
        "epochs": epochs,
        "history": history,
        "curves": _figure(plots.training_curves(history)) if history else None,
        "batch_losses": _file_image(run_dir / BATCH_LOSSES),
    }


def _evaluation_section(folder: Path | None, run_dir: Path) -> dict | None:
    if folder is None:
        return None
    summary = _read_json(folder / EVALUATION_SUMMARY)
    split = summary.get("split", "test")
    per_image = _per_image_ssim(folder / PER_IMAGE_METRICS)
    metrics = [
        ("images", _number(summary["n_images"])),
        ("SSIM mean", _number(summary["ssim_mean"])),
        ("SSIM min", _number(summary["ssim_min"])),
        ("SSIM max", _number(summary.get("ssim_max", math.nan))),
        ("SSIM standard deviation", _number(summary.get("ssim_std", math.nan))),
        ("PSNR mean (dB)", _number(summary["psnr_mean"], 2)),
        ("PSNR min (dB)", _number(summary["psnr_min"], 2)),
        ("SSIM inside the anatomy", _number(summary.get("foreground_ssim_mean", math.nan))),
        ("PSNR inside the anatomy (dB)", _number(summary.get("foreground_psnr_mean", math.nan), 2)),
        ("SSIM, seed's protocol", _number(summary.get("ssim_seed_protocol_mean", math.nan))),
        ("codes used", f"{summary['codes_used']} ({_percent(summary['codebook_usage'])})"),
        ("codebook perplexity", _number(summary["perplexity"], 1)),
    ]
    section: dict = {
        "folder": _shown_path(folder, run_dir),
        "split": split,
        "metrics": metrics,
        "protocols": sorted(summary.get("protocols", {}).items()),
        "distribution": _figure(plots.ssim_distribution(per_image, split))
        if len(per_image)
        else None,
        "examples": [],
        "pictures": [],
        "error_scale": _image(plots.colour_scale_png("magma")),
        "error_scale_max": ERROR_SCALE_MAX,
        "codebook": None,
        "spectrum": None,
    }
    if "power_spectrum" in summary:  # evaluations before issue 16 have neither figure
        section.update(_realism(summary, split))
        two_sample = summary["two_sample"]
        accuracy = two_sample.get("reconstructions_vs_real", {}).get("accuracy", math.nan)
        metrics += [
            ("two-sample accuracy, reconstructions vs real", _number(accuracy, 3)),
            (
                "largest spectrum gap up to half Nyquist (dB)",
                _number(summary["power_spectrum"]["largest_gap_db_up_to_half_nyquist"], 2),
            ),
        ]
        metrics += _texture_rows(summary)
    examples = _load_npz(folder / EXAMPLES_FILE)
    if examples is not None:
        section["examples"] = _example_tables(examples)
    else:  # an evaluation written before the report existed: its own pictures
        for name, heading in (
            (BEST_IMAGE, "Best"),
            (WORST_IMAGE, "Worst"),
            (RANDOM_RECONSTRUCTIONS, "Random"),
        ):
            image = _file_image(folder / name)
            if image:
                section["pictures"].append({"heading": heading, "image": image})
    atlas = _load_npz(folder / CODEBOOK_FILE)
    if atlas is not None:
        section["codebook"] = _codebook_section(atlas)
    return section


def _texture_rows(summary: dict) -> list[tuple[str, str]]:
    """The textured reconstructions' rows, for a VQ-VAE with an acquisition texture."""
    textured = summary["power_spectrum"].get("textured")
    if textured is None:
        return []
    figure = summary["two_sample"].get("textured_reconstructions_vs_real", {})
    return [
        (
            "two-sample accuracy, textured reconstructions vs real",
            _number(figure.get("accuracy", math.nan), 3),
        ),
        (
            "largest spectrum gap up to half Nyquist, textured (dB)",
            _number(textured["largest_gap_db_up_to_half_nyquist"], 2),
        ),
        ("SSIM, textured reconstructions", _number(summary["textured_ssim_mean"], 4)),
        ("PSNR, textured reconstructions (dB)", _number(summary["textured_psnr_mean"], 2)),
    ]


def _realism(summary: dict, split: str) -> dict:
    """The two-sample figure of reconstructions against real slices, and the spectra."""
    two_sample, spectrum = summary["two_sample"], summary["power_spectrum"]
    figure = two_sample.get("reconstructions_vs_real")
    textured = two_sample.get("textured_reconstructions_vs_real")
    return {
        "realism_skipped": two_sample.get("skipped"),
        "realism_accuracy": f"{figure['accuracy']:.3f} ({_halvings_note(figure)}95% interval "
        f"{figure['ci95_low']:.3f}-{figure['ci95_high']:.3f}, "
        f"{figure['images_per_set']} slices each)"
        if figure
        else None,
        "realism_null": _number(two_sample["null_real_halves"]["accuracy"], 3) if figure else None,
        "realism_trustworthy": two_sample.get("trustworthy", False),
        "realism_halvings": two_sample.get("halvings", 1),
        "textured_accuracy": _number(textured["accuracy"], 3) if textured else None,
        "spectrum": _figure(plots.evaluation_spectra(spectrum, split)),
    }


def _halvings_note(figure: dict) -> str:
    """How many random halvings a two-sample figure averages (evaluations before the
    averaging have one, and no record of it)."""
    halvings = figure.get("halvings", 1)
    if halvings == 1:
        return ""
    low, high = figure["accuracy_range"]
    return (
        f"the mean of {halvings} random halvings, which ranged {low:.3f}-{high:.3f}; one halving's "
    )


# The top of the error maps' colour scale, on [0, 1] images: one scale for every run, so
# reports can be compared by eye.
ERROR_SCALE_MAX = 0.25


def _display_scale(height: int, at_least: int = 128) -> int:
    """How many times to repeat each pixel so an image is drawn ``at_least`` pixels high."""
    return max(1, math.ceil(at_least / height))


def _example_tables(examples: dict[str, np.ndarray]) -> list[dict]:
    """The best, worst and random reconstructions: one table row per image, with the
    original, the reconstruction and the per-pixel error map."""
    scale = _display_scale(examples["images"].shape[-2])
    tables = []
    for kind, heading in (("best", "Best"), ("worst", "Worst"), ("random", "Random")):
        rows = []
        for i in np.flatnonzero(examples["kind"] == kind):
            image = examples["images"][i].astype(np.float32)
            reconstruction = examples["reconstructions"][i].astype(np.float32)
            rows.append(
                {
                    "name": str(examples["names"][i]),
                    "ssim": f"{examples['ssim'][i]:.4f}",
                    "psnr": f"{examples['psnr'][i]:.2f}",
                    "original": _image(plots.gray_png(image, scale)),
                    "reconstruction": _image(plots.gray_png(reconstruction, scale)),
                    "error": _image(plots.error_png(image, reconstruction, ERROR_SCALE_MAX, scale)),
                }
            )
        if rows:
            tables.append({"heading": heading, "kind": kind, "rows": rows})
    return tables


def _per_image_ssim(path: Path) -> np.ndarray:
    if not path.is_file():
        return np.array([])
    with open(path, newline="") as handle:
        return np.array([float(row["ssim"]) for row in csv.DictReader(handle)])


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


def _codebook_section(atlas: dict[str, np.ndarray]) -> dict:
    counts = atlas["counts"]
    total = max(int(counts.sum()), 1)
    unused = np.flatnonzero(counts == 0)
    top = atlas["top_codes"]
    patches, cell = atlas["patches"], tuple(int(c) for c in atlas["cell_size"])
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


def _prior_section(folder: Path | None, run_dir: Path) -> dict | None:
    if folder is None:
        return None
    summary = _read_json(folder / PRIOR_SUMMARY)
    rows = [("best epoch", _number(summary.get("best_epoch")))]
    for key, label, digits in (
        ("val_nll_bits", "validation NLL (bits per code)", 3),
        ("val_unigram_bits", "validation unigram (bits per code)", 3),
        ("test_nll_bits", "test NLL (bits per code)", 3),
        ("test_unigram_bits", "test unigram (bits per code)", 3),
        ("test_accuracy", "test next-code accuracy", 3),
    ):
        rows.append((label, _number(summary.get(key, math.nan), digits)))
    rows.append(("VQ-VAE", str(summary.get("vqvae", ""))))
    history = _read_jsonl(folder / METRICS_JSONL) if (folder / METRICS_JSONL).is_file() else []
    previews = sorted(
        (path for path in (folder / "samples").glob("epoch_*.png") if path.stem[6:].isdigit()),
        key=lambda path: int(path.stem[6:]),
    )
    return {
        "folder": _shown_path(folder, run_dir),
        "rows": rows,
        "curves": _figure(plots.nll_figure(history)) if history else None,
        "preview": _file_image(previews[-1]) if previews else None,
        "preview_epoch": previews[-1].stem[6:] if previews else None,
    }


def _texture_note(record: Any) -> str:
    """What samples.json says of the acquisition texture, in a few words."""
    if not isinstance(record, dict):
        return "none (drawn before textures existed)"
    if record.get("applied"):
        return f"added (fitted to {record.get('fitted_slices')} training slices)"
    return f"none: {record.get('reason', 'not applied')}"


def _samples_section(folder: Path | None, run_dir: Path) -> dict | None:
    if folder is None:
        return None
    metadata = _read_json(folder / SAMPLES_SUMMARY)
    rows = [
        ("samples", _number(metadata.get("num_samples"))),
        ("temperature", _number(metadata.get("settings", {}).get("temperature"), 2)),
        ("top-k", str(metadata.get("settings", {}).get("top_k"))),
        ("top-p", str(metadata.get("settings", {}).get("top_p"))),
        ("seed", _number(metadata.get("seed"))),
        ("sampling time (s)", _number(metadata.get("sampling_seconds", math.nan), 2)),
        ("acquisition texture", _texture_note(metadata.get("texture"))),
        ("prior", str(metadata.get("prior", ""))),
    ]
    metrics_rows = []
    pictures = []
    metrics_file = folder / SAMPLE_EVALUATION_FOLDER / SAMPLE_METRICS
    if metrics_file.is_file():
        metrics = _read_json(metrics_file)
        metrics_rows += _comparison_rows(metrics)
        for key, label, digits in (
            ("share_samples_above_0.95", "share of samples above 0.95 SSIM to a training slice", 4),
            ("share_held_out_above_0.95", "the same for held-out real slices", 4),
            ("pairwise_ssim_samples", "pairwise SSIM among samples", 3),
            ("pairwise_ssim_held_out", "pairwise SSIM among held-out slices", 3),
            ("pairwise_ssim_reconstructions", "pairwise SSIM among reconstructions", 3),
            ("diversity_ratio", "diversity ratio vs real (1 = as diverse)", 3),
            ("diversity_ratio_vs_reconstructions", "diversity ratio vs reconstructions", 3),
            ("code_js_divergence_bits", "code histogram JS divergence (bits)", 4),
            (
                "code_js_divergence_train_vs_held_out_bits",
                "the same between training and held-out codes",
                4,
            ),
        ):
            if key in metrics:
                metrics_rows.append((label, _number(metrics[key], digits)))
        for name in (CLOSEST_TO_TRAINING, NEAREST_TRAINING_SSIM):
            image = _file_image(folder / "evaluation" / name)
            if image:
                pictures.append(image)
    return {
        "folder": _shown_path(folder, run_dir),
        "path": str(folder),
        "rows": rows,
        "grid": _file_image(folder / SAMPLES_GRID),
        "metrics_rows": metrics_rows,
        "pictures": pictures,
    }


# The comparisons of evaluate.comparisons, in reading order: the figure, its null, the shift,
# then the samples against held-out sets (read beside the shift).
_COMPARISON_LABELS = (
    ("samples_vs_train_reconstructions", "samples vs training reconstructions"),
    ("null_train_halves", "null: two halves of training reconstructions"),
    ("shift_train_vs_held_out_reconstructions", "shift: training vs held-out reconstructions"),
    ("samples_vs_held_out_reconstructions", "samples vs held-out reconstructions"),
    ("samples_vs_held_out_real", "samples vs real held-out slices"),
)


def _comparison_rows(metrics: dict) -> list[tuple[str, str]]:
    """Two-sample accuracy, KID and density/coverage of each comparison, when the summary
    holds them (a summary of an older version shows none of them)."""
    rows = []
    two_sample = metrics.get("two_sample", {})
    if "trustworthy" in two_sample:
        verdict = "yes" if two_sample["trustworthy"] else two_sample["untrustworthy_reason"]
        rows.append(("two-sample figures trustworthy (null near 0.5)", str(verdict)))
    if "protocol" in metrics:
        rows.append(("measure protocol", str(metrics["protocol"].get("name"))))
    for key, label in _COMPARISON_LABELS:
        if key in two_sample:
            test = two_sample[key]
            rows.append(
                (
                    f"two-sample accuracy, {label} (0.5 = indistinguishable)",
                    f"{test['accuracy']:.3f} [{test['ci95_low']:.3f}, {test['ci95_high']:.3f}]",
                )
            )
    for space, kid in metrics.get("kid", {}).items():
        for key, label in _COMPARISON_LABELS:
            if key in kid:
                rows.append((f"KID ({space} features), {label}", _number(kid[key]["mean"], 5)))
        rows.append((f"KID ({space}) / its null level", _number(kid.get("ratio_to_null"), 2)))
    for space, measures in metrics.get("density_coverage", {}).items():
        for key, label in _COMPARISON_LABELS:
            if key in measures:
                value = measures[key]
                rows.append(
                    (
                        f"density / coverage ({space} features), {label}",
                        f"{value['density']:.3f} / {value['coverage']:.3f}",
                    )
                )
    return rows


def _headline(context: dict) -> list[tuple[str, str]]:
    history = context["history"]
    rows: list[tuple[str, str]] = [("epochs", _number(len(history)))]
    if history:
        best = max(history, key=lambda row: row["val_ssim"])
        rows.append(("best validation SSIM", f"{best['val_ssim']:.4f} (epoch {best['epoch']})"))
        rows.append(("training time", f"{history[-1]['elapsed_seconds'] / 60:.1f} min"))
    evaluation = context["evaluation"]
    if evaluation:
        metrics = dict(evaluation["metrics"])
        rows.append(
            (
                f"{evaluation['split']} SSIM mean / min",
                f"{metrics['SSIM mean']} / {metrics['SSIM min']}",
            )
        )
        rows.append(("codes used", metrics["codes used"]))
    if context["prior"]:
        rows.append(
            (
                "prior validation NLL",
                dict(context["prior"]["rows"])["validation NLL (bits per code)"] + " bits per code",
            )
        )
    if context["samples"]:
        rows.append(("samples", dict(context["samples"]["rows"])["samples"]))
    return rows
