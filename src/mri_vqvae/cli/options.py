"""The command line's options: argument types that check ranges as they parse, the option
groups shared by several commands (defined once), and one parser-building function per
command. What a command does is in :mod:`mri_vqvae.cli.main`."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mri_vqvae import __version__
from mri_vqvae.config import (
    MAX_BATCH,
    MAX_SEED,
    MAX_SLICE_VOXELS,
    MAX_STEPS,
    MIN_SLICE_SIDE,
    PRESETS,
    LoopConfig,
    SampleConfig,
    SampleMetricsConfig,
    Whole,
    image_size_problem,
)
from mri_vqvae.data.phantom import PhantomSpec
from mri_vqvae.errors import shown


def _sides(text: str, forms: str = "256x128") -> tuple[int, int]:
    """``256x128`` (height x width) as two integers; ``forms`` says what else is accepted."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like {forms}, got {shown(text)}")
    return int(parts[0]), int(parts[1])


def _image_size(text: str) -> str:
    """``256x128`` or ``native``, checked as ``data.image_size`` is, as a YAML value for it."""
    if text.lower() == "native":
        return "null"
    height, width = _sides(text, "256x128 or 'native'")
    problem = image_size_problem((height, width))
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{height}x{width}: data.image_size {problem}")
    return f"[{height}, {width}]"


def _slice_size(text: str) -> str:
    """A phantom's ``256x128``: slices the loader reads, as a YAML list."""
    height, width = _sides(text)
    if min(height, width) < MIN_SLICE_SIDE or height * width > MAX_SLICE_VOXELS:
        raise argparse.ArgumentTypeError(
            f"size {height}x{width}: each side must be at least {MIN_SLICE_SIDE} pixels and "
            f"the slice at most {MAX_SLICE_VOXELS} pixels"
        )
    return f"[{height}, {width}]"


def _whole_number(minimum: int, maximum: int = 2**63 - 1):
    """An argparse type: an integer from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number, got {shown(text)}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _setting(section: type, name: str):
    """An argparse type for a flag that sets ``section``'s setting ``name``: a number that
    the setting's own limit (the section's LIMITS) accepts, so that the flag and the
    setting cannot disagree."""
    limit = section.LIMITS[name]
    whole = isinstance(limit, Whole)

    def parse(text: str) -> int | float:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            expected = "a whole number" if whole else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}") from None
        problem = limit.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = f"{section.SECTION}.{name}"
    return parse


_count = _whole_number(1)
_seed = _whole_number(0, MAX_SEED)  # the settings' seeds stop there too


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


def _loop_options() -> argparse.ArgumentParser:
    """The training loop's options, the same for both stages."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("training")
    group.add_argument("--config", type=Path, help="YAML file of settings")
    group.add_argument("--epochs", type=_setting(LoopConfig, "epochs"))
    group.add_argument("--batch-size", type=_setting(LoopConfig, "batch_size"))
    group.add_argument("--lr", type=_setting(LoopConfig, "lr"))
    group.add_argument("--seed", type=_setting(LoopConfig, "seed"))
    group.add_argument(
        "--max-minutes", type=_setting(LoopConfig, "max_minutes"), help="wall-clock training budget"
    )
    group.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="training precision; auto is bfloat16 on GPUs and AMX CPUs; float16 (loss-scaled) "
        "is for CUDA GPUs without bfloat16",
    )
    group.add_argument(
        "--checkpoint-every",
        # At least 1: the setting's 0 (at epoch ends only) is what leaving the flag out gives.
        type=_whole_number(1, MAX_STEPS),
        metavar="N",
        help="also write last.pt every N steps inside epochs (default: at epoch ends only)",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (mid-epoch ones included)",
    )
    group.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log scalars and pictures for TensorBoard in the run's tensorboard folder",
    )
    return parent


def _device_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: CUDA if present)")
    return parent


# The phantom's defaults are PhantomSpec's; the options only show them.
_PHANTOM = PhantomSpec()


def _add_demo_data(
    commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser
) -> None:
    demo = commands.add_parser(
        "demo-data",
        help="write the synthetic pelvic MRI phantom in the HipMRI layout",
        description="Write a synthetic pelvic MRI phantom dataset in the HipMRI layout.",
    )
    demo.add_argument("out", type=Path, help="folder to create (new or empty)")
    demo.add_argument(
        "--train-cases", type=_count, default=_PHANTOM.train_cases, help="default %(default)s"
    )
    demo.add_argument(
        "--val-cases", type=_count, default=_PHANTOM.val_cases, help="default %(default)s"
    )
    demo.add_argument(
        "--test-cases", type=_count, default=_PHANTOM.test_cases, help="default %(default)s"
    )
    demo.add_argument("--weeks", type=_count, default=_PHANTOM.weeks, help="volumes per case")
    demo.add_argument("--slices", type=_count, default=_PHANTOM.slices, help="slices per volume")
    demo.add_argument(
        "--size",
        type=_slice_size,
        default=f"{_PHANTOM.height}x{_PHANTOM.width}",
        help="slice array shape (default %(default)s)",
    )
    demo.add_argument("--seed", type=_seed, default=_PHANTOM.seed)
    demo.add_argument(
        "--workers",
        type=_whole_number(1, 64),
        default=min(len(os.sched_getaffinity(0)), 64) if hasattr(os, "sched_getaffinity") else 1,
        help="processes writing cases side by side (default: this machine's cores, "
        "%(default)s); the files are the same for any number",
    )


def _add_config(commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser) -> None:
    show = commands.add_parser(
        "config",
        help="print the resolved settings as YAML",
        description="Print every setting (data, model, train, prior, prior_train, sample, "
        "sample_metrics) as YAML: the defaults, then --preset, --config and "
        "section.key=value overrides. The output is a valid --config file.",
    )
    show.add_argument("--preset", choices=sorted(PRESETS), help="starting recipe")
    show.add_argument("--config", type=Path, help="YAML file of settings")
    show.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_train(commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser) -> None:
    train = commands.add_parser(
        "train",
        parents=[data, device, _loop_options()],
        help="train a VQ-VAE",
        description="Train a VQ-VAE. Settings: --config YAML, the flags below, then any "
        "section.key=value overrides (e.g. model.num_embeddings=256).",
    )
    train.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="starting recipe: 8x (the default: 32x16 codes per 256x128 slice), 4x (64x32 "
        "codes), 8x-gan / 4x-gan (the same with the adversarial and spectral terms), or seed "
        "(the seed's recipe, to compare with); --config and overrides apply on top",
    )
    train.add_argument("--size", type=_image_size, help="HxW to resize slices to, or 'native'")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in RUN_DIR (its checkpoints, logs and pictures), or "
        "write into a folder that is not a run (replacing files with the outputs' names)",
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
    train.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_evaluate(commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        parents=[data, device],
        help="score a checkpoint on the test split",
        description="Per-image SSIM/PSNR on the test split, a summary and figures.",
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument(
        "--config", type=Path, help="YAML file of settings (data: skip_bad_files, the cache)"
    )
    evaluate.add_argument("--out", type=Path, required=True, help="folder to write")
    evaluate.add_argument(
        "--batch-size",
        type=_whole_number(1, MAX_BATCH),
        help="images per batch (default: the run's train.batch_size)",
    )
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace an evaluation already in --out"
    )
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_train_prior(
    commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser
) -> None:
    prior = commands.add_parser(
        "train-prior",
        parents=[data, device, _loop_options()],
        help="train a prior over a VQ-VAE's codes",
        description="Encode every split to code maps with a trained VQ-VAE (cached in "
        "PRIOR_DIR/codes), then train an autoregressive prior over them. Settings: --config "
        "YAML (sections prior and prior_train), the flags below, then section.key=value overrides "
        "(e.g. prior.num_layers=8).",
    )
    prior.add_argument("--vqvae", type=Path, required=True, help="VQ-VAE checkpoint (best.pt)")
    prior.add_argument("--out", type=Path, required=True, metavar="PRIOR_DIR")
    prior.add_argument(
        "--architecture",
        choices=["transformer", "masked", "pixelcnn"],
        help="transformer (autoregressive, raster order), masked (bidirectional, MaskGIT: "
        "trained on masked codes and sampled in a few parallel steps) or the gated PixelCNN "
        "of the VQ-VAE paper",
    )
    prior.add_argument(
        "--condition-on-slice-position",
        action="store_true",
        help="condition on each slice's position in its volume (from slice_<S> in the names)",
    )
    prior.add_argument(
        "--condition-label",
        action="append",
        metavar="NAME",
        help="condition on this column of the conditions.csv beside the data (a 'file' column "
        "naming each slice, then one column per label); repeat for several",
    )
    prior.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the prior already in PRIOR_DIR (its cached codes are kept)",
    )
    prior.add_argument("overrides", nargs="*", metavar="section.key=value")


# The sampler's number flags (flag, the sample setting it sets, help), each parsed as its
# setting is checked.
_SAMPLER_NUMBERS = (
    ("--n", "num_samples", "number of samples (sample.num_samples)"),
    ("--temperature", "temperature", "sample.temperature"),
    ("--top-k", "top_k", "sample among the k most likely codes"),
    ("--top-p", "top_p", "sample within the top-p nucleus, in (0, 1]"),
    ("--seed", "seed", None),
    (
        "--slice-position",
        "slice_position",
        "position in the volume, 0 to 1 (a prior trained with slice positions only)",
    ),
    (
        "--guidance",
        "guidance",
        "classifier-free guidance weight: 1 (the default) samples the conditional model as "
        "trained, 0 the unconditional one, above 1 follows the conditions more closely",
    ),
    (
        "--decoding-steps",
        "decoding_steps",
        "parallel decoding steps of a masked prior (sample.decoding_steps)",
    ),
    ("--batch-size", "batch_size", "maps sampled together (sample.batch_size)"),
)


def _add_sample(commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser) -> None:
    sample = commands.add_parser(
        "sample",
        parents=[device],
        help="generate new slices with a VQ-VAE and its prior",
        description="Draw code maps from the prior and decode them: a PNG grid, one NIfTI per "
        "sample, the codes and samples.json.",
    )
    sample.add_argument("--vqvae", type=Path, required=True, help="VQ-VAE checkpoint")
    sample.add_argument("--prior", type=Path, required=True, help="prior checkpoint")
    sample.add_argument("--config", type=Path, help="YAML file of settings (section sample)")
    sample.add_argument("--out", type=Path, required=True, help="folder to write")
    for flag, name, text in _SAMPLER_NUMBERS:
        sample.add_argument(flag, type=_setting(SampleConfig, name), help=text)
    sample.add_argument(
        "--label",
        action="append",
        metavar="NAME=VALUE",
        help="draw every sample with this label value (a prior trained on labels); repeat for "
        "several. Conditions not given are drawn from the training slices'",
    )
    sample.add_argument(
        "--overwrite", action="store_true", help="replace the samples already in --out"
    )
    sample.add_argument(
        "--no-cache", action="store_true", help="recompute the prefix per code (slow; to compare)"
    )
    sample.add_argument(
        "--no-texture",
        action="store_true",
        help="write the decoder's smooth mean, without the acquisition texture (noise and "
        "grain) the VQ-VAE fitted to its training slices (sample.texture=false)",
    )
    sample.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_evaluate_samples(
    commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser
) -> None:
    judge = commands.add_parser(
        "evaluate-samples",
        parents=[data, device],
        help="score generated slices against real ones",
        description="Two-sample classifier tests, KID and density/coverage of a folder written "
        "by 'sample', first against VQ-VAE reconstructions of training slices, each beside its "
        "null (two halves of those reconstructions) and the shift to held-out reconstructions; "
        "then memorisation, diversity and code statistics. Real held-out slices are the val "
        "and test splits.",
    )
    judge.add_argument("--samples", type=Path, required=True, help="folder written by 'sample'")
    judge.add_argument(
        "--vqvae", type=Path, help="VQ-VAE checkpoint (default: the one samples.json names)"
    )
    judge.add_argument("--out", type=Path, help="folder to write (default: SAMPLES/evaluation)")
    judge.add_argument("--config", type=Path, help="YAML file of settings (sample_metrics)")
    judge.add_argument("--seed", type=_setting(SampleMetricsConfig, "seed"))
    judge.add_argument(
        "--protocol",
        help="named, versioned settings of the measures (sample_metrics.protocol)",
    )
    judge.add_argument(
        "--reference-slices",
        type=_setting(SampleMetricsConfig, "reference_slices"),
        help="training slices reconstructed as the reference (sample_metrics.reference_slices)",
    )
    judge.add_argument(
        "--overwrite", action="store_true", help="replace a sample evaluation already in --out"
    )
    judge.add_argument("overrides", nargs="*", metavar="section.key=value")


def _add_report(commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser) -> None:
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


def _add_reconstruct(
    commands, data: argparse.ArgumentParser, device: argparse.ArgumentParser
) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mri-vqvae", description="A discrete generative model of 2D MRI slices (VQ-VAE)."
    )
    parser.add_argument("--version", action="version", version=f"mri-vqvae {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data, device = _data_options(), _device_option()
    _add_demo_data(commands, data, device)
    _add_config(commands, data, device)
    _add_train(commands, data, device)
    _add_evaluate(commands, data, device)
    _add_train_prior(commands, data, device)
    _add_sample(commands, data, device)
    _add_evaluate_samples(commands, data, device)
    _add_report(commands, data, device)
    _add_reconstruct(commands, data, device)
    return parser


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
