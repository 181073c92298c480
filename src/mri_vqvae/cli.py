"""The ``mri-vqvae`` command line: parse, load the config, call one library function, report."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from mri_vqvae import __version__

logger = logging.getLogger("mri_vqvae")


def _size(text: str) -> str:
    """``256x128`` (height x width) or ``native``, as a YAML value for ``data.image_size``."""
    if text.lower() == "native":
        return "null"
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like 256x128 or 'native', got {text!r}")
    return f"[{int(parts[0])}, {int(parts[1])}]"


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
    demo.add_argument("out", type=Path, help="folder to create")
    demo.add_argument("--train-cases", type=int, default=16)
    demo.add_argument("--val-cases", type=int, default=2)
    demo.add_argument("--test-cases", type=int, default=2)
    demo.add_argument("--weeks", type=int, default=2, help="volumes per case")
    demo.add_argument("--slices", type=int, default=16, help="slices per volume")
    demo.add_argument("--size", default="256x128", help="slice array shape (default 256x128)")
    demo.add_argument("--seed", type=int, default=0)

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
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--size", type=_size, help="HxW to resize slices to, or 'native'")
    train.add_argument("--seed", type=int)
    train.add_argument("--max-minutes", type=float, help="wall-clock training budget")
    train.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")

    evaluate = commands.add_parser(
        "evaluate",
        parents=[data, device],
        help="score a checkpoint on the test split",
        description="Per-image SSIM/PSNR on the test split, a summary and figures.",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--batch-size", type=int, default=32)

    reconstruct = commands.add_parser(
        "reconstruct",
        parents=[device],
        help="reconstruct one NIfTI slice",
        description="Reconstruct one slice; the output keeps the input's shape, affine, header.",
    )
    reconstruct.add_argument("input", type=Path)
    reconstruct.add_argument("--checkpoint", type=Path, required=True)
    reconstruct.add_argument("--out", type=Path, required=True)
    return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "train.seed",
        "max_minutes": "train.max_minutes",
        "device": "train.device",
        "size": "data.image_size",
    }
    overrides = [
        f"{key}={getattr(args, name)}"
        for name, key in flags.items()
        if getattr(args, name, None) is not None
    ]
    if getattr(args, "skip_bad_files", False):
        overrides.append("data.skip_bad_files=true")
    return overrides


def run_demo_data(args: argparse.Namespace) -> None:
    from mri_vqvae.data.phantom import PhantomSpec, write_phantom_dataset

    height, width = (int(v) for v in _size(args.size).strip("[]").split(","))
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
    counts = write_phantom_dataset(args.out, spec)
    print(
        f"wrote phantom dataset to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


def run_train(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import build_model, load_checkpoint
    from mri_vqvae.config import apply_overrides, config_from_dict, load_config
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.model import VQVAE
    from mri_vqvae.runtime import resolve_device, seed_everything
    from mri_vqvae.training import train_vqvae

    overrides = list(args.overrides) + _flag_overrides(args)
    last = args.out / "last.pt"
    resume = None
    if args.resume:
        resume = load_checkpoint(last)
        config = config_from_dict(apply_overrides(resume.config.to_dict(), overrides))
        for section in ("model", "data"):
            if getattr(config, section) != getattr(resume.config, section):
                raise ValueError(f"--resume cannot change {section} settings of {last}")
        if args.config or args.preset:
            raise ValueError("--resume takes its settings from the run; drop --config/--preset")
    else:
        if last.exists():
            raise ValueError(
                f"{args.out} already holds a run ({last}); pass --resume to continue it or "
                "choose another --out"
            )
        config = load_config(args.config, overrides, preset=args.preset)
    device = resolve_device(config.train.device)
    files = resolve_split_files(args.data, args.train, args.val, args.test)
    splits = load_splits(files, config.data, splits=("train", "val"))
    seed_everything(config.train.seed)
    model = build_model(resume, last) if resume else VQVAE.from_config(config.model)
    logger.info(
        "training on %s: %d train / %d val slices at %dx%d",
        device,
        len(splits["train"]),
        len(splits["val"]),
        *splits["train"].image_size,
    )
    result = train_vqvae(model, splits["train"], splits["val"], config, args.out, device, resume)
    final = result.history[-1] if result.history else None
    print(f"run folder: {result.run_dir}")
    if final:
        print(
            f"  epochs done {final['epoch']}, val SSIM {final['val_ssim']:.4f}, "
            f"codes used {100 * final['val_codebook_usage']:.1f}%"
        )
    print(f"  checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")
    print(
        f"  pictures: {result.run_dir / 'reconstructions'}, {result.run_dir / 'ssim_scores.png'}, "
        f"{result.run_dir / 'batch_losses.png'}"
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import load_model
    from mri_vqvae.data.dataset import list_slices, load_split, resolve_split_files
    from mri_vqvae.evaluation import write_evaluation
    from mri_vqvae.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    model, config = load_model(args.checkpoint, device)
    data_config = replace(config.data, skip_bad_files=args.skip_bad_files)
    if args.test is not None:
        files = list_slices(args.test)
    else:
        files = resolve_split_files(args.data, args.train, args.val, args.test)["test"]
    slices = load_split(files, data_config, label="test")
    summary = write_evaluation(model, slices, args.out, device, args.batch_size, config.train.seed)
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


def run_reconstruct(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import load_model
    from mri_vqvae.evaluation import reconstruct_file
    from mri_vqvae.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    model, config = load_model(args.checkpoint, device)
    reconstruct_file(model, args.input, args.out, config.data, device)
    print(f"wrote {args.out}")


COMMANDS = {
    "demo-data": run_demo_data,
    "train": run_train,
    "evaluate": run_evaluate,
    "reconstruct": run_reconstruct,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mri-vqvae`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    from mri_vqvae.checkpoint import CheckpointError
    from mri_vqvae.config import ConfigError
    from mri_vqvae.data.nifti import DataError

    try:
        COMMANDS[args.command](args)
    except (DataError, ConfigError, CheckpointError, ValueError) as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mri-vqvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
