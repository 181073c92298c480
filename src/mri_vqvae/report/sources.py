"""What a run's report reads: the run folder's outputs, each through its typed record. A file
that cannot be read (damaged, hand-edited, foreign) is kept as the reason, so its section of
the page says so and the rest of the page is still written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from mri_vqvae.config import Config, load_config
from mri_vqvae.errors import InputError, UserError
from mri_vqvae.files import (
    CONFIG_FILE,
    EVALUATION_SUMMARY,
    METRICS_JSONL,
    PRIOR_SUMMARY,
    SAMPLE_EVALUATION_FOLDER,
    SAMPLE_METRICS,
    SAMPLES_SUMMARY,
    VQVAE_RUN,
    folder_kind,
)
from mri_vqvae.records import Record, RecordError, parse_json
from mri_vqvae.records.evaluation import EvaluationSummary
from mri_vqvae.records.samples import SampleMeasures, SampleMetadata
from mri_vqvae.records.training import PriorEpoch, PriorSummary, VQVAEEpoch

Value = TypeVar("Value")
Row = TypeVar("Row", bound=Record)


@dataclass(frozen=True)
class ReportSources:
    """The folders a report reads; ``None`` where the run has none yet."""

    run_dir: Path
    evaluation: Path | None = None
    prior: Path | None = None
    samples: Path | None = None


# The file that marks a folder as holding each kind of output.
_MARKERS = {"evaluation": EVALUATION_SUMMARY, "prior": PRIOR_SUMMARY, "samples": SAMPLES_SUMMARY}


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
    for name, folder in given.items():
        if folder is not None and not (Path(folder) / _MARKERS[name]).is_file():
            raise InputError(f"{folder}: no {_MARKERS[name]} there, so it holds no {name}")
    if evaluation is None:
        evaluations = _folders_with(run_dir, "evaluation")
        tests = [folder for folder in evaluations if _split_of(folder) == "test"]
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


def _folders_with(run_dir: Path, kind: str) -> list[Path]:
    """The run folder's sub-folders holding a ``kind`` of output, newest first."""
    marker = _MARKERS[kind]
    found = [path.parent for path in run_dir.glob(f"*/{marker}")]
    return sorted(found, key=lambda folder: (folder / marker).stat().st_mtime, reverse=True)


def _split_of(folder: Path) -> str | None:
    """The split an evaluation folder scored; None where its metrics.json cannot be read."""
    try:
        return EvaluationSummary.read(folder / EVALUATION_SUMMARY).split
    except RecordError:
        return None


@dataclass(frozen=True)
class Loaded(Generic[Value]):
    """What a report section reads: its value, or why it could not be read."""

    value: Value | None = None
    error: str | None = None


def load(read, *args) -> Loaded:
    """``read(*args)``, or the user-facing reason it failed."""
    try:
        return Loaded(read(*args))
    except UserError as err:
        return Loaded(error=str(err))


def read_rows(path: Path, row: type[Row]) -> list[Row]:
    """The rows of a run's ``metrics.jsonl``, each checked as ``row``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot read it ({err})") from err
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        rows.append(row.from_plain(parse_json(line, where), where))
    return rows


@dataclass(frozen=True)
class RunRecords:
    """Everything a report shows, as records: the VQ-VAE's settings and epochs, and the
    evaluation, prior and samples where the run has them (None where it has none)."""

    config: Loaded[Config]
    config_text: str
    history: Loaded[list[VQVAEEpoch]]
    evaluation: Loaded[EvaluationSummary] | None
    prior: Loaded[PriorSummary] | None
    prior_history: Loaded[list[PriorEpoch]] | None
    samples: Loaded[SampleMetadata] | None
    measures: Loaded[SampleMeasures] | None

    @classmethod
    def read(cls, sources: ReportSources) -> RunRecords:
        """Read every record ``sources`` point to."""
        run_dir = sources.run_dir
        config_file = run_dir / CONFIG_FILE
        try:
            config_text = config_file.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            config_text = f"(cannot read {config_file}: {err.strerror or err})"
        return cls(
            config=load(load_config, config_file),
            config_text=config_text,
            history=load(read_rows, run_dir / METRICS_JSONL, VQVAEEpoch),
            evaluation=_optional(sources.evaluation, EVALUATION_SUMMARY, EvaluationSummary.read),
            prior=_optional(sources.prior, PRIOR_SUMMARY, PriorSummary.read),
            prior_history=_optional(
                sources.prior, METRICS_JSONL, lambda path: read_rows(path, PriorEpoch)
            ),
            samples=_optional(sources.samples, SAMPLES_SUMMARY, SampleMetadata.read),
            measures=_optional(
                sources.samples and sources.samples / SAMPLE_EVALUATION_FOLDER,
                SAMPLE_METRICS,
                SampleMeasures.read,
            ),
        )


def _optional(folder: Path | None, name: str, read) -> Loaded | None:
    """``read(folder / name)`` where that file exists; None where it does not."""
    if folder is None or not (folder / name).is_file():
        return None
    return load(read, folder / name)
