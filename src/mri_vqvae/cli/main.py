"""The ``mri-vqvae`` command line: parse, load the config, call one library function, report."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from mri_vqvae import workflows
from mri_vqvae.cli.options import parse_args
from mri_vqvae.config import Config, ConfigError, TrainConfig, load_config
from mri_vqvae.data.phantom import PhantomSpec
from mri_vqvae.errors import UserError
from mri_vqvae.files import RunFolder
from mri_vqvae.records.evaluation import EvaluationSummary
from mri_vqvae.records.samples import MEMORISATION_SSIM, SampleMeasures
from mri_vqvae.records.training import VQVAEEpoch
from mri_vqvae.train.loop import FitResult, NonFiniteTraining, TrainingInterrupted

logger = logging.getLogger("mri_vqvae")


def _loop_flags(section: str) -> dict[str, str]:
    """Flags that set a setting of the training loop, for `train` and `train-prior`."""
    names = ("epochs", "batch_size", "lr", "seed", "max_minutes", "device", "precision")
    names += ("memory_format", "checkpoint_every")
    return {name: f"{section}.{name}" for name in names}


def _settings_overrides(
    args: argparse.Namespace,
    flags: dict[str, str],
    switches: dict[str, str] | None = None,
    lists: dict[str, str] | None = None,
) -> list[str]:
    """The ``section.key=value`` overrides a command line gives, in the order ``--help``
    documents: the flags (argument name to setting) first, the switches (argument name to the
    setting they set) next, then the explicit overrides, which therefore win."""
    given = [
        f"{key}={getattr(args, name)}"
        for name, key in flags.items()
        if getattr(args, name, None) is not None
    ]
    given += [key for name, key in (switches or {}).items() if getattr(args, name, False)]
    # Repeated flags (a list) become one YAML list, written as JSON so any value survives.
    given += [
        f"{key}={json.dumps(getattr(args, name))}"
        for name, key in (lists or {}).items()
        if getattr(args, name, None)
    ]
    return given + list(getattr(args, "overrides", []))


def _sources(args: argparse.Namespace) -> workflows.DataSources:
    return workflows.DataSources(args.data, args.train, args.val, args.test)


def _settings(args: argparse.Namespace, overrides: list[str]) -> Config:
    """The defaults, a preset, ``--config``, then the command line's settings."""
    return load_config(args.config, overrides, preset=getattr(args, "preset", None))


def run_demo_data(args: argparse.Namespace) -> None:
    height, width = (int(v) for v in args.size.strip("[]").split(","))
    spec = PhantomSpec(
        train_cases=args.train_cases,
        val_cases=args.val_cases,
        test_cases=args.test_cases,
        weeks=args.weeks,
        slices=args.slices,
        height=height,
        width=width,
        seed=args.seed,
    )
    counts = workflows.make_phantom(args.out, spec, workers=args.workers)
    print(
        f"wrote phantom dataset to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


def run_config(args: argparse.Namespace) -> None:
    print(_settings(args, list(args.overrides)).to_yaml(), end="")


_TRAIN_SWITCHES = {
    "skip_bad_files": "data.skip_bad_files=true",
    "compile": "train.compile=true",
    "tensorboard": "train.tensorboard=true",
}


def run_train(args: argparse.Namespace) -> None:
    flags = {**_loop_flags("train"), "size": "data.image_size"}
    overrides = _settings_overrides(args, flags, _TRAIN_SWITCHES)
    if args.resume and (args.config or args.preset):
        raise ConfigError("--resume takes its settings from the run; drop --config/--preset")
    config = None if args.resume else _settings(args, overrides)
    result = workflows.train_vqvae_run(
        args.out,
        _sources(args),
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        overrides=overrides,
    )
    if result is not None:
        _print_training_result(result)


def _print_training_result(result: FitResult) -> None:
    print(f"run folder: {result.run_dir}")
    if result.history:
        final = VQVAEEpoch.from_plain(result.history[-1])
        print(
            f"  epochs done {final.epoch}, val SSIM {final.val_ssim:.4f}, "
            f"codes used {100 * final.val_codebook_usage:.1f}%"
        )
    if result.best_checkpoint.is_file():
        print(f"  checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    else:  # no epoch's validation loss was finite
        logger.warning(
            "no best.pt: no epoch had a finite validation loss; %s is the last state",
            result.last_checkpoint,
        )
    run = RunFolder(result.run_dir)
    print(f"  pictures: {run.reconstructions}, {run.ssim_curves}, {run.batch_losses}")
    if run.report.is_file():
        print(f"  report: {run.report}")
    if run.tensorboard.is_dir():
        print(f"  TensorBoard: tensorboard --logdir {run.tensorboard}")


_SKIP_BAD_FILES = {"skip_bad_files": "data.skip_bad_files=true"}


def run_evaluate(args: argparse.Namespace) -> None:
    config = _settings(args, _settings_overrides(args, {}, _SKIP_BAD_FILES))
    summary = workflows.evaluate_checkpoint(
        args.checkpoint,
        _sources(args),
        args.out,
        config,
        batch_size=args.batch_size,
        device=args.device or "auto",
        overwrite=args.overwrite,
    )
    _print_evaluation(summary, args.out)


def _print_realism(summary: EvaluationSummary) -> None:
    """Whether reconstructions, plain and with the acquisition texture, pass for real."""
    spectrum, two_sample = summary.power_spectrum, summary.two_sample
    if spectrum is None or two_sample is None:
        return
    plain = two_sample.reconstructions_vs_real
    line = "told from real slices at " + ("-" if plain is None else f"{plain.accuracy:.3f}")
    line += f", spectrum gap {spectrum.largest_gap_db_up_to_half_nyquist:.1f} dB"
    if spectrum.textured is not None and summary.textured:
        textured = two_sample.textured_reconstructions_vs_real
        line += "; with the acquisition texture "
        line += "-" if textured is None else f"{textured.accuracy:.3f}"
        line += (
            f", {spectrum.textured.largest_gap_db_up_to_half_nyquist:.1f} dB "
            f"(SSIM {summary.textured_ssim_mean:.4f})"
        )
    null = two_sample.null_real_halves
    print(line if null is None else f"{line} (null {null.accuracy:.3f})")


def _print_evaluation(s: EvaluationSummary, out: Path) -> None:
    print(
        f"test SSIM {s.ssim_mean:.4f} (min {s.ssim_min:.4f}), PSNR {s.psnr_mean:.2f} "
        f"dB, codes used {100 * s.codebook_usage:.1f}%, perplexity {s.perplexity:.1f} "
        f"over {s.n_images} images"
    )
    print(
        f"inside the anatomy: SSIM {s.foreground_ssim_mean:.4f}, PSNR "
        f"{s.foreground_psnr_mean:.2f} dB; SSIM under the seed's protocol "
        f"{s.ssim_seed_protocol_mean:.4f} (to compare with its 0.799 only)"
    )
    _print_realism(s)
    textured = ", textured_reconstructions.png" if s.textured else ""
    print(
        f"results in {out}: metrics.json, per_image_metrics.csv, ssim_scores_test_set.png, "
        f"best_image.png, worst_image.png, reconstructed_images.png{textured}"
    )


def run_reconstruct(args: argparse.Namespace) -> None:
    workflows.reconstruct_slice(
        args.checkpoint,
        args.input,
        args.out,
        device=args.device or "auto",
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}")


_PRIOR_SWITCHES = {
    "skip_bad_files": "data.skip_bad_files=true",
    "condition_on_slice_position": "prior.condition_on_slice_position=true",
    "tensorboard": "prior_train.tensorboard=true",
}


def run_train_prior(args: argparse.Namespace) -> None:
    flags = {**_loop_flags("prior_train"), "architecture": "prior.architecture"}
    lists = {"condition_label": "prior.condition_labels"}
    overrides = _settings_overrides(args, flags, _PRIOR_SWITCHES, lists)
    if args.resume and args.config:
        raise ConfigError("--resume takes its settings from the run; drop --config")
    config = None if args.resume else _settings(args, overrides)
    if config is not None and config.train != TrainConfig():
        logger.warning(
            "the train section sets how a VQ-VAE trains and train-prior ignores it; the "
            "prior's training settings are the prior_train section"
        )
    result = workflows.train_prior_run(
        args.out,
        args.vqvae,
        _sources(args),
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        overrides=overrides,
    )
    if result is not None:
        _print_prior_result(result)


def _print_prior_result(result: workflows.PriorRunResult) -> None:
    s, fit = result.summary, result.fit
    below = s.below_unigram
    print(f"prior folder: {fit.run_dir}")
    print(
        f"  best epoch {s.best_epoch}: val NLL {s.val_nll_bits:.3f} bits/code, "
        f"{100 * abs(below):.1f}% {'below' if below >= 0 else 'above'} the unigram "
        f"{s.val_unigram_bits:.3f}; test NLL {s.test_nll_bits:.3f} (accuracy "
        f"{100 * s.test_accuracy:.1f}%)"
    )
    print(f"  checkpoints: {fit.best_checkpoint} (best), {fit.last_checkpoint} (last)")
    run = RunFolder(fit.run_dir)
    print(f"  pictures: {run.prior_samples}, {run.nll_curves}")


_SAMPLE_FLAGS = {
    "n": "sample.num_samples",
    "temperature": "sample.temperature",
    "top_k": "sample.top_k",
    "top_p": "sample.top_p",
    "seed": "sample.seed",
    "slice_position": "sample.slice_position",
    "batch_size": "sample.batch_size",
    "device": "sample.device",
    "guidance": "sample.guidance",
    "decoding_steps": "sample.decoding_steps",
}


def run_sample(args: argparse.Namespace) -> None:
    switches = {"no_cache": "sample.use_cache=false", "no_texture": "sample.texture=false"}
    lists = {"label": "sample.labels"}
    config = _settings(args, _settings_overrides(args, _SAMPLE_FLAGS, switches, lists))
    run = workflows.sample(args.vqvae, args.prior, args.out, config, overwrite=args.overwrite)
    count = run.codes.shape[0]
    print(
        f"{count} samples in {run.sampling_seconds:.1f} s of sampling "
        f"({run.codes.numel() / run.sampling_seconds:.0f} codes/s) and "
        f"{run.decoding_seconds:.1f} s of decoding"
    )
    print(f"wrote {args.out}: samples.png, sample_*.nii.gz, codes.pt, samples.json")


_SAMPLE_METRIC_FLAGS = {
    "seed": "sample_metrics.seed",
    "protocol": "sample_metrics.protocol",
    "reference_slices": "sample_metrics.reference_slices",
    "device": "sample_metrics.device",
}


def run_evaluate_samples(args: argparse.Namespace) -> None:
    switches = {"skip_bad_files": "data.skip_bad_files=true"}
    config = _settings(args, _settings_overrides(args, _SAMPLE_METRIC_FLAGS, switches))
    summary = workflows.evaluate_samples(
        args.samples,
        _sources(args),
        config,
        vqvae_path=args.vqvae,
        out=args.out,
        overwrite=args.overwrite,
    )
    _print_sample_measures(summary, args.out or args.samples / "evaluation")


def _print_sample_measures(measures: SampleMeasures, out: Path) -> None:
    two_sample = measures.two_sample
    print(f"protocol {measures.protocol.name}; two-sample accuracy (0.5 = indistinguishable):")
    for _, label, test in two_sample.by_comparison():
        print(
            f"  {label}: {test.accuracy:.3f} [{test.ci95_low:.3f}, {test.ci95_high:.3f}] "
            f"({test.images_per_set} per set)"
        )
    if not two_sample.trustworthy:
        print(f"  untrustworthy: {two_sample.untrustworthy_reason}")
    for space, kid in measures.kid.items():
        ratio = "n/a" if kid.ratio_to_null is None else f"{kid.ratio_to_null:.2f}"
        coverage = measures.density_coverage[space].samples_vs_train_reconstructions
        print(
            f"{space} features: KID {kid.samples_vs_train_reconstructions.mean:.5f} "
            f"(null level {kid.null_level:.5f}, ratio {ratio}; shift "
            f"{kid.shift_train_vs_held_out_reconstructions.mean:.5f}), density "
            f"{coverage.density:.3f}, coverage {coverage.coverage:.3f}"
        )
    print(
        f"nearest training slice: median SSIM {measures.nearest_train_ssim_samples.median:.3f}, "
        f"{100 * measures.share_samples_memorised:.1f}% of samples above "
        f"{MEMORISATION_SSIM} (held-out real slices: "
        f"{100 * measures.share_held_out_memorised:.1f}%)"
    )
    print(
        f"pairwise SSIM: samples {measures.pairwise_ssim_samples:.3f}, real "
        f"{measures.pairwise_ssim_held_out:.3f} (ratio {measures.diversity_ratio:.2f}), "
        f"reconstructions {measures.pairwise_ssim_reconstructions:.3f} (ratio "
        f"{measures.diversity_ratio_vs_reconstructions:.2f})"
    )
    print(
        f"code histogram JS divergence {measures.code_js_divergence_bits:.4f} bits (train vs "
        f"held-out: {measures.code_js_divergence_train_vs_held_out_bits:.4f}); codes used: "
        f"samples {measures.codes_used_by_samples}, held-out {measures.codes_used_by_held_out}"
    )
    print(
        f"results in {out} ({measures.seconds:.0f} s): sample_metrics.json, memorisation.csv, "
        "closest_to_training.png, samples_with_nearest_training.png, nearest_training_ssim.png"
    )


def run_report(args: argparse.Namespace) -> None:
    path = workflows.write_run_report(
        args.run_dir,
        args.evaluation,
        args.prior,
        args.samples,
        args.out,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")


COMMANDS = {
    "demo-data": run_demo_data,
    "config": run_config,
    "train": run_train,
    "evaluate": run_evaluate,
    "reconstruct": run_reconstruct,
    "train-prior": run_train_prior,
    "sample": run_sample,
    "evaluate-samples": run_evaluate_samples,
    "report": run_report,
}


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same one, without the options
    that only a new run takes, with ``--resume``."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in ("--config", "--preset"):
            skip = True
            continue
        if token == "--overwrite" or token.startswith(("--config=", "--preset=")):
            continue
        kept.append(token)
    if "--resume" not in kept:
        kept.append("--resume")
    return shlex.join(["mri-vqvae", *kept])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mri-vqvae`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as done:  # argparse's usage errors, --help and --version
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    from mri_vqvae.runtime import keep_freed_memory

    keep_freed_memory()
    try:
        COMMANDS[args.command](args)
    except NonFiniteTraining as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 3
    except UserError as err:  # bad input, named; anything else is a bug with its traceback
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"mri-vqvae {args.command}: {stop}", file=sys.stderr)
        print(f"resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.signal_number  # the shell's convention for a signal's exit status
    except KeyboardInterrupt:
        print(f"mri-vqvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in _STORAGE_ERRORS:
            raise  # anything else is a bug, and keeps its traceback
        message = _storage_message(err, args.command, argv)
        print(f"mri-vqvae {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


# Faults of the disk or the file system rather than of the tool: a line, not a traceback.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG}


def _storage_message(err: OSError, command: str, argv: list[str]) -> str:
    where = f" {err.filename}" if err.filename else ""
    message = f"cannot write{where}: {err.strerror or err}"
    if command in ("train", "train-prior"):
        message += (
            "; checkpoints are replaced whole, so the last one written is intact: make room, "
            f"then continue from it with {resume_command(argv)}"
        )
    return message


def run() -> NoReturn:
    """The ``mri-vqvae`` console script and ``python -m mri_vqvae``: :func:`main`, then the
    process ends the way a worker of a ``torchrun`` group must (see
    :func:`mri_vqvae.distributed.finish_process`)."""
    exit_status = main()
    distributed = sys.modules.get("mri_vqvae.distributed")  # not imported: no group joined
    if distributed is None:
        raise SystemExit(exit_status)
    distributed.finish_process(exit_status)
