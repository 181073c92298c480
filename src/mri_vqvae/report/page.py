"""A run at a glance: one self-contained HTML page (``report.html``) with the configuration,
training curves, reconstruction quality, the codebook atlas, and the prior and its samples
when the run folder holds them.

The page only reads what the commands wrote, each file through its typed record
(:mod:`mri_vqvae.report.sources`); it needs no model and no data, and every picture is
embedded, so it opens from a laptop's disk without a network. A file that cannot be read is
named in its section, and the rest of the page is still written.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
from pathlib import Path

from mri_vqvae import __version__
from mri_vqvae.errors import UserError
from mri_vqvae.files import (
    REPORT_FILE,
    FolderBusy,
    FolderLock,
    OutputError,
    check_output_file,
    write_text_atomic,
)
from mri_vqvae.report.sections import (
    evaluation_section,
    headline,
    prior_section,
    samples_section,
    training_section,
)
from mri_vqvae.report.sources import ReportSources, RunRecords, find_sources

logger = logging.getLogger(__name__)


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
    write_text_atomic(out, render_report(sources))
    return out


def is_report_page(path: str | Path) -> bool:
    """Whether the file at ``path`` is a report page written by :func:`write_report` (its
    head names mri-vqvae as the generator)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, FIFO or folder is no page
            return False
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
    records = RunRecords.read(sources)
    run_dir = sources.run_dir
    context = {
        "run_name": run_dir.resolve().name,
        "run_dir": str(run_dir),
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "version": __version__,
        **training_section(run_dir, records),
        "evaluation": evaluation_section(sources.evaluation, records.evaluation, run_dir),
        "prior": prior_section(sources.prior, records, run_dir),
        "samples": samples_section(sources.samples, records, run_dir),
        "headline": headline(records),
        "config_rows": _config_rows(records),
        "config_error": records.config.error,
        "config_text": records.config_text,
    }
    return environment.get_template("report.html.j2").render(**context)


def _config_rows(records: RunRecords) -> list[tuple[str, str, str]]:
    """Every setting of the run, as the checked configuration holds it."""
    config = records.config.value
    if config is None:
        return []
    rows = []
    for section, settings in config.to_dict().items():
        for key, value in settings.items():
            rows.append((section, key, json.dumps(value)))
    return rows


def write_run_report(
    run_dir: str | Path,
    evaluation: str | Path | None = None,
    prior: str | Path | None = None,
    samples: str | Path | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a run's HTML page: ``RUN_DIR/report.html`` (under the run's lock), or ``out``
    (a page this tool wrote may be replaced; any other file needs ``overwrite``)."""
    run_dir = Path(run_dir)
    if out is not None:
        replace_ok = overwrite or is_report_page(out)
        check_output_file(Path(out), "--out", replace_ok, suffixes=(".html", ".htm"))
        return write_report(run_dir, evaluation, prior, samples, out)
    if not run_dir.is_dir():
        return write_report(run_dir, evaluation, prior, samples)
    page = run_dir / REPORT_FILE
    if (page.exists() or page.is_symlink()) and not (overwrite or is_report_page(page)):
        raise OutputError(
            f"{page}: is not a report page mri-vqvae wrote; pass --overwrite to replace it, "
            "or --out to write the report elsewhere"
        )
    with FolderLock(run_dir):
        return write_report(run_dir, evaluation, prior, samples)


def refresh_report(vqvae_checkpoint: str | Path) -> Path | None:
    """Bring the report of the run a VQ-VAE checkpoint belongs to up to date, if that run
    folder has one and no other process is writing the run. The command's own outputs are
    written by then, so a report that cannot be written is a warning, not a failure."""
    run_dir = Path(vqvae_checkpoint).parent
    if not is_report_page(run_dir / REPORT_FILE):
        return None  # none, or a file of the user's by that name: never replaced unasked
    try:
        with FolderLock(run_dir):
            path = write_report(run_dir)
    except FolderBusy as busy:
        logger.warning("did not update %s: %s", run_dir / REPORT_FILE, busy)
    except (OSError, UserError) as err:
        logger.warning("could not update %s: %s", run_dir / REPORT_FILE, err)
    else:
        logger.info("updated %s", path)
        return path
    return None
