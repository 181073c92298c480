"""The ``mri-vqvae`` command line: parse, load the config, call one library function, report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

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
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from its last.pt (mid-epoch ones included)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in RUN_DIR (its checkpoints, logs and pictures)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
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
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--batch-size", type=int, default=32)

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
    prior.add_argument("--epochs", type=int)
    prior.add_argument("--batch-size", type=int)
    prior.add_argument("--lr", type=float)
    prior.add_argument("--seed", type=int)
    prior.add_argument("--max-minutes", type=float, help="wall-clock training budget")
    prior.add_argument(
        "--precision", choices=["auto", "float32", "bfloat16"], help="training precision"
    )
    prior.add_argument("--resume", action="store_true", help="continue the run in PRIOR_DIR")
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
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, help="sample among the k most likely codes")
    sample.add_argument("--top-p", type=float, help="sample within the top-p nucleus")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--slice-position",
        type=float,
        help="position in the volume, 0 to 1 (a prior trained with slice positions only)",
    )
    sample.add_argument("--batch-size", type=int, default=64, help="maps sampled together")
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
    judge.add_argument("--out", type=Path, help="default: SAMPLES/evaluation")
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument(
        "--classifier-steps", type=int, default=300, help="training steps per fold (default 300)"
    )
    judge.add_argument("--folds", type=int, default=4)

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
    report.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/report.html)")

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


def _flag_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``section.key=value`` overrides for the ``flags`` (argument name to setting) given."""
    return [
        f"{key}={getattr(args, name)}"
        for name, key in flags.items()
        if getattr(args, name, None) is not None
    ]


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
    from mri_vqvae.distributed import join_process_group, leave_process_group
    from mri_vqvae.model import VQVAE
    from mri_vqvae.runtime import seed_everything
    from mri_vqvae.tensorboard_log import require_tensorboard
    from mri_vqvae.training import train_vqvae

    overrides = list(args.overrides) + _flag_overrides(
        args, {**TRAIN_FLAGS, "size": "data.image_size"}
    )
    if args.skip_bad_files:
        overrides.append("data.skip_bad_files=true")
    if args.compile:
        overrides.append("train.compile=true")
    if args.tensorboard:
        overrides.append("train.tensorboard=true")
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
        if args.overwrite:
            raise ValueError("--resume continues the run in --out; --overwrite would replace it")
    else:
        config = load_config(args.config, overrides, preset=args.preset)
        if last.exists() and not args.overwrite:
            raise ValueError(
                f"{args.out} already holds a run ({last}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
    if config.train.tensorboard:
        require_tensorboard()
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
        model = build_model(resume, last) if resume else VQVAE.from_config(config.model)
        logger.info(
            "training on %s: %d train / %d val slices at %dx%d",
            device,
            len(splits["train"]),
            len(splits["val"]),
            *splits["train"].image_size,
        )
        if args.overwrite and not resume and processes.is_main and last.exists():
            # Only now, with the settings and data known good, is the old run let go.
            remove_training_outputs(args.out)
        result = train_vqvae(
            model, splits["train"], splits["val"], config, args.out, device, resume, processes
        )
    finally:
        leave_process_group()
    if not processes.is_main:
        return
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
    if (result.run_dir / "report.html").is_file():
        print(f"  report: {result.run_dir / 'report.html'}")
    if config.train.tensorboard:
        print(f"  TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")


# What `train` writes in a run folder; --overwrite removes these and nothing else (a run
# folder may also hold the user's evaluations, a prior and samples).
TRAINING_OUTPUTS = (
    "best.pt",
    "last.pt",
    "config.yaml",
    "metrics.csv",
    "metrics.jsonl",
    "ssim_scores.png",
    "batch_losses.png",
    "reconstructions",
    "validation",
    "report.html",
    "tensorboard",
)


def remove_training_outputs(run_dir: Path) -> None:
    """Delete a previous training run's outputs from ``run_dir``."""
    import shutil

    removed = []
    for name in TRAINING_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    logger.warning(
        "--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir
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
    _refresh_report(args.checkpoint)


def run_reconstruct(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import load_model
    from mri_vqvae.evaluation import reconstruct_file
    from mri_vqvae.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    model, config = load_model(args.checkpoint, device)
    reconstruct_file(model, args.input, args.out, config.data, device)
    print(f"wrote {args.out}")


def run_train_prior(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import (
        check_prior_matches,
        file_sha256,
        load_model,
        load_prior_checkpoint,
    )
    from mri_vqvae.code_maps import code_maps_for, require_slice_positions
    from mri_vqvae.config import apply_overrides, load_prior_config, prior_config_from_dict
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from mri_vqvae.model.prior import build_prior
    from mri_vqvae.prior_training import evaluate_prior, train_prior
    from mri_vqvae.runtime import resolve_device, seed_everything
    from mri_vqvae.tensorboard_log import require_tensorboard

    overrides = list(args.overrides) + _flag_overrides(
        args, {**TRAIN_FLAGS, "architecture": "prior.architecture"}
    )
    if args.condition_on_slice_position:
        overrides.append("prior.condition_on_slice_position=true")
    if args.tensorboard:
        overrides.append("train.tensorboard=true")
    last = args.out / "last.pt"
    resume = None
    if args.resume:
        resume = load_prior_checkpoint(last)
        check_prior_matches(resume, last, args.vqvae)
        config = prior_config_from_dict(apply_overrides(resume.config.to_dict(), overrides))
        if config.prior != resume.config.prior:
            raise ValueError(f"--resume cannot change the prior settings of {last}")
        if args.config:
            raise ValueError("--resume takes its settings from the run; drop --config")
    else:
        if last.exists():
            raise ValueError(
                f"{args.out} already holds a prior ({last}); pass --resume to continue it or "
                "choose another --out"
            )
        config = load_prior_config(args.config, overrides)
    if config.train.tensorboard:
        require_tensorboard()
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
    (args.out / "prior_summary.json").write_text(json.dumps(summary, indent=2))
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
    _refresh_report(args.vqvae)


def run_sample(args: argparse.Namespace) -> None:
    from mri_vqvae.checkpoint import file_sha256, load_model, load_prior
    from mri_vqvae.runtime import resolve_device
    from mri_vqvae.sampling import (
        SamplingSettings,
        check_prior_fits,
        generate_samples,
        write_samples,
    )

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if (args.out / "samples.json").exists():
        raise ValueError(f"{args.out} already holds samples; choose another --out")
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
        "vqvae": str(args.vqvae),
        "vqvae_sha256": checkpoint.vqvae_sha256,
        "prior": str(args.prior),
        "prior_sha256": file_sha256(args.prior),
        "prior_architecture": checkpoint.config.prior.architecture,
        "settings": settings,
        "seed": args.seed,
        "slice_position": args.slice_position,
        "device": str(device),
    }
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
    from mri_vqvae.runtime import resolve_device
    from mri_vqvae.sample_evaluation import evaluate_samples
    from mri_vqvae.sample_metrics import SampleMetricSettings
    from mri_vqvae.sampling import load_sample_codes

    metadata_file = args.samples / "samples.json"
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    vqvae_path = args.vqvae or (Path(metadata["vqvae"]) if "vqvae" in metadata else None)
    if vqvae_path is None:
        raise ValueError(f"{metadata_file} is missing and names no VQ-VAE; pass --vqvae")
    expected = metadata.get("vqvae_sha256")
    if expected and file_sha256(vqvae_path) != expected:
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
    out = args.out or args.samples / "evaluation"
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


def run_report(args: argparse.Namespace) -> None:
    from mri_vqvae.report import write_report

    path = write_report(args.run_dir, args.evaluation, args.prior, args.samples, args.out)
    print(f"wrote {path}")


def _refresh_report(vqvae_checkpoint: Path) -> None:
    """Bring the report of the run a VQ-VAE checkpoint belongs to up to date, if that run
    folder has one. The command's own outputs are written by then, so a report that cannot
    be written is a warning, not a failure."""
    from mri_vqvae.report import REPORT_FILE, write_report

    run_dir = Path(vqvae_checkpoint).parent
    if not (run_dir / REPORT_FILE).is_file():
        return
    try:
        print(f"updated {write_report(run_dir)}")
    except (OSError, ValueError) as err:
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
    from mri_vqvae.runtime import keep_freed_memory

    keep_freed_memory()

    from mri_vqvae.training import NonFiniteTraining, TrainingInterrupted

    try:
        COMMANDS[args.command](args)
    except (DataError, ConfigError, CheckpointError, ValueError) as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"mri-vqvae {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signal_number  # the shell's convention for a signal's exit status
    except NonFiniteTraining as err:
        print(f"mri-vqvae {args.command}: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"mri-vqvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> NoReturn:
    """The ``mri-vqvae`` console script and ``python -m mri_vqvae``: :func:`main`, then the
    process ends the way a worker of a ``torchrun`` group must (see
    :func:`mri_vqvae.distributed.finish_process`)."""
    exit_status = main()
    distributed = sys.modules.get("mri_vqvae.distributed")  # not imported: no group joined
    if distributed is None:
        raise SystemExit(exit_status)
    distributed.finish_process(exit_status)
