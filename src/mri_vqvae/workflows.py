"""Whole commands as short recipes: what the command line, the benchmarks and a notebook call
alike. Each checks its outputs before any work, holds its output folder's lock while it
writes, and raises a :class:`~mri_vqvae.errors.UserError` for bad input. The work itself lives
in the modules that own it; a recipe loads the models once and passes them by keyword."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mri_vqvae.checkpoint import Checkpoint, PriorExtras, load_resume_point
from mri_vqvae.code_maps import (
    attach_labels,
    check_same_vocabulary,
    condition_sizes,
    encode_splits,
    log_code_maps,
)
from mri_vqvae.config import (
    MAX_ESTIMATED_BYTES,
    Config,
    check_memory,
    physical_memory_bytes,
    resumed_config,
)
from mri_vqvae.data.dataset import DataSources, SliceSet, concat_slice_sets
from mri_vqvae.data.fingerprint import fingerprints_of
from mri_vqvae.data.nifti import NIFTI_SUFFIXES, DataError
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from mri_vqvae.distributed import (
    ProcessGroup,
    is_main_process,
    join_process_group,
    leave_process_group,
)
from mri_vqvae.evaluate.evaluation import write_evaluation
from mri_vqvae.evaluate.reconstruct import reconstruct_file
from mri_vqvae.evaluate.samples import evaluate_samples as measure_samples
from mri_vqvae.evaluate.samples import read_generated_samples, samples_vqvae_path
from mri_vqvae.files import (
    EVALUATION,
    PHANTOM,
    PRIOR_RUN,
    SAMPLE_EVALUATION,
    SAMPLE_EVALUATION_FOLDER,
    SAMPLES,
    VQVAE_RUN,
    OutputFolder,
    RunFolder,
    check_output_file,
)
from mri_vqvae.generate.samples import SampleRun, draw_samples, write_samples
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import build_prior
from mri_vqvae.records.evaluation import EvaluationSummary
from mri_vqvae.records.samples import SampleMeasures
from mri_vqvae.records.training import PriorSummary
from mri_vqvae.report.page import (
    is_report_page,
    refresh_report,
    write_report,
    write_run_report,
)
from mri_vqvae.runtime import resolve_device, seed_everything
from mri_vqvae.train.loop import FitResult
from mri_vqvae.train.prior import summarise_prior, train_prior
from mri_vqvae.train.tensorboard import require_tensorboard
from mri_vqvae.train.texture import attach_texture
from mri_vqvae.train.vqvae import train_vqvae
from mri_vqvae.trained import TrainedPrior, TrainedVQVAE, check_prior_pairs, check_slice_sizes

logger = logging.getLogger("mri_vqvae")

__all__ = [
    "DataSources",
    "PriorRunResult",
    "evaluate_checkpoint",
    "evaluate_samples",
    "make_phantom",
    "reconstruct_slice",
    "sample",
    "train_prior_run",
    "train_vqvae_run",
    "write_run_report",
]


def _quiet_unless_main(processes: ProcessGroup) -> None:
    """Only the main process of a distributed run logs what it does."""
    if not processes.is_main:
        logging.getLogger("mri_vqvae").setLevel(logging.WARNING)


# -- stage 1 ----------------------------------------------------------------------------------


def train_vqvae_run(
    out: str | Path,
    data: DataSources,
    config: Config | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> FitResult | None:
    """Train a VQ-VAE into the run folder ``out`` (new, or ``overwrite``), or continue the run
    there (``resume``, its settings plus ``overrides``); then fit its acquisition texture,
    evaluate ``best.pt`` on the validation split and write the run's page. Returns the result
    on the main process of a distributed run (None on the others)."""
    out = Path(out)
    folder = OutputFolder.for_run(
        out, VQVAE_RUN, resume=resume, overwrite=overwrite, lock=is_main_process()
    )
    checkpoint = load_resume_point(out, "vqvae") if resume else None
    if checkpoint is not None:
        config = resumed_config(
            checkpoint.config, overrides or [], fixed=("model", "data"), source=out / "last.pt"
        )
    config = config or Config()
    if config.train.tensorboard:
        require_tensorboard()
    with folder:
        return _train_vqvae_in(folder, data, config, checkpoint)


def _check_fits(config: Config, image_size: tuple[int, int], device: torch.device) -> None:
    """Refuse, with the estimate, settings whose training or sampling would not fit in the
    device's memory at the slices' real size (the configuration alone cannot know it)."""
    if device.type == "cuda":
        limit = torch.cuda.get_device_properties(device).total_memory
    else:
        limit = physical_memory_bytes() or MAX_ESTIMATED_BYTES
    check_memory(config, image_size=image_size, limit=limit)


def _decoded_size(vqvae: TrainedVQVAE, grid: tuple[int, int]) -> tuple[int, int]:
    """The size of the slices a VQ-VAE decodes from code maps of ``grid``."""
    factor = vqvae.model.downsampling_factor
    return vqvae.image_size or (grid[0] * factor, grid[1] * factor)


def _train_vqvae_in(
    folder: OutputFolder, data: DataSources, config: Config, checkpoint: Checkpoint | None
) -> FitResult | None:
    processes, device = join_process_group(config.train.device)
    try:
        _quiet_unless_main(processes)
        with processes.main_first():  # the others read the splits the main one caches
            splits = data.load(config.data, splits=("train", "val"))
        seed_everything(config.train.seed)
        model = VQVAE.from_config(config.model)  # train_vqvae loads a resumed run's weights
        train_set, val_set = splits["train"], splits["val"]
        logger.info(
            "training on %s: %d train / %d val slices at %s",
            device,
            len(train_set),
            len(val_set),
            "x".join(str(side) for side in train_set.image_size),
        )
        check_slice_sizes(model, {"training": train_set, "validation": val_set})
        _check_fits(config, train_set.image_size, device)
        if processes.is_main and checkpoint is None:
            # Only now, with the settings and data known good, is an old run let go.
            folder.remove_previous_outputs()
        result = train_vqvae(
            model,
            train_set=train_set,
            val_set=val_set,
            config=config,
            run_dir=folder.path,
            device=device,
            resume=checkpoint,
            processes=processes,
        )
    finally:
        leave_process_group()
    if not processes.is_main:
        return None
    _finish_vqvae_run(result, splits=splits, config=config, device=device)
    return result


def _finish_vqvae_run(
    result: FitResult, *, splits: dict[str, SliceSet], config: Config, device: torch.device
) -> None:
    """The acquisition texture on a ``best.pt`` this run wrote, and the run's page."""
    if not result.history:
        return
    train_set = splits["train"]
    if config.train.texture_slices and result.wrote_best:
        attach_texture(result.best_checkpoint, train_set=train_set, config=config, device=device)
    elif config.train.texture_slices:
        logger.info(
            "%s is the one this run resumed from, left as it is (priors are tied to its "
            "hash): no acquisition texture is fitted to it",
            result.best_checkpoint,
        )
    if config.train.report:
        write_validation_report(result.run_dir, val_set=splits["val"], config=config, device=device)


def write_validation_report(
    run_dir: Path, *, val_set: SliceSet, config: Config, device: torch.device
) -> Path | None:
    """Evaluate the run's ``best.pt`` on the validation split into ``RUN_DIR/validation`` and
    write ``RUN_DIR/report.html``; returns the report's path.

    The run itself is finished and saved by then, so a failure to write these (a full disk,
    say) is logged and the run still ends as done: ``mri-vqvae report`` writes it later."""
    run = RunFolder(run_dir)
    try:
        vqvae = TrainedVQVAE.load(run.best_checkpoint, device)
        write_evaluation(
            vqvae=vqvae,
            slices=val_set,
            out_dir=run.validation,
            split="val",
            batch_size=config.train.batch_size,
            protocol=config.sample_metrics.measures,
        )
        if run.report.exists() and not is_report_page(run.report):
            logger.warning(
                "%s is not a report page mri-vqvae wrote, so it is left as it is; write the "
                "run's report elsewhere with `mri-vqvae report %s --out PAGE.html`",
                *(run.report, run_dir),
            )
            return None
        report = write_report(run_dir)
    except OSError as err:
        logger.warning(
            "could not write the run's report (%s); the run is saved: write the report with "
            "`mri-vqvae report %s`",
            err,
            run_dir,
        )
        return None
    logger.info("report: %s", report)
    return report


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: DataSources,
    out: str | Path,
    config: Config | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> EvaluationSummary:
    """Score a VQ-VAE checkpoint on the test split: per-image SSIM/PSNR, a summary and
    figures in ``out``; returns the summary. ``batch_size`` defaults to the run's."""
    checkpoint, out = Path(checkpoint), Path(out)
    config = config or Config()
    folder = OutputFolder(out, EVALUATION, overwrite=overwrite, inputs=(checkpoint,))
    vqvae = TrainedVQVAE.load(checkpoint, resolve_device(device))
    slices = data.load_test(vqvae.data_settings(config.data))
    check_slice_sizes(vqvae.model, {"test": slices})
    with folder:
        folder.remove_previous_outputs()
        summary = write_evaluation(
            vqvae=vqvae,
            slices=slices,
            out_dir=out,
            split="test",
            batch_size=batch_size or vqvae.config.train.batch_size,
            protocol=config.sample_metrics.measures,
        )
    refresh_report(checkpoint)
    return summary


def reconstruct_slice(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Reconstruct one NIfTI slice into ``out`` (never the input), keeping its geometry."""
    source, out = Path(source), Path(out)
    check_output_file(out, "--out", overwrite, inputs=(source,), suffixes=NIFTI_SUFFIXES)
    vqvae = TrainedVQVAE.load(checkpoint, resolve_device(device))
    return reconstruct_file(vqvae, source, out)


# -- stage 2 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorRunResult:
    """A prior's run: the loop's result and the summary written beside it."""

    fit: FitResult
    summary: PriorSummary


def train_prior_run(
    out: str | Path,
    vqvae_path: str | Path,
    data: DataSources,
    config: Config | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> PriorRunResult | None:
    """Encode every split with the VQ-VAE at ``vqvae_path`` (cached in ``OUT/codes``), train a
    prior over the code maps into ``out``, score its best checkpoint on the test split and
    write ``prior_summary.json``. The model and image size are the VQ-VAE's. Under
    ``torchrun`` every process calls this; the main one returns the result, the others None."""
    out, vqvae_path = Path(out), Path(vqvae_path)
    folder = OutputFolder.for_run(
        out,
        PRIOR_RUN,
        resume=resume,
        overwrite=overwrite,
        lock=is_main_process(),
        inputs=(vqvae_path,),
    )
    checkpoint = load_resume_point(out, "prior") if resume else None
    if checkpoint is not None:
        # Other augment settings would re-encode the training maps under a half-trained
        # prior: another data set, and an epoch whose stored position no longer fits it.
        config = resumed_config(
            checkpoint.config, overrides or [], fixed=("prior", "augment"), source=out / "last.pt"
        )
    config = config or Config()
    if config.prior_train.tensorboard:
        require_tensorboard()
    with folder:
        result = _train_prior_in(folder, vqvae_path, data, config, checkpoint)
    if result is not None:
        refresh_report(vqvae_path)
    return result


def _train_prior_in(
    folder: OutputFolder,
    vqvae_path: Path,
    data: DataSources,
    config: Config,
    checkpoint: Checkpoint | None,
) -> PriorRunResult | None:
    processes, device = join_process_group(config.prior_train.device)
    try:
        _quiet_unless_main(processes)
        vqvae = TrainedVQVAE.load(vqvae_path, device)
        saved = None if checkpoint is None else PriorExtras.from_plain(checkpoint.extras)
        if saved is not None:
            check_prior_pairs(saved, folder.path / "last.pt", vqvae)
        config = replace(config, data=vqvae.data_settings(config.data), model=vqvae.config.model)
        run = RunFolder(folder.path)
        with processes.main_first():  # the others read the maps the main one caches
            splits = data.load(config.data)
            codes = encode_splits(
                vqvae=vqvae, splits=splits, cache_folder=run.codes, augment=config.augment
            )
        _check_fits(config, _decoded_size(vqvae, codes["train"].grid_shape), device)
        vocabulary = attach_labels(codes, data.files(), config.prior.condition_labels)
        if saved is not None:
            check_same_vocabulary(
                vocabulary, saved.label_vocabulary, data.files()["train"][0].parent
            )
        if checkpoint is None and processes.is_main:
            # Only now, with the settings and data known good, is an old prior let go.
            folder.remove_previous_outputs()
        log_code_maps(codes)
        seed_everything(config.prior_train.seed)
        sizes = condition_sizes(
            codes["train"], vocabulary, slice_position=config.prior.condition_on_slice_position
        )
        prior = build_prior(
            config.prior, vqvae.model.num_embeddings, codes["train"].grid_shape, sizes
        )
        result = train_prior(
            prior,
            train_codes=codes["train"],
            val_codes=codes["val"],
            config=config,
            run_dir=run.path,
            vqvae=vqvae,
            label_vocabulary=vocabulary,
            training_data=fingerprints_of(train=splits["train"], val=splits["val"]),
            resume=checkpoint,
            processes=processes,
        )
    finally:
        leave_process_group()
    if not processes.is_main:
        return None
    summary = summarise_prior(result, codes=codes, config=config, vqvae=vqvae)
    summary.write(run.prior_summary)
    return PriorRunResult(result, summary)


def sample(
    vqvae_path: str | Path,
    prior_path: str | Path,
    out: str | Path,
    config: Config | None = None,
    *,
    overwrite: bool = False,
) -> SampleRun:
    """Draw ``config.sample.num_samples`` code maps from the prior and decode them into
    ``out``: a grid, one NIfTI per sample, the codes and ``samples.json``. The samples take
    the geometry and intensity scale of the VQ-VAE's training slices, which its checkpoint
    records; an older checkpoint without that record gives [0, 1] images, with a warning."""
    vqvae_path, prior_path, out = Path(vqvae_path), Path(prior_path), Path(out)
    settings = (config or Config()).sample
    folder = OutputFolder(out, SAMPLES, overwrite=overwrite, inputs=(vqvae_path, prior_path))
    vqvae = TrainedVQVAE.load(vqvae_path, resolve_device(settings.device))
    prior = TrainedPrior.load(prior_path, vqvae=vqvae)
    sized = replace(prior.config, sample=settings)
    size = _decoded_size(vqvae, prior.extras.grid_shape)
    _check_fits(sized, size, resolve_device(settings.device))
    run = draw_samples(vqvae=vqvae, prior=prior, settings=settings)
    with folder:
        folder.remove_previous_outputs()
        write_samples(run, out, vqvae.data_reference)
    refresh_report(vqvae_path)
    return run


def evaluate_samples(
    samples: str | Path,
    data: DataSources,
    config: Config | None = None,
    *,
    vqvae_path: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> SampleMeasures:
    """Measure a folder written by :func:`sample` against real held-out slices (the val and
    test splits): two-sample tests, memorisation, diversity, code statistics; written to
    ``out`` (default ``SAMPLES/evaluation``). Returns the measures."""
    samples = Path(samples)
    if not samples.is_dir():
        raise DataError(samples, "--samples: no such folder (give a folder written by sample)")
    config = config or Config()
    vqvae_file = samples_vqvae_path(samples, Path(vqvae_path) if vqvae_path else None)
    target = Path(out) if out is not None else samples / SAMPLE_EVALUATION_FOLDER
    folder = OutputFolder(
        target,
        SAMPLE_EVALUATION,
        option="--out" if out is not None else "--samples",
        overwrite=overwrite,
        inputs=(vqvae_file,),
    )
    settings = config.sample_metrics
    vqvae = TrainedVQVAE.load(vqvae_file, resolve_device(settings.device))
    data_config = vqvae.data_settings(config.data)
    generated = read_generated_samples(samples, vqvae=vqvae, data=data_config)
    splits = data.load(data_config)
    with folder:
        folder.remove_previous_outputs()
        measures = measure_samples(
            generated,
            train=splits["train"],
            held_out=concat_slice_sets([splits["val"], splits["test"]]),
            vqvae=vqvae,
            out_dir=target,
            settings=settings,
        )
    refresh_report(vqvae_file)
    return measures


def make_phantom(out: str | Path, spec: PhantomSpec, *, workers: int = 1) -> dict[str, int]:
    """Write the synthetic phantom in the HipMRI layout, only ever into a new or empty folder
    (a phantom never lands among real slices), ``workers`` cases at a time; returns the slice
    count per split."""
    with OutputFolder(Path(out), PHANTOM, option="OUT"):
        return write_phantom_dataset(out, spec, workers=workers)
