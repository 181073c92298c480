"""Training throughput at 256x128, batch 32: mri_vqvae (seed preset and default recipe) and
MONAI's VQVAE at the seed's shape, side by side in one run.

Each row is measured in its own fresh process (so allocator settings and warm caches never
leak between rows), and the rows are taken in turn for ``--rounds`` rounds; the table shows
each row's median. Per row: training images per second, FLOPs per image (torch's flop
counter, forward and backward), achieved FLOP/s as a share of this machine's measured matrix
multiply peak in the row's precision, and peak memory (resident set on a CPU, allocated
memory on a GPU).

Rows:
  plain fp32  a plain, faithful implementation of the seed's model (``PlainSeedVQVAE`` below,
              written as the seed's report describes it: no in-place operations, the
              textbook quantiser) in float32, NCHW, with glibc's default allocator: the
              "plain float32 implementation" the speed targets are ratios to.
  seed/default fp32|bf16  this project's training step as it runs (its memory format
              choice, the allocator setting of ``mri_vqvae.runtime.keep_freed_memory``).
  monai ...   ``monai.networks.nets.VQVAE``: 3 downsamplings, channels 64/128/128, 2
              residual layers of 32, a 512 x 128 codebook; "plain" as a user would run it,
              "tuned" channels-last with the allocator setting of this project's rows.

    python benchmarks/throughput.py --rounds 2 --out benchmarks/results/throughput
    python benchmarks/throughput.py --device cuda --batch-size 32

MONAI is a benchmark-only extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mri_vqvae.model import VQVAEOutput

ROWS = {
    # name: (model, precision, memory format, tuned allocator)
    "plain fp32": ("plain", "float32", "contiguous", False),
    "seed fp32": ("seed", "float32", "auto", True),
    "seed bf16": ("seed", "bfloat16", "auto", True),
    "default fp32": ("default", "float32", "auto", True),
    "default bf16": ("default", "bfloat16", "auto", True),
    "monai fp32 plain": ("monai", "float32", "contiguous", False),
    "monai fp32 tuned": ("monai", "float32", "channels_last", True),
    "monai bf16 tuned": ("monai", "bfloat16", "channels_last", True),
}
REFERENCE = "plain fp32"


class PlainResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden, channels, 1),
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class PlainSeedVQVAE(nn.Module):
    """The seed's VQ-VAE as its report describes it: 3 strided 4x4 convolutions (64, 128,
    128 channels) and a 3x3 one, a residual stack of 2 layers of 32, a 1x1 projection, a
    512 x 128 codebook learned by its loss, and the mirror-image decoder."""

    def __init__(self) -> None:
        super().__init__()
        encoder = [
            nn.Conv2d(1, 64, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            PlainResidualStack(128, 32, 2),
        ]
        self.encoder = nn.Sequential(*encoder)
        self.pre_vq_conv = nn.Conv2d(128, 128, 1)
        self.codebook = nn.Embedding(512, 128)
        self.codebook.weight.data.uniform_(-1 / 512, 1 / 512)
        decoder = [
            nn.Conv2d(128, 128, 3, padding=1),
            PlainResidualStack(128, 32, 2),
            nn.ConvTranspose2d(128, 128, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 4, 2, 1),
        ]
        self.decoder = nn.Sequential(*decoder)
        self.num_embeddings = 512
        self.bounded_output = False

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        z = self.pre_vq_conv(self.encoder(images))
        flat = z.permute(0, 2, 3, 1).reshape(-1, 128)
        distances = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.codebook.weight.t()
            + self.codebook.weight.pow(2).sum(1)
        )
        indices = distances.argmin(1)
        quantized = self.codebook(indices).view(z.shape[0], z.shape[2], z.shape[3], 128)
        quantized = quantized.permute(0, 3, 1, 2)
        loss = F.mse_loss(quantized, z.detach()) + 0.25 * F.mse_loss(quantized.detach(), z)
        quantized = z + (quantized - z).detach()
        return VQVAEOutput(
            reconstruction=self.decoder(quantized),
            quantization_loss=loss,
            indices=indices.view(z.shape[0], z.shape[2], z.shape[3]),
            perplexity=torch.zeros(()),
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    sys.path.insert(0, str(Path(__file__).parent))
    from quality import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def run_facts(device: torch.device) -> dict:
    """When, where and how a benchmark ran, for its JSON report."""
    return {
        "date": date.today().isoformat(),
        "device": device_name(device),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of the fastest of a few square matrix products (2048 on CPU, 8192 on GPU)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    a @ b
    synchronize(device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def build(model_kind: str, precision: str, compile_model: bool, overrides=()):
    """The model and the training settings of one row (``overrides`` change the default's)."""
    from mri_vqvae.config import load_config

    preset = "8x" if model_kind == "default" else "seed"
    config = load_config(None, list(overrides) if model_kind == "default" else [], preset=preset)
    settings = replace(config.train, precision=precision, compile=compile_model)
    if model_kind == "plain":
        return PlainSeedVQVAE(), settings
    if model_kind == "monai":
        sys.path.insert(0, str(Path(__file__).parent))
        from quality import MonaiVQVAE

        return MonaiVQVAE(3), settings
    from mri_vqvae.model import VQVAE

    return VQVAE.from_config(config.model), settings


def measure(spec: dict) -> dict:
    """One row, in this process: warm-up steps, a counted step, then timed steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from mri_vqvae.runtime import keep_freed_memory
    from mri_vqvae.train.vqvae import train_step

    if spec["tuned_allocator"]:
        keep_freed_memory()
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model, settings = build(
        spec["model"], spec["precision"], spec["compile"], spec.get("default_overrides", ())
    )
    model.to(device)
    memory_format = spec["memory_format"]
    if memory_format == "auto":  # the training loop's own choice for this model and device
        from mri_vqvae.train.vqvae import uses_channels_last

        channels_last = uses_channels_last("auto", model, device)
    else:
        channels_last = memory_format == "channels_last"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    images = (torch.rand(spec["batch_size"], 1, 256, 128, generator=generator) * 2 - 1).to(device)
    model.train()
    started = time.perf_counter()
    for _ in range(spec["warmup"]):
        train_step(step_model, optimizer, images, settings)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, images, settings)
    flops_per_image = counter.get_total_flops() / spec["batch_size"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        train_step(step_model, optimizer, images, settings)
    synchronize(device)
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "images_per_second": spec["steps"] * spec["batch_size"] / seconds,
        "flops_per_image": flops_per_image,
        "peak_memory_bytes": peak_bytes,
        "warmup_seconds": warmup_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def measure_in_subprocess(spec: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"row {spec['name']!r} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def table(rows: list[dict], reference: str) -> str:
    header = (
        f"| row | img/s | x {reference} | GFLOP/img | GFLOP/s | share of peak | peak memory |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['images_per_second']:.1f} | {row['speedup']:.2f} | "
            f"{row['flops_per_image'] / 1e9:.2f} | {row['achieved_flops'] / 1e9:.0f} | "
            f"{100 * row['share_of_peak']:.0f}% of {row['peak_dtype']} | "
            f"{row['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"))
    parser.add_argument(
        "--default-overrides",
        nargs="*",
        default=[],
        metavar="section.key=value",
        help="settings changed in the default rows (a candidate recipe), e.g. model.channels=16",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def row_specs(args: argparse.Namespace) -> list[dict]:
    """What each row's worker process measures: the chosen rows, each also compiled with
    ``--compile`` (the reference aside)."""
    specs = []
    for name in args.rows:
        model, precision, memory_format, tuned = ROWS[name]
        variants = [False, True] if args.compile and name != REFERENCE else [False]
        for compile_model in variants:
            specs.append(
                {
                    "name": name + (" compiled" if compile_model else ""),
                    "model": model,
                    "precision": precision,
                    "memory_format": memory_format,
                    "tuned_allocator": tuned,
                    "compile": compile_model,
                    "device": args.device,
                    "default_overrides": args.default_overrides,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "warmup": args.warmup + (3 if compile_model else 0),
                }
            )
    return specs


def measure_rounds(specs: list[dict], rounds: int) -> dict[str, list[dict]]:
    """Every row measured ``rounds`` times, the rows taken in turn, each in its own process."""
    samples: dict[str, list[dict]] = {spec["name"]: [] for spec in specs}
    for round_number in range(rounds):
        for spec in specs:
            result = measure_in_subprocess(spec)
            samples[spec["name"]].append(result)
            print(
                f"round {round_number + 1}: {spec['name']}: "
                f"{result['images_per_second']:.1f} img/s",
                flush=True,
            )
    return samples


def summarise_rows(specs: list[dict], samples: dict, peaks: dict[str, float]) -> list[dict]:
    """Each row's median speed over its rounds, its FLOPs and share of the matmul peak, and
    its speed-up over the reference row (or the first)."""
    rows = []
    for spec in specs:
        runs = samples[spec["name"]]
        speed = statistics.median(r["images_per_second"] for r in runs)
        flops = runs[0]["flops_per_image"]
        rows.append(
            {
                **spec,
                "images_per_second": speed,
                "all_images_per_second": [r["images_per_second"] for r in runs],
                "flops_per_image": flops,
                "achieved_flops": speed * flops,
                "share_of_peak": speed * flops / peaks[spec["precision"]],
                "peak_dtype": spec["precision"],
                "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
                "warmup_seconds": statistics.median(r["warmup_seconds"] for r in runs),
                "parameters": runs[0]["parameters"],
            }
        )
    reference = next((r for r in rows if r["name"] == REFERENCE), rows[0])
    for row in rows:
        row["speedup"] = row["images_per_second"] / reference["images_per_second"]
    return rows


def main() -> None:
    args = parse_options()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    device = torch.device(args.device)
    # Only the precisions of the chosen rows: where bfloat16 is emulated (no AVX-512 or AMX)
    # one 2048x2048 bfloat16 product takes over a minute.
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    used = {ROWS[name][1] for name in args.rows}
    peaks = {name: matmul_peak(device, dtype) for name, dtype in dtypes.items() if name in used}
    print(
        f"matrix multiply peak on {device_name(device)}: "
        + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items())
    )
    specs = row_specs(args)
    rows = summarise_rows(specs, measure_rounds(specs, args.rounds), peaks)
    reference = next((r for r in rows if r["name"] == REFERENCE), rows[0])
    print(table(rows, reference["name"]))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        **run_facts(device),
        "matmul_peak_flops": peaks,
        "reference": reference["name"],
        "rows": rows,
    }
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'throughput.json'}")


if __name__ == "__main__":
    main()
