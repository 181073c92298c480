"""The ``mri-vqvae`` command line: parse, load the config, call one library function, report."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from mri_vqvae import __version__
from mri_vqvae.config import ConfigError
from mri_vqvae.data.nifti import DataError
from mri_vqvae.errors import UserError
from mri_vqvae.files import write_text_atomic

logger = logging.getLogger("mri_vqvae")


# The largest slice the loader accepts (64 Mi voxels) and the smallest side it reads.
_MAX_VOXELS, _MIN_SIDE = 2**26, 8


def _size(text: str) -> str:
    """``256x128`` (height x width) or ``native``, as a YAML value for ``data.image_size``."""
    if text.lower() == "native":
        return "null"
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like 256x128 or 'native', got {text!r}")
    height, width = int(parts[0]), int(parts[1])
    if min(height, width) < _MIN_SIDE or height * width > _MAX_VOXELS:
        raise argparse.ArgumentTypeError(
            f"size {height}x{width}: each side must be at least {_MIN_SIDE} pixels and the "
            f"slice at most {_MAX_VOXELS} pixels"
        )
    return f"[{height}, {width}]"


def _whole_number(minimum: int, maximum: int = 2**63 - 1):
    """An argparse type: an integer from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(low: float, high: float = math.inf, low_open: bool = True):
    """An argparse type: a finite number in ``(low, high]`` (``[low, high]`` if not
    ``low_open``); nan and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            if high == math.inf:
                bounds = f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_count = _whole_number(1)
_seed = _whole_number(0, 2**32 - 1)  # NumPy's seeds stop there
_positive = _number(0)


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data")
    group.add_argument("--data", metavar="ROOT", help="HipMRI-layout root (keras_slices_*)")
    group.add_argument("--train", metavar="DIR", help="folder of training slices")
    group.add_argument("--val", metavar="DIR", help="folder of validation slices")
    group.add_argument("--test", metavar="DIR", help="folder of test slices")
    group.add_argument(
        "--skip-bad-files", action="store_true", help="warn about and skip unreadable slices"
    )
    return parent


def _device_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: CUDA if present)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mri-vqvae", description="A discrete generative model of 2D MRI slices (VQ-VAE)."
    )
    parser.add_argument("--version", action="version", version=f"mri-vqvae {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data, device = _data_options(), _device_option()

    demo = commands.add_parser(
        "demo-data",
        help="write the synthetic pelvic MRI phantom in the HipMRI layout",
        description="Write a synthetic pelvic MRI phantom dataset in the HipMRI layout.",
    )
    demo.add_argument("out", type=Path, help="folder to create (new or empty)")
    demo.add_argument("--train-cases", type=_count, default=16)
    demo.add_argument("--val-cases", type=_count, default=2)
    demo.add_argument("--test-cases", type=_count, default=2)
    demo.add_argument("--weeks", type=_count, default=2, help="volumes per case")
    demo.add_argument("--slices", type=_count, default=16, help="slices per volume")
    demo.add_argument(
        "--size", type=_size, default="256x128", help="slice array shape (default 256x128)"
    )
    demo.add_argument("--seed", type=_seed, default=0)

    train = commands.add_parser(
        "train",
        parents=[data, device],
        help="train a VQ-VAE",
        description="Train a VQ-VAE. Settings: --config YAML, the flags below, then any "
        "section.key=value overrides (e.g. model.num_embeddings=256).",
    )
    train.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    train.add_argument(
        "--preset",
        choices=["8x", "4x", "seed"],
        help="starting recipe: 8x (the default: 32x16 codes per 256x128 slice), 4x (64x32 "
        "codes), or seed (the seed's recipe, to compare with); --config and overrides apply "
        "on top",
    )
    train.add_argument("--config", type=Path, help="YAML file of settings")
    train.add_argument("--epochs", type=_count)
    train.add_argument("--batch-size", type=_count)
    train.add_argument("--lr", type=_positive)
    train.add_argument("--size", type=_size, help="HxW to resize slices to, or 'native'")
    train.add_argument("--seed", type=_seed)
    train.add_argument("--max-minutes", type=_positive, help="wall-clock training budget")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from its last.pt (mid-epoch ones included)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in RUN_DIR (its checkpoints, logs and pictures), or "
        "write into a folder that is not a run (replacing files with the outputs' names)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_count,
        metavar="N",
        help="also write last.pt every N steps inside epochs (default: at epoch ends only)",
    )
    train.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        help="training precision; auto (the default) is bfloat16 on GPUs and AMX CPUs",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (13%% faster for the default recipe on a CPU; "
        "the first epoch pays 20-60 s of compilation)",
    )
    train.add_argument(
        "--memory-format",
        choices=["auto", "channels_last", "contiguous"],
        help="activation layout; auto (the default) is channels-last on GPUs and for the seed "
        "architecture",
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log scalars and preview grids for TensorBoard in RUN_DIR/tensorboard",
    )
    train.add_argument("overrides", nargs="*", metavar="section.key=value")

    evaluate = commands.add_parser(
        "evaluate",
        parents=[data, device],
        help="score a checkpoint on the test split",
        description="Per-image SSIM/PSNR on the test split, a summary and figures.",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, required=True, help="folder to write")
    evaluate.add_argument("--batch-size", type=_count, default=32)
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace an evaluation already in --out"
    )

    prior = commands.add_parser(
        "train-prior",
        parents=[data, device],
        help="train a prior over a VQ-VAE's codes",
        description="Encode every split to code maps with a trained VQ-VAE (cached in "
        "PRIOR_DIR/codes), then train an autoregressive prior over them. Settings: --config "
        "YAML (sections prior and train), the flags below, then section.key=value overrides "
        "(e.g. prior.num_layers=8).",
    )
    prior.add_argument("--vqvae", type=Path, required=True, help="VQ-VAE checkpoint (best.pt)")
    prior.add_argument("--out", type=Path, required=True, metavar="PRIOR_DIR")
    prior.add_argument("--config", type=Path, help="YAML file of prior settings")
    prior.add_argument(
        "--architecture",
        choices=["transformer", "pixelcnn"],
        help="transformer (the default) or the gated PixelCNN of the VQ-VAE paper",
    )
    prior.add_argument(
        "--condition-on-slice-position",
        action="store_true",
        help="condition on each slice's position in its volume (from slice_<S> in the names)",
    )
    prior.add_argument("--epochs", type=_count)
    prior.add_argument("--batch-size", type=_count)
    prior.add_argument("--lr", type=_positive)
    prior.add_argument("--seed", type=_seed)
    prior.add_argument("--max-minutes", type=_positive, help="wall-clock training budget")
    prior.add_argument(
        "--precision", choices=["auto", "float32", "bfloat16"], help="training precision"
    )
    prior.add_argument("--resume", action="store_true", help="continue the run in PRIOR_DIR")
    prior.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the prior already in PRIOR_DIR (its cached codes are kept)",
    )
    prior.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log scalars and sample grids for TensorBoard in PRIOR_DIR/tensorboard",
    )
    prior.add_argument("overrides", nargs="*", metavar="section.key=value")

    sample = commands.add_parser(
        "sample",
        parents=[device],
        help="generate new slices with a VQ-VAE and its prior",
        description="Draw code maps from the prior and decode them: a PNG grid, one NIfTI per "
        "sample, the codes and samples.json.",
    )
    sample.add_argument("--vqvae", type=Path, required=True, help="VQ-VAE checkpoint")
    sample.add_argument("--prior", type=Path, required=True, help="prior checkpoint")
    sample.add_argument("--n", type=_count, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", type=Path, required=True, help="folder to write")
    sample.add_argument("--temperature", type=_positive, default=1.0)
    sample.add_argument("--top-k", type=_count, help="sample among the k most likely codes")
    sample.add_argument(
        "--top-p", type=_number(0, 1), help="sample within the top-p nucleus, in (0, 1]"
    )
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument(
        "--slice-position",
        type=_number(0, 1, low_open=False),
        help="position in the volume, 0 to 1 (a prior trained with slice positions only)",
    )
    sample.add_argument("--batch-size", type=_count, default=64, help="maps sampled together")
    sample.add_argument(
        "--overwrite", action="store_true", help="replace the samples already in --out"
    )
    sample.add_argument(
        "--no-cache", action="store_true", help="recompute the prefix per code (slow; to compare)"
    )

    judge = commands.add_parser(
        "evaluate-samples",
        parents=[data, device],
        help="score generated slices against real ones",
        description="Two-sample classifier tests (against real held-out slices and against "
        "their VQ-VAE reconstructions), memorisation, diversity and code statistics of a "
        "folder written by 'sample'; real held-out slices are the val and test splits.",
    )
    judge.add_argument("--samples", type=Path, required=True, help="folder written by 'sample'")
    judge.add_argument(
        "--vqvae", type=Path, help="VQ-VAE checkpoint (default: the one samples.json names)"
    )
    judge.add_argument("--out", type=Path, help="folder to write (default: SAMPLES/evaluation)")
    judge.add_argument("--seed", type=_seed, default=0)
    judge.add_argument(
        "--classifier-steps",
        type=_count,
        default=300,
        help="training steps per fold (default 300)",
    )
    judge.add_argument("--folds", type=_whole_number(2), default=4)
    judge.add_argument(
        "--overwrite", action="store_true", help="replace a sample evaluation already in --out"
    )

    report = commands.add_parser(
        "report",
        help="write a run's self-contained HTML report",
        description="Write RUN_DIR/report.html, one page with every picture embedded: the "
        "configuration, training curves, reconstruction metrics and examples, the codebook "
        "atlas, and the prior and its samples when the run folder holds them. Training writes "
        "it at its end; evaluate, train-prior, sample and evaluate-samples bring it up to date "
        "when their outputs lie inside the run folder.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by train")
    report.add_argument(
        "--evaluation",
        type=Path,
        help="evaluation folder (default: the newest test evaluation in RUN_DIR, else "
        "RUN_DIR/validation)",
    )
    report.add_argument("--prior", type=Path, help="prior folder (default: found in RUN_DIR)")
    report.add_argument("--samples", type=Path, help="sample folder (default: found in RUN_DIR)")
    report.add_argument(
        "--out", type=Path, help="file to write (default: RUN_DIR/report.html, kept up to date)"
    )
    report.add_argument(
        "--overwrite", action="store_true", help="replace an existing file given as --out"
    )

    reconstruct = commands.add_parser(
        "reconstruct",
        parents=[device],
        help="reconstruct one NIfTI slice",
        description="Reconstruct one slice; the output keeps the input's shape, affine, header.",
    )
    reconstruct.add_argument("input", type=Path)
    reconstruct.add_argument("--checkpoint", type=Path, required=True)
    reconstruct.add_argument(
        "--out", type=Path, required=True, help="file to write (.nii or .nii.gz, not the input)"
    )
    reconstruct.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (never the input)"
    )
    return parser


# Flags that set a training setting, for both `train` and `train-prior`.
TRAIN_FLAGS = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "train.seed",
    "max_minutes": "train.max_minutes",
    "device": "train.device",
    "precision": "train.precision",
    "memory_format": "train.memory_format",
    "checkpoint_every": "train.checkpoint_every",
}


def _settings_overrides(
    args: argparse.Namespace, flags: dict[str, str], switches: dict[str, str] | None = None
) -> list[str]:
    """The ``section.key=value`` overrides a command line gives, in the order ``--help``
    documents: the flags (argument name to setting) first, the switches (argument name to the
    setting they turn on) next, then the explicit overrides, which therefore win."""
    given = [
        f"{key}={getattr(args, name)}"
        for name, key in flags.items()
        if getattr(args, name, None) is not None
    ]
    given += [f"{key}=true" for name, key in (switches or {}).items() if getattr(args, name)]
    return given + list(args.overrides)


def _changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every setting that differs between two config dicts."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def _refuse_changes(before: dict, after: dict, sections: tuple[str, ...], checkpoint: Path):
    changes = _changed_settings({s: before[s] for s in sections}, {s: after[s] for s in sections})
    if changes:
        raise ConfigError(
            f"--resume cannot change the {'/'.join(sections)} settings of {checkpoint}: "
            + "; ".join(changes)
        )


def run_demo_data(args: argparse.Namespace) -> None:
    from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset
    from mri_vqvae.files import PHANTOM, OutputFolder

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
    # Only ever into a new or empty folder: a phantom never lands among real slices.
    with OutputFolder(args.out, PHANTOM, option="OUT"):
        counts = write_phantom_dataset(args.out, spec)
    print(
        f"wrote phantom dataset to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` group, or a process on its own: the one that writes files."""
    return os.environ.get("RANK", "0") == "0"


def run_train(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import build_model, load_checkpoint
    from mri_vqvae.config import apply_overrides, config_from_dict, load_config
    from mri_vqvae.files import VQVAE_RUN, OutputFolder

    overrides = _settings_overrides(
        args,
        {**TRAIN_FLAGS, "size": "data.image_size"},
        {
            "skip_bad_files": "data.skip_bad_files",
            "compile": "train.compile",
            "tensorboard": "train.tensorboard",
        },
    )
    last = args.out / "last.pt"
    resume = None
    if args.resume:
        if args.config or args.preset:
            raise ConfigError("--resume takes its settings from the run; drop --config/--preset")
        if args.overwrite:
            raise ConfigError("--resume continues the run in --out; --overwrite would replace it")
    folder = OutputFolder(
        args.out, VQVAE_RUN, overwrite=args.overwrite, resume=args.resume, lock=_is_main_process()
    )
    if args.resume:
        if not last.exists():
            raise ConfigError(f"--resume: {args.out} holds no run to continue ({last} missing)")
        resume = load_checkpoint(last)
        config = config_from_dict(apply_overrides(resume.config.to_dict(), overrides))
        _refuse_changes(resume.config.to_dict(), config.to_dict(), ("model", "data"), last)
    else:
        config = load_config(args.config, overrides, preset=args.preset)
    if config.train.tensorboard:
        from mri_vqvae.train.tensorboard import require_tensorboard

        require_tensorboard()
    with folder:
        model = build_model(resume, last) if resume else None
        result = _train_in(args, folder, config, resume, model)
    if result is not None:
        _print_training_result(result, config)


def _train_in(args, folder, config, resume, resumed_model):
    """Train in a checked, locked run folder; returns the result on the main process only."""
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.distributed import join_process_group, leave_process_group
    from mri_vqvae.model import VQVAE
    from mri_vqvae.runtime import seed_everything
    from mri_vqvae.train.vqvae import train_vqvae

    processes, device = join_process_group(config.train.device)
    try:
        if not processes.is_main:
            logging.getLogger("mri_vqvae").setLevel(logging.WARNING)
        files = resolve_split_files(args.data, args.train, args.val, args.test)
        # The main process decodes and caches the splits; the others then read its cache.
        if not processes.is_main:
            processes.barrier()
        splits = load_splits(files, config.data, splits=("train", "val"))
        if processes.is_main:
            processes.barrier()
        seed_everything(config.train.seed)
        model = resumed_model if resumed_model is not None else VQVAE.from_config(config.model)
        logger.info(
            "training on %s: %d train / %d val slices at %dx%d",
            device,
            len(splits["train"]),
            len(splits["val"]),
            *splits["train"].image_size,
        )
        if processes.is_main and resume is None:
            # Only now, with the settings and data known good, is an old run let go.
            folder.remove_previous_outputs()
        result = train_vqvae(
            model, splits["train"], splits["val"], config, folder.path, device, resume, processes
        )
    finally:
        leave_process_group()
    return result if processes.is_main else None


def _print_training_result(result, config) -> None:
    final = result.history[-1] if result.history else None
    print(f"run folder: {result.run_dir}")
    if final:
        print(
            f"  epochs done {final['epoch']}, val SSIM {final['val_ssim']:.4f}, "
            f"codes used {100 * final['val_codebook_usage']:.1f}%"
        )
    if result.best_checkpoint.is_file():
        print(f"  checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    else:  # no epoch's validation loss was finite
        logger.warning(
            "no best.pt: no epoch had a finite validation loss; %s is the last state",
            result.last_checkpoint,
        )
    print(
        f"  pictures: {result.run_dir / 'reconstructions'}, {result.run_dir / 'ssim_scores.png'}, "
        f"{result.run_dir / 'batch_losses.png'}"
    )
    if (result.run_dir / "report.html").is_file():
        print(f"  report: {result.run_dir / 'report.html'}")
    if config.train.tensorboard:
        print(f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")


def run_evaluate(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import load_model
    from mri_vqvae.data.dataset import list_slices, load_split, resolve_split_files
    from mri_vqvae.evaluate.reconstruction import write_evaluation
    from mri_vqvae.files import EVALUATION, OutputFolder
    from mri_vqvae.runtime import resolve_device

    folder = OutputFolder(args.out, EVALUATION, overwrite=args.overwrite, inputs=(args.checkpoint,))
    device = resolve_device(args.device or "auto")
    model, config = load_model(args.checkpoint, device)
    data_config = replace(config.data, skip_bad_files=args.skip_bad_files)
    if args.test is not None:
        files = list_slices(args.test)
    else:
        files = resolve_split_files(args.data, args.train, args.val, args.test)["test"]
    slices = load_split(files, data_config, label="test")
    with folder:
        folder.remove_previous_outputs()
        summary = write_evaluation(
            model, slices, args.out, device, args.batch_size, config.train.seed
        )
    print(
        f"test SSIM {summary['ssim_mean']:.4f} (min {summary['ssim_min']:.4f}), "
        f"PSNR {summary['psnr_mean']:.2f} dB, codes used {100 * summary['codebook_usage']:.1f}%, "
        f"perplexity {summary['perplexity']:.1f} over {summary['n_images']} images"
    )
    print(
        f"inside the anatomy: SSIM {summary['foreground_ssim_mean']:.4f}, PSNR "
        f"{summary['foreground_psnr_mean']:.2f} dB; SSIM under the seed's protocol "
        f"{summary['ssim_seed_protocol_mean']:.4f} (to compare with its 0.799 only)"
    )
    print(
        f"results in {args.out}: metrics.json, per_image_metrics.csv, ssim_scores_test_set.png, "
        "best_image.png, worst_image.png, reconstructed_images.png"
    )
    _refresh_report(args.checkpoint)


def run_reconstruct(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import load_model
    from mri_vqvae.data.nifti import NIFTI_SUFFIXES
    from mri_vqvae.evaluate.reconstruction import reconstruct_file
    from mri_vqvae.files import check_output_file
    from mri_vqvae.runtime import resolve_device

    check_output_file(
        args.out, "--out", args.overwrite, inputs=(args.input,), suffixes=NIFTI_SUFFIXES
    )
    device = resolve_device(args.device or "auto")
    model, config = load_model(args.checkpoint, device)
    reconstruct_file(model, args.input, args.out, config.data, device)
    print(f"wrote {args.out}")


def run_train_prior(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import check_prior_matches, load_prior_checkpoint
    from mri_vqvae.config import apply_overrides, load_prior_config, prior_config_from_dict
    from mri_vqvae.files import PRIOR_RUN, OutputFolder
    from mri_vqvae.train.tensorboard import require_tensorboard

    overrides = _settings_overrides(
        args,
        {**TRAIN_FLAGS, "architecture": "prior.architecture"},
        {
            "condition_on_slice_position": "prior.condition_on_slice_position",
            "tensorboard": "train.tensorboard",
        },
    )
    last = args.out / "last.pt"
    resume = None
    if args.resume and args.config:
        raise ConfigError("--resume takes its settings from the run; drop --config")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the prior in --out; --overwrite would replace it")
    folder = OutputFolder(
        args.out, PRIOR_RUN, overwrite=args.overwrite, resume=args.resume, inputs=(args.vqvae,)
    )
    if args.resume:
        if not last.exists():
            raise ConfigError(f"--resume: {args.out} holds no prior to continue ({last} missing)")
        resume = load_prior_checkpoint(last)
        check_prior_matches(resume, last, args.vqvae)
        config = prior_config_from_dict(apply_overrides(resume.config.to_dict(), overrides))
        _refuse_changes(resume.config.to_dict(), config.to_dict(), ("prior",), last)
    else:
        config = load_prior_config(args.config, overrides)
    if config.train.tensorboard:
        require_tensorboard()
    with folder:
        _train_prior_in(args, folder, config, resume)
    _refresh_report(args.vqvae)


def _train_prior_in(args, folder, config, resume) -> None:
    """Encode the splits, train the prior and score it on the test split, in a checked and
    locked prior folder."""
    from mri_vqvae.checkpoint import file_sha256, load_model, load_prior_checkpoint
    from mri_vqvae.code_maps import code_maps_for, require_slice_positions
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.model.prior import build_prior
    from mri_vqvae.runtime import resolve_device, seed_everything
    from mri_vqvae.train.prior import evaluate_prior, train_prior

    device = resolve_device(config.train.device)
    vqvae, vqvae_config = load_model(args.vqvae, device)
    vqvae_sha256 = file_sha256(args.vqvae)
    data_config = replace(vqvae_config.data, skip_bad_files=args.skip_bad_files)
    files = resolve_split_files(args.data, args.train, args.val, args.test)
    splits = load_splits(files, data_config)
    codes = {
        split: code_maps_for(
            vqvae, vqvae_sha256, slices, args.out / "codes" / f"{split}.pt", device
        )
        for split, slices in splits.items()
    }
    if config.prior.condition_on_slice_position:
        for split, maps in codes.items():
            require_slice_positions(maps, f"{split} split")
    if resume is None:
        # Only now, with the settings and data known good, is an old prior let go.
        folder.remove_previous_outputs()
    grid = codes["train"].grid_shape
    logger.info(
        "prior over %dx%d maps of %d codes: %d train / %d val maps; unigram %.3f bits/code",
        *grid,
        vqvae.num_embeddings,
        len(codes["train"]),
        len(codes["val"]),
        codes["val"].unigram_bits(),
    )
    seed_everything(config.train.seed)
    prior = build_prior(config.prior, vqvae.num_embeddings, grid)
    result = train_prior(
        prior,
        codes["train"],
        codes["val"],
        config,
        args.out,
        device,
        vqvae,
        args.vqvae,
        vqvae_sha256,
        resume,
    )
    best = load_prior_checkpoint(result.best_checkpoint)
    prior.load_state_dict(best.model_state)
    test = evaluate_prior(prior, codes["test"], device, config.train.batch_size)
    summary = {
        "best_epoch": best.epoch,
        "val_nll_bits": best.best_val_nll,
        "val_unigram_bits": codes["val"].unigram_bits(),
        "test_nll_bits": test["nll_bits"],
        "test_accuracy": test["accuracy"],
        "test_unigram_bits": codes["test"].unigram_bits(),
        "vqvae": str(args.vqvae),
        "vqvae_sha256": vqvae_sha256,
    }
    write_text_atomic(args.out / "prior_summary.json", json.dumps(summary, indent=2))
    below = 1 - summary["val_nll_bits"] / summary["val_unigram_bits"]
    print(f"prior folder: {result.run_dir}")
    print(
        f"  best epoch {best.epoch}: val NLL {summary['val_nll_bits']:.3f} bits/code, "
        f"{100 * abs(below):.1f}% {'below' if below >= 0 else 'above'} the unigram "
        f"{summary['val_unigram_bits']:.3f}; "
        f"test NLL {summary['test_nll_bits']:.3f} (accuracy {100 * test['accuracy']:.1f}%)"
    )
    print(f"  checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    print(f"  pictures: {result.run_dir / 'samples'}, {result.run_dir / 'nll_curves.png'}")


def run_sample(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import file_sha256, load_model, load_prior
    from mri_vqvae.files import SAMPLES, OutputFolder
    from mri_vqvae.generate.sampling import (
        SamplingSettings,
        check_prior_fits,
        generate_samples,
        write_samples,
    )
    from mri_vqvae.runtime import resolve_device

    folder = OutputFolder(
        args.out, SAMPLES, overwrite=args.overwrite, inputs=(args.vqvae, args.prior)
    )
    settings = SamplingSettings(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        batch_size=args.batch_size,
    )
    device = resolve_device(args.device or "auto")
    vqvae, vqvae_config = load_model(args.vqvae, device)
    prior, checkpoint = load_prior(args.prior, args.vqvae, device)
    if vqvae_config.data.image_size is not None:
        check_prior_fits(vqvae, prior, vqvae_config.data.image_size)
    run = generate_samples(vqvae, prior, args.n, settings, args.slice_position, args.seed)
    metadata = {
        # Absolute, so evaluate-samples finds them from any working folder.
        "vqvae": str(args.vqvae.resolve()),
        "vqvae_sha256": checkpoint.vqvae_sha256,
        "prior": str(args.prior.resolve()),
        "prior_sha256": file_sha256(args.prior),
        "prior_architecture": checkpoint.config.prior.architecture,
        "settings": settings,
        "seed": args.seed,
        "slice_position": args.slice_position,
        "device": str(device),
    }
    with folder:
        folder.remove_previous_outputs()
        write_samples(run, args.out, metadata)
    print(
        f"{args.n} samples in {run.sampling_seconds:.1f} s of sampling "
        f"({run.codes.numel() / run.sampling_seconds:.0f} codes/s) and "
        f"{run.decoding_seconds:.1f} s of decoding"
    )
    print(f"wrote {args.out}: samples.png, sample_*.nii.gz, codes.pt, samples.json")
    _refresh_report(args.vqvae)


def run_evaluate_samples(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import CheckpointError, file_sha256, load_model
    from mri_vqvae.data.dataset import (
        concat_slice_sets,
        list_slices,
        load_split,
        load_splits,
        resolve_split_files,
    )
    from mri_vqvae.evaluate.sample_metrics import SampleMetricSettings
    from mri_vqvae.evaluate.samples import evaluate_samples
    from mri_vqvae.files import SAMPLE_EVALUATION, OutputFolder
    from mri_vqvae.generate.sampling import load_sample_codes
    from mri_vqvae.runtime import resolve_device

    if not args.samples.is_dir():
        raise DataError(args.samples, "--samples: no such folder (give a folder written by sample)")
    metadata_file = args.samples / "samples.json"
    metadata = _read_samples_metadata(metadata_file)
    named = metadata.get("vqvae")
    vqvae_path = args.vqvae or (Path(named) if isinstance(named, str) and named else None)
    if vqvae_path is None:
        raise ConfigError(f"{metadata_file} is missing or names no VQ-VAE; pass --vqvae")
    out = args.out or args.samples / "evaluation"
    folder = OutputFolder(
        out,
        SAMPLE_EVALUATION,
        option="--out" if args.out else "--samples",
        overwrite=args.overwrite,
        inputs=(vqvae_path,),
    )
    expected = metadata.get("vqvae_sha256")
    if expected is not None and not isinstance(expected, str):
        raise DataError(metadata_file, "its vqvae_sha256 is not the text that sample writes")
    if expected and Path(vqvae_path).is_file() and file_sha256(vqvae_path) != expected:
        raise CheckpointError(
            f"{vqvae_path}: not the VQ-VAE these samples were drawn with ({metadata_file} "
            f"gives sha256 {expected[:12]}...)"
        )
    device = resolve_device(args.device or "auto")
    vqvae, config = load_model(vqvae_path, device)
    data_config = replace(config.data, skip_bad_files=args.skip_bad_files)
    samples = load_split(
        list_slices(args.samples), replace(data_config, use_cache=False), label="samples"
    )
    codes = None
    codes_file = args.samples / "codes.pt"
    if codes_file.is_file() and not samples.skipped:
        codes = load_sample_codes(codes_file)
        if len(codes) != len(samples):
            codes = None
    files = resolve_split_files(args.data, args.train, args.val, args.test)
    splits = load_splits(files, data_config)
    held_out = concat_slice_sets([splits["val"], splits["test"]])
    settings = SampleMetricSettings(
        folds=args.folds, classifier_steps=args.classifier_steps, seed=args.seed
    )
    with folder:
        folder.remove_previous_outputs()
        summary = evaluate_samples(
            samples, codes, splits["train"], held_out, vqvae, out, device, settings
        )
    real, recon = summary["two_sample_vs_real"], summary["two_sample_vs_reconstructions"]
    print(
        f"two-sample accuracy (0.5 = indistinguishable): against real slices "
        f"{real['accuracy']:.3f} [{real['ci95_low']:.3f}, {real['ci95_high']:.3f}], against "
        f"reconstructions {recon['accuracy']:.3f} [{recon['ci95_low']:.3f}, "
        f"{recon['ci95_high']:.3f}] ({recon['images_per_set']} images per set)"
    )
    print(
        f"nearest training slice: median SSIM {summary['nearest_train_ssim_samples']['median']:.3f}"
        f", {100 * summary['share_samples_above_0.95']:.1f}% of samples above 0.95 (held-out "
        f"real slices: {100 * summary['share_held_out_above_0.95']:.1f}%)"
    )
    print(
        f"pairwise SSIM: samples {summary['pairwise_ssim_samples']:.3f}, real "
        f"{summary['pairwise_ssim_held_out']:.3f} (ratio {summary['diversity_ratio']:.2f}), "
        f"reconstructions {summary['pairwise_ssim_reconstructions']:.3f} (ratio "
        f"{summary['diversity_ratio_vs_reconstructions']:.2f})"
    )
    print(
        f"code histogram JS divergence {summary['code_js_divergence_bits']:.4f} bits (train vs "
        f"held-out: {summary['code_js_divergence_train_vs_held_out_bits']:.4f}); codes used: "
        f"samples {summary['codes_used_by_samples']}, held-out {summary['codes_used_by_held_out']}"
    )
    print(
        f"results in {out}: sample_metrics.json, memorisation.csv, closest_to_training.png, "
        "samples_with_nearest_training.png, nearest_training_ssim.png"
    )
    _refresh_report(vqvae_path)


def _read_samples_metadata(path: Path) -> dict:
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


def run_report(args: argparse.Namespace) -> None:
    from mri_vqvae.files import FolderLock, check_output_file
    from mri_vqvae.report.page import is_report_page, write_report

    if args.out is not None:
        # A page this tool wrote may be replaced; any other existing file needs --overwrite.
        replace_ok = args.overwrite or is_report_page(args.out)
        check_output_file(args.out, "--out", replace_ok, suffixes=(".html", ".htm"))
        path = write_report(args.run_dir, args.evaluation, args.prior, args.samples, args.out)
    else:
        with FolderLock(args.run_dir) if args.run_dir.is_dir() else contextlib.nullcontext():
            path = write_report(args.run_dir, args.evaluation, args.prior, args.samples)
    print(f"wrote {path}")


def _refresh_report(vqvae_checkpoint: Path) -> None:
    """Bring the report of the run a VQ-VAE checkpoint belongs to up to date, if that run
    folder has one and no other process is writing the run. The command's own outputs are
    written by then, so a report that cannot be written is a warning, not a failure."""
    from mri_vqvae.files import FolderBusy, FolderLock
    from mri_vqvae.report.page import REPORT_FILE, write_report

    run_dir = Path(vqvae_checkpoint).parent
    if not (run_dir / REPORT_FILE).is_file():
        return
    try:
        with FolderLock(run_dir):
            print(f"updated {write_report(run_dir)}")
    except FolderBusy as busy:
        logger.warning("did not update %s: %s", run_dir / REPORT_FILE, busy)
    except (OSError, ValueError, UserError) as err:
        logger.warning("could not update %s: %s", run_dir / REPORT_FILE, err)


COMMANDS = {
    "demo-data": run_demo_data,
    "train": run_train,
    "evaluate": run_evaluate,
    "reconstruct": run_reconstruct,
    "train-prior": run_train_prior,
    "sample": run_sample,
    "evaluate-samples": run_evaluate_samples,
    "report": run_report,
}


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; ``section.key=value`` overrides may stand anywhere in it, before
    or after flags, and keep their order."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        overrides = [token for token in unknown if _OVERRIDE.match(token)]
        others = [token for token in unknown if not _OVERRIDE.match(token)]
        if others or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(others or unknown)}")
        # Overrides after a flag were left over; the command line's order is kept.
        args.overrides = [token for token in argv if token in set(args.overrides) | set(overrides)]
    return args


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

    from mri_vqvae.train.vqvae import NonFiniteTraining, TrainingInterrupted

    try:
        COMMANDS[args.command](args)
    except (UserError, ValueError) as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"mri-vqvae {args.command}: {stop}", file=sys.stderr)
        print(f"resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.signal_number  # the shell's convention for a signal's exit status
    except NonFiniteTraining as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 3
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
