"""Whole commands as functions: what the command line, the benchmarks and a notebook call
alike. Each checks its outputs before any work, holds its output folder's lock while it
writes, and raises a :class:`~mri_vqvae.errors.UserError` for bad input."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mri_vqvae.checkpoint import (
    Checkpoint,
    build_prior_model,
    check_prior_matches,
    file_sha256,
    keep_texture,
    load_checkpoint,
    load_model,
    load_prior,
    load_prior_checkpoint,
    load_vqvae,
    read_data_reference,
    read_texture,
)
from mri_vqvae.code_maps import CodeMaps, code_maps_for, require_slice_positions
from mri_vqvae.config import (
    Config,
    ConfigError,
    DataConfig,
    SampleConfig,
    apply_overrides,
    config_from_dict,
)
from mri_vqvae.data.dataset import (
    SliceSet,
    concat_slice_sets,
    list_slices,
    load_split,
    load_splits,
    resolve_split_files,
)
from mri_vqvae.data.labels import (
    LabelVocabulary,
    build_vocabulary,
    encode_labels,
    split_label_values,
)
from mri_vqvae.data.nifti import NIFTI_SUFFIXES, DataError
from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
from mri_vqvae.distributed import (
    ProcessGroup,
    is_main_process,
    join_process_group,
    leave_process_group,
)
from mri_vqvae.errors import UserError
from mri_vqvae.evaluate.protocol import protocol_named
from mri_vqvae.evaluate.reconstruction import fit_texture, reconstruct_file, write_evaluation
from mri_vqvae.evaluate.samples import as_loaded
from mri_vqvae.evaluate.samples import evaluate_samples as measure_samples
from mri_vqvae.files import (
    EVALUATION,
    PHANTOM,
    PRIOR_RUN,
    REPORT_FILE,
    SAMPLE_CODES,
    SAMPLE_EVALUATION,
    SAMPLE_EVALUATION_FOLDER,
    SAMPLES,
    SAMPLES_SUMMARY,
    VQVAE_RUN,
    FolderBusy,
    FolderLock,
    OutputFolder,
    RunFolder,
    check_output_file,
    write_text_atomic,
)
from mri_vqvae.generate.sampling import (
    SampleRun,
    check_prior_fits,
    decode_codes,
    draw_conditions,
    generate_samples,
    load_sample_codes,
    write_samples,
)
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import ConditionSizes, build_prior
from mri_vqvae.model.texture import ResidualTexture, texture_generator
from mri_vqvae.report.page import is_report_page, write_report
from mri_vqvae.runtime import resolve_device, seed_everything
from mri_vqvae.train.loop import FitResult
from mri_vqvae.train.prior import evaluate_prior, train_prior
from mri_vqvae.train.tensorboard import require_tensorboard
from mri_vqvae.train.vqvae import train_vqvae

logger = logging.getLogger("mri_vqvae")


@dataclass(frozen=True)
class DataSources:
    """Where the slices are: a HipMRI-layout root, and/or a folder per split."""

    root: Path | None = None
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None

    def files(self) -> dict[str, list[Path]]:
        """Every split's slice files."""
        return resolve_split_files(self.root, self.train, self.val, self.test)

    def test_files(self) -> list[Path]:
        """The test split's files (``test`` alone is enough)."""
        return list_slices(self.test) if self.test is not None else self.files()["test"]


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every setting that differs between two config dicts."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def resumed_config(
    checkpoint: Checkpoint, path: Path, overrides: list[str], fixed: tuple[str, ...]
) -> Config:
    """The settings of a resumed run: its checkpoint's, with ``overrides`` applied; the
    ``fixed`` sections may not change."""
    before = checkpoint.config.to_dict()
    config = config_from_dict(apply_overrides(before, overrides))
    after = config.to_dict()
    changes = changed_settings({s: before[s] for s in fixed}, {s: after[s] for s in fixed})
    if changes:
        raise ConfigError(
            f"--resume cannot change the {'/'.join(fixed)} settings of {path}: "
            + "; ".join(changes)
        )
    return config


def data_settings(trained: DataConfig, given: DataConfig) -> DataConfig:
    """The data settings of a command that uses a trained VQ-VAE: its image size (the model is
    fixed to it), and how to read the slices as the command's own settings say (skipping bad
    files, the cache)."""
    return replace(given, image_size=trained.image_size)


def _open_run(
    out: Path, kind, resume: bool, overwrite: bool, inputs=(), lock: bool = True
) -> OutputFolder:
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out; --overwrite would replace it")
    folder = OutputFolder(out, kind, overwrite=overwrite, resume=resume, lock=lock, inputs=inputs)
    if resume and not RunFolder(out).last_checkpoint.exists():
        last = RunFolder(out).last_checkpoint
        raise ConfigError(f"--resume: {out} holds no run to continue ({last} missing)")
    return folder


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
    there (``resume``, its settings plus ``overrides``); then evaluate ``best.pt`` on the
    validation split and write the run's page. Returns the result on the main process of a
    distributed run (None on the others)."""
    out = Path(out)
    folder = _open_run(out, VQVAE_RUN, resume, overwrite, lock=is_main_process())
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(RunFolder(out).last_checkpoint, "vqvae")
        config = resumed_config(
            checkpoint, RunFolder(out).last_checkpoint, overrides or [], ("model", "data")
        )
    config = config or Config()
    if config.train.tensorboard:
        require_tensorboard()
    with folder:
        return _train_in(folder, data, config, checkpoint)


def _train_in(
    folder: OutputFolder, data: DataSources, config: Config, checkpoint: Checkpoint | None
) -> FitResult | None:
    processes, device = join_process_group(config.train.device)
    try:
        if not processes.is_main:
            logging.getLogger("mri_vqvae").setLevel(logging.WARNING)
        with processes.main_first():  # the others read the splits the main one caches
            splits = load_splits(data.files(), config.data, splits=("train", "val"))
        seed_everything(config.train.seed)
        model = VQVAE.from_config(config.model)  # train_vqvae loads a resumed run's weights
        logger.info(
            "training on %s: %d train / %d val slices at %dx%d",
            device,
            len(splits["train"]),
            len(splits["val"]),
            *splits["train"].image_size,
        )
        if processes.is_main and checkpoint is None:
            # Only now, with the settings and data known good, is an old run let go.
            folder.remove_previous_outputs()
        best_before = _file_stamp(RunFolder(folder.path).best_checkpoint)
        result = train_vqvae(
            model,
            splits["train"],
            splits["val"],
            config,
            folder.path,
            device,
            checkpoint,
            processes,
        )
    finally:
        leave_process_group()
    if not processes.is_main:
        return None
    best = RunFolder(result.run_dir).best_checkpoint
    if config.train.texture_slices and result.history:
        if _file_stamp(best) != best_before:
            attach_texture(best, splits["train"], device, config)
        else:
            logger.info(
                "%s is the one this run resumed from, left as it is (priors are tied to its "
                "hash): no acquisition texture is fitted to it",
                best,
            )
    if config.train.report and result.history:
        write_validation_report(result.run_dir, splits["val"], device, config)
    return result


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """The modification time and size of ``path``; None when there is no such file."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size


def attach_texture(
    checkpoint: Path, train_set: SliceSet, device: torch.device, config: Config
) -> None:
    """Fit the acquisition texture to ``train.texture_slices`` training slices and their
    reconstructions by the VQ-VAE in ``checkpoint`` (its best weights), and keep it there.

    A checkpoint that keeps one already is left alone: the loop writes ``best.pt`` without a
    texture, so one there was fitted to these very weights (a resumed run that did not improve
    on them), and rewriting the file would change the hash its priors were trained against."""
    model, saved = load_vqvae(checkpoint, device)
    if read_texture(saved, checkpoint) is not None:
        return
    count = min(config.train.texture_slices, len(train_set))
    texture = fit_texture(
        model, train_set, device, count, config.train.seed, precision=config.train.precision
    )
    keep_texture(checkpoint, texture)
    logger.info(
        "acquisition texture fitted to %d training slices (%d intensity bins) and kept in %s",
        count,
        len(texture.bin_centres),
        checkpoint,
    )


def write_validation_report(
    run_dir: Path, val_set: SliceSet, device: torch.device, config: Config
) -> Path | None:
    """Evaluate the run's ``best.pt`` on the validation split into ``RUN_DIR/validation`` and
    write ``RUN_DIR/report.html``; returns the report's path.

    The run itself is finished and saved by then, so a failure to write these (a full disk,
    say) is logged and the run still ends as done: ``mri-vqvae report`` writes it later."""
    run = RunFolder(run_dir)
    try:
        model, checkpoint = load_vqvae(run.best_checkpoint, device)
        texture = read_texture(checkpoint, run.best_checkpoint)
        batch_size, seed = config.train.batch_size, config.train.seed
        protocol = protocol_named(config.sample_metrics.protocol)
        write_evaluation(
            model, val_set, run.validation, device, batch_size, seed, "val", protocol, texture
        )
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


@dataclass
class PriorRunResult:
    """A prior's run: the loop's result and the summary written beside it."""

    fit: FitResult
    summary: dict[str, Any]


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
    folder = _open_run(
        out, PRIOR_RUN, resume, overwrite, inputs=(vqvae_path,), lock=is_main_process()
    )
    checkpoint = None
    if resume:
        last = RunFolder(out).last_checkpoint
        checkpoint = load_prior_checkpoint(last)
        check_prior_matches(checkpoint, last, vqvae_path)
        # Other augment settings would re-encode the training maps under a half-trained
        # prior: another data set, and an epoch whose stored position no longer fits it.
        config = resumed_config(checkpoint, last, overrides or [], ("prior", "augment"))
    config = config or Config()
    if config.prior_train.tensorboard:
        require_tensorboard()
    with folder:
        result = _train_prior_in(folder, vqvae_path, data, config, checkpoint)
    if result is not None:
        refresh_report(vqvae_path)
    return result


def _encode_splits(
    vqvae: VQVAE,
    sha256: str,
    data: DataSources,
    config: Config,
    run: RunFolder,
    processes: ProcessGroup,
    device: torch.device,
) -> dict[str, CodeMaps]:
    """Every split's code maps, the training split's with ``config.augment``'s copies (the
    others are never augmented: they measure the prior on real slices). The main process
    encodes and caches them; the others then read its cache."""
    with processes.main_first():
        splits = load_splits(data.files(), config.data)
        codes = {
            split: code_maps_for(
                vqvae,
                sha256,
                slices,
                run.codes / f"{split}.pt",
                device,
                augment=config.augment if split == "train" else None,
            )
            for split, slices in splits.items()
        }
    if config.prior.condition_on_slice_position:
        for split, maps in codes.items():
            require_slice_positions(maps, f"{split} split")
    return codes


def _attach_labels(
    codes: dict[str, CodeMaps], data: DataSources, columns: tuple[str, ...]
) -> LabelVocabulary:
    """Give each split's maps the labels of ``columns`` from the conditions.csv beside it;
    the training split's values make the vocabulary."""
    if not columns:
        return ()
    files = data.files()
    values = {}
    for split, maps in codes.items():
        plain_names = maps.names[: maps.slice_count]
        values[split] = split_label_values(files[split], plain_names, columns)
    vocabulary = build_vocabulary(columns, values["train"])
    for split, maps in codes.items():
        labels = encode_labels(values[split], vocabulary)
        # Augmented copies carry the labels of the slice they came from.
        maps.labels = labels if maps.source is None else labels[maps.source]
    for name, known in vocabulary:
        logger.info("label %s: %d values (%s)", name, len(known), ", ".join(known[:8]))
    return vocabulary


def _check_vocabulary(vocabulary: LabelVocabulary, checkpoint: Checkpoint, data) -> None:
    """A resumed prior's labels must mean what they meant: the same values in the same order."""
    saved = [[name, list(values)] for name, values in checkpoint.extras["label_vocabulary"]]
    now = [[name, list(values)] for name, values in vocabulary]
    if saved != now:
        raise ConfigError(
            f"the labels in the conditions.csv beside {data.files()['train'][0].parent} are not "
            f"the ones this prior began with ({saved} then, {now} now): its label indices would "
            "change meaning; restore the table or train a new prior"
        )


def condition_sizes(config: Config, codes: CodeMaps, vocabulary: LabelVocabulary):
    """What a prior trained on ``codes`` with ``config`` is conditioned on."""
    augmentation = 0 if codes.augmentation is None else codes.augmentation.shape[1]
    return ConditionSizes(
        position=config.prior.condition_on_slice_position,
        labels=tuple(len(values) for _, values in vocabulary),
        augmentation=augmentation,
    )


def _train_prior_in(
    folder: OutputFolder,
    vqvae_path: Path,
    data: DataSources,
    config: Config,
    checkpoint: Checkpoint | None,
) -> PriorRunResult | None:
    processes, device = join_process_group(config.prior_train.device)
    try:
        if not processes.is_main:
            logging.getLogger("mri_vqvae").setLevel(logging.WARNING)
        vqvae, vqvae_config = load_model(vqvae_path, device)
        sha256 = file_sha256(vqvae_path)
        data_config = data_settings(vqvae_config.data, config.data)
        config = replace(config, data=data_config, model=vqvae_config.model)
        run = RunFolder(folder.path)
        codes = _encode_splits(vqvae, sha256, data, config, run, processes, device)
        vocabulary = _attach_labels(codes, data, config.prior.condition_labels)
        if checkpoint is not None:
            _check_vocabulary(vocabulary, checkpoint, data)
        if checkpoint is None and processes.is_main:
            # Only now, with the settings and data known good, is an old prior let go.
            folder.remove_previous_outputs()
        _log_code_maps(codes, vqvae.num_embeddings)
        seed_everything(config.prior_train.seed)
        sizes = condition_sizes(config, codes["train"], vocabulary)
        prior = build_prior(config.prior, vqvae.num_embeddings, codes["train"].grid_shape, sizes)
        result = train_prior(
            prior,
            codes["train"],
            codes["val"],
            config,
            run.path,
            device,
            vqvae,
            vqvae_path,
            sha256,
            checkpoint,
            processes,
            vocabulary,
        )
    finally:
        leave_process_group()
    if not processes.is_main:
        return None
    summary = _prior_summary(prior, result, codes, config, device, vqvae_path, sha256)
    write_text_atomic(run.prior_summary, json.dumps(summary, indent=2))
    return PriorRunResult(result, summary)


def _log_code_maps(codes: dict[str, CodeMaps], num_embeddings: int) -> None:
    train = codes["train"]
    logger.info(
        "prior over %dx%d maps of %d codes: %d train maps (%g per slice) / %d val maps; "
        "unigram %.3f bits/code",
        *train.grid_shape,
        num_embeddings,
        len(train),
        train.maps_per_slice,
        len(codes["val"]),
        codes["val"].unigram_bits(),
    )


def _prior_summary(prior, result: FitResult, codes, config, device, vqvae_path, sha256) -> dict:
    """The best checkpoint's validation and test figures, for ``prior_summary.json``."""
    best = load_prior_checkpoint(result.best_checkpoint)
    prior = build_prior_model(best, result.best_checkpoint).to(device)  # its averaged weights
    test = evaluate_prior(
        prior, codes["test"], device, config.prior_train.batch_size, seed=config.prior_train.seed
    )
    return {
        "best_epoch": best.progress.epoch,
        "val_nll_bits": best.progress.best_score,
        "val_unigram_bits": codes["val"].unigram_bits(),
        "test_nll_bits": test["nll_bits"],
        "test_accuracy": test["accuracy"],
        "test_unigram_bits": codes["test"].unigram_bits(),
        # 1 + augment.copies: the plain map and its augmented copies (issue 15).
        "train_maps_per_slice": codes["train"].maps_per_slice,
        "train_maps": len(codes["train"]),
        "vqvae": str(vqvae_path),
        "vqvae_sha256": sha256,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: DataSources,
    out: str | Path,
    config: Config | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Score a VQ-VAE checkpoint on the test split: per-image SSIM/PSNR, a summary and
    figures in ``out``; returns the summary. ``batch_size`` defaults to the run's."""
    checkpoint, out = Path(checkpoint), Path(out)
    folder = OutputFolder(out, EVALUATION, overwrite=overwrite, inputs=(checkpoint,))
    torch_device = resolve_device(device)
    model, saved = load_vqvae(checkpoint, torch_device)
    trained, texture = saved.config, read_texture(saved, checkpoint)
    data_config = data_settings(trained.data, (config or Config()).data)
    slices = load_split(data.test_files(), data_config, label="test")
    with folder:
        folder.remove_previous_outputs()
        batch_size = batch_size or trained.train.batch_size
        protocol = protocol_named((config or Config()).sample_metrics.protocol)
        seed = trained.train.seed
        summary = write_evaluation(
            model, slices, out, torch_device, batch_size, seed, "test", protocol, texture
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
    torch_device = resolve_device(device)
    model, config = load_model(checkpoint, torch_device)
    return reconstruct_file(model, source, out, config.data, torch_device)


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
    device = resolve_device(settings.device)
    vqvae, vqvae_checkpoint = load_vqvae(vqvae_path, device)
    vqvae_config = vqvae_checkpoint.config
    reference = read_data_reference(vqvae_checkpoint, vqvae_path)
    if reference is None:
        logger.warning(
            "%s records no reference of its training slices (trained by an older mri-vqvae): "
            "the samples hold the decoded images in [0, 1] with an identity affine; retrain "
            "the VQ-VAE for samples in the training data's geometry and intensity scale",
            vqvae_path,
        )
    prior, checkpoint = load_prior(prior_path, vqvae_path, device)
    if vqvae_config.data.image_size is not None:
        check_prior_fits(vqvae, prior, vqvae_config.data.image_size)
    _check_sampler_settings(prior, checkpoint, settings)
    conditions = draw_conditions(
        checkpoint.extras,
        settings.num_samples,
        torch.Generator().manual_seed(settings.seed),
        settings.slice_position,
        settings.label_values(),
    )
    run = generate_samples(vqvae, prior, settings.num_samples, settings, conditions, settings.seed)
    run, texture_record = _with_texture(run, vqvae_checkpoint, vqvae_path, settings)
    metadata = {
        # Absolute, so evaluate-samples finds them from any working folder.
        "vqvae": str(vqvae_path.resolve()),
        "vqvae_sha256": checkpoint.extras["vqvae_sha256"],
        "prior": str(prior_path.resolve()),
        "prior_sha256": file_sha256(prior_path),
        "prior_architecture": checkpoint.config.prior.architecture,
        "settings": settings,
        "seed": settings.seed,
        "slice_position": settings.slice_position,
        "conditions": _described_conditions(conditions, checkpoint.extras, settings),
        "texture": texture_record,
        "device": str(device),
    }
    with folder:
        folder.remove_previous_outputs()
        write_samples(run, out, metadata, reference)
    refresh_report(vqvae_path)
    return run


def _with_texture(
    run: SampleRun, checkpoint: Checkpoint, path: Path, settings: SampleConfig
) -> tuple[SampleRun, dict[str, Any]]:
    """The decoded samples with a draw of the VQ-VAE's acquisition texture added (when
    ``sample.texture`` is on and the VQ-VAE has one), and what samples.json says of it."""
    if not settings.texture:
        return run, {"applied": False, "reason": "sample.texture is off: the decoder's mean"}
    texture = read_texture(checkpoint, path)
    if texture is None:
        logger.warning(
            "%s keeps no acquisition texture (trained with train.texture_slices 0, or by an "
            "older mri-vqvae): the samples are the decoder's smooth mean",
            path,
        )
        return run, {"applied": False, "reason": "the VQ-VAE keeps no acquisition texture"}
    generator = texture_generator(settings.seed, "samples")
    textured = replace(run, images=texture.sample(run.images, generator))
    return textured, {
        "applied": True,
        "fitted_slices": texture.fitted_slices,
        "intensity_bins": len(texture.bin_centres),
        "seed": settings.seed,
    }


def _check_sampler_settings(prior, checkpoint: Checkpoint, settings) -> None:
    """Refuse guidance through an unconditional model the prior never learned; say when a
    setting has no effect on this prior."""
    sizes = prior.condition_sizes
    guidable = sizes.position or bool(sizes.labels)
    if settings.guidance != 1 and not guidable:
        logger.warning("sample.guidance has no effect: this prior has no position or labels")
    dropout = checkpoint.config.prior_train.condition_dropout
    if settings.guidance != 1 and guidable and dropout == 0:
        raise ConfigError(
            f"sample.guidance {settings.guidance} needs the unconditional model, which this "
            "prior never learned (prior_train.condition_dropout was 0); sample with guidance 1"
        )
    if prior.autoregressive and settings.decoding_steps != SampleConfig().decoding_steps:
        logger.warning("sample.decoding_steps has no effect on an autoregressive prior")


def _described_conditions(conditions, extras: dict, settings) -> dict[str, Any]:
    """What each sample was conditioned on, for ``samples.json``."""
    if conditions is None:
        return {"conditioned": False}
    described: dict[str, Any] = {
        "conditioned": True,
        "guidance": settings.guidance,
        "given": {"slice_position": settings.slice_position, "labels": settings.label_values()},
        "not_given": "drawn from the training slices' conditions",
    }
    if conditions.position is not None:
        described["slice_position"] = [round(float(p), 6) for p in conditions.position]
    if conditions.labels is not None:
        for column, (name, values) in enumerate(extras["label_vocabulary"]):
            described[f"label_{name}"] = [
                values[int(i) - 1] if i > 0 else None for i in conditions.labels[:, column]
            ]
    if conditions.augmentation is not None:
        described["augmentation"] = "none (all parameters zero)"
    return described


def read_samples_metadata(path: Path) -> dict:
    """``samples.json`` as a dict; {} when absent; a named error when it is not what
    ``sample`` writes."""
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot be read as the JSON that sample writes ({err})") from err
    if not isinstance(metadata, dict):
        raise DataError(path, "is not the JSON object that sample writes")
    return metadata


def _samples_vqvae(samples: Path, vqvae_path: Path | None) -> Path:
    """The VQ-VAE the samples were drawn with: ``vqvae_path``, or the one samples.json names
    (checked against the hash it records)."""
    metadata_file = samples / SAMPLES_SUMMARY
    metadata = read_samples_metadata(metadata_file)
    named = metadata.get("vqvae")
    path = vqvae_path or (Path(named) if isinstance(named, str) and named else None)
    if path is None:
        raise ConfigError(f"{metadata_file} is missing or names no VQ-VAE; pass --vqvae")
    expected = metadata.get("vqvae_sha256")
    if expected is not None and not isinstance(expected, str):
        raise DataError(metadata_file, "its vqvae_sha256 is not the text that sample writes")
    if expected and path.is_file() and file_sha256(path) != expected:
        raise UserError(
            f"{path}: not the VQ-VAE these samples were drawn with ({metadata_file} gives "
            f"sha256 {expected[:12]}...)"
        )
    return path


def evaluate_samples(
    samples: str | Path,
    data: DataSources,
    config: Config | None = None,
    *,
    vqvae_path: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Measure a folder written by :func:`sample` against real held-out slices (the val and
    test splits): two-sample tests, memorisation, diversity, code statistics; written to
    ``out`` (default ``SAMPLES/evaluation``). Returns the summary."""
    samples = Path(samples)
    if not samples.is_dir():
        raise DataError(samples, "--samples: no such folder (give a folder written by sample)")
    vqvae_file = _samples_vqvae(samples, Path(vqvae_path) if vqvae_path else None)
    target = Path(out) if out is not None else samples / SAMPLE_EVALUATION_FOLDER
    option = "--out" if out is not None else "--samples"
    folder = OutputFolder(
        target, SAMPLE_EVALUATION, option=option, overwrite=overwrite, inputs=(vqvae_file,)
    )
    settings = (config or Config()).sample_metrics
    device = resolve_device(settings.device)
    vqvae, vqvae_checkpoint = load_vqvae(vqvae_file, device)
    data_config = data_settings(vqvae_checkpoint.config.data, (config or Config()).data)
    generated = load_split(
        list_slices(samples), replace(data_config, use_cache=False), label="samples"
    )
    codes = None
    if (samples / SAMPLE_CODES).is_file() and not generated.skipped:
        codes = load_sample_codes(samples / SAMPLE_CODES)
        codes = codes if len(codes) == len(generated) else None
    texture, plain = _sample_texture(samples, vqvae, vqvae_checkpoint, vqvae_file, codes)
    splits = load_splits(data.files(), data_config)
    held_out = concat_slice_sets([splits["val"], splits["test"]])
    with folder:
        folder.remove_previous_outputs()
        summary = measure_samples(
            generated,
            codes,
            splits["train"],
            held_out,
            vqvae,
            target,
            device,
            settings,
            texture,
            plain,
        )
    refresh_report(vqvae_file)
    return summary


def _sample_texture(
    samples: Path, vqvae: VQVAE, checkpoint: Checkpoint, path: Path, codes: torch.Tensor | None
) -> tuple[ResidualTexture | None, torch.Tensor | None]:
    """The acquisition texture the samples in ``samples`` carry (None when samples.json says
    they carry none), and the decoder's mean of their ``codes``, prepared as loaded slices
    are (None without codes): what meets the reconstructions and joins the memorisation
    search."""
    record = read_samples_metadata(samples / SAMPLES_SUMMARY).get("texture")
    if not isinstance(record, dict) or not record.get("applied"):
        return None, None
    texture = read_texture(checkpoint, path)
    if texture is None:
        raise UserError(
            f"{samples / SAMPLES_SUMMARY} says the samples carry the VQ-VAE's acquisition "
            f"texture, but {path} keeps none: not the VQ-VAE they were drawn with"
        )
    if codes is None:
        logger.warning(
            "%s: no codes.pt for every sample, so the textured files meet reconstructions "
            "given the texture too, and memorisation is searched with the files alone (their "
            "noise lowers each SSIM to a training slice a little)",
            samples,
        )
        return texture, None
    return texture, as_loaded(decode_codes(vqvae, codes.long()))


def make_phantom(out: str | Path, spec: PhantomSpec) -> dict[str, int]:
    """Write the synthetic phantom in the HipMRI layout, only ever into a new or empty folder
    (a phantom never lands among real slices); returns the slice count per split."""
    with OutputFolder(Path(out), PHANTOM, option="OUT"):
        return write_phantom_dataset(out, spec)


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
    with FolderLock(run_dir) if run_dir.is_dir() else contextlib.nullcontext():
        return write_report(run_dir, evaluation, prior, samples)


def refresh_report(vqvae_checkpoint: str | Path) -> Path | None:
    """Bring the report of the run a VQ-VAE checkpoint belongs to up to date, if that run
    folder has one and no other process is writing the run. The command's own outputs are
    written by then, so a report that cannot be written is a warning, not a failure."""
    run_dir = Path(vqvae_checkpoint).parent
    if not (run_dir / REPORT_FILE).is_file():
        return None
    try:
        with FolderLock(run_dir):
            path = write_report(run_dir)
    except FolderBusy as busy:
        logger.warning("did not update %s: %s", run_dir / REPORT_FILE, busy)
    except (OSError, ValueError, UserError) as err:
        logger.warning("could not update %s: %s", run_dir / REPORT_FILE, err)
    else:
        logger.info("updated %s", path)
        return path
    return None
