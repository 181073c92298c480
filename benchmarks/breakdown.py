"""Where a training step's work goes: FLOPs and time per level of the default VQ-VAE and per
part of the default prior, in each precision asked for.

Each part (an encoder or decoder level, the quantiser, a prior's attention or MLP, the loss,
the optimiser) is timed alone: its inputs are captured from a real training step by forward
hooks, then its forward and backward pass are run on them ``--repeats`` times (median). FLOPs
come from ``torch.utils.flop_counter`` over the same isolated pass; GFLOP/s beside the
machine's measured matrix-multiply peak says which parts are bound by arithmetic and which by
memory traffic (GroupNorm, SiLU, the SSIM loss). "rest" is the whole step's median time less
the parts': glue between them, and what isolation hides. A second view lists the operators
torch's profiler finds taking the most time over whole steps.

    python benchmarks/breakdown.py --precisions float32 bfloat16 --out benchmarks/results/breakdown

Prints a table per model and precision and writes ``breakdown.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mri_vqvae.config import load_config
from mri_vqvae.model import VQVAE
from mri_vqvae.model.prior import build_prior
from mri_vqvae.runtime import autocast, keep_freed_memory
from mri_vqvae.train.prior import prior_loss
from mri_vqvae.train.vqvae import compute_loss, train_step

sys.path.insert(0, str(Path(__file__).parent))
from throughput import matmul_peak, run_facts, synchronize

PROFILED_OPERATORS = 12


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) output."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def capture_inputs(parts: dict[str, nn.Module], run: Callable[[], None]) -> dict[str, tuple]:
    """The positional and keyword arguments each part is called with during ``run()``
    (the first call of each), detached from the step's graph."""
    captured: dict[str, tuple] = {}

    def hook(name: str):
        def save(module, args, kwargs):
            if name not in captured:
                captured[name] = (
                    tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                    dict(kwargs),
                )

        return save

    handles = [
        module.register_forward_pre_hook(hook(name), with_kwargs=True)
        for name, module in parts.items()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def timed(run: Callable[[], None], device: torch.device, repeats: int) -> tuple[int, float]:
    """FLOPs of one ``run()`` and its median seconds over ``repeats`` after two warm-ups."""
    run()
    run()
    with FlopCounterMode(display=False) as counter:
        run()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return counter.get_total_flops(), statistics.median(seconds)


def isolated_pass(module: nn.Module, args: tuple, kwargs: dict, device, precision: str):
    """A closure running ``module``'s forward and backward alone on copies of ``args``."""

    def run() -> None:
        inputs = [
            a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args
        ]
        with autocast(device, precision):
            output = module(*inputs, **kwargs)
        outputs = [t for t in _tensors(output) if t.requires_grad]
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])

    return run


def profile_top_operators(step: Callable[[], None], steps: int = 3) -> list[dict]:
    """The operators with the most self time over ``steps`` whole steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "operator": e.key,
            "calls_per_step": e.count / steps,
            "ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:PROFILED_OPERATORS]
    ]


def part_rows(parts: dict[str, nn.Module], captured: dict, device, precision, repeats) -> list:
    """A row per part: its output shape, and the FLOPs and seconds of its isolated pass."""
    rows = []
    for name, module in parts.items():
        args, kwargs = captured[name]
        run = isolated_pass(module, args, kwargs, device, precision)
        flops, seconds = timed(run, device, repeats)
        with torch.no_grad(), autocast(device, precision):
            shape = tuple(_tensors(module(*args, **kwargs))[0].shape[1:])
        rows.append({"part": name, "output": shape, "flops": flops, "seconds": seconds})
    return rows


def vqvae_parts(model: VQVAE) -> dict[str, nn.Module]:
    parts: dict[str, nn.Module] = {}
    for index, level in enumerate(model.encoder.levels):
        parts[f"encoder level {index}"] = level
    parts["encoder norm + projection"] = nn.Sequential(model.encoder.norm_out, nn.SiLU())
    parts["encoder norm + projection"].add_module("projection", model.pre_quantization)
    parts["quantizer"] = model.quantizer
    parts["decoder input conv"] = model.decoder.conv_in
    for index, level in enumerate(model.decoder.levels):
        parts[f"decoder level {index}"] = level
    return parts


def breakdown_vqvae(precision: str, batch_size: int, repeats: int, device) -> dict:
    config = load_config(None, [], preset="8x")
    settings = replace(config.train, precision=precision)
    torch.manual_seed(0)
    model = VQVAE.from_config(config.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    images = (torch.rand(batch_size, 1, 256, 128, generator=generator) * 2 - 1).to(device)

    def step() -> None:
        train_step(model, optimizer, images, settings)

    parts = vqvae_parts(model)
    # The encoder's norm and projection are not one module in the model; feed the pieces the
    # input the last encoder level's output would be.
    captured = capture_inputs({k: v for k, v in parts.items() if "norm" not in k}, step)
    with torch.no_grad(), autocast(device, precision):
        last_level = list(model.encoder.levels)[-1]
        captured["encoder norm + projection"] = (
            (last_level(*captured[f"encoder level {len(model.encoder.levels) - 1}"][0]),),
            {},
        )
    rows = part_rows(parts, captured, device, precision, repeats)

    with torch.no_grad():
        output = model(images)
    reconstruction, quantization_loss = output.reconstruction.float(), output.quantization_loss

    def loss_pass() -> None:
        fake = output._replace(
            reconstruction=reconstruction.detach().requires_grad_(True),
            quantization_loss=quantization_loss.detach().requires_grad_(True),
        )
        compute_loss(fake, images, settings).total.backward()

    flops, seconds = timed(loss_pass, device, repeats)
    rows.append({"part": "loss (pixel + SSIM)", "output": (), "flops": flops, "seconds": seconds})
    rows.append(optimiser_row(model, optimizer, device, repeats))
    return finish(
        "vqvae",
        precision,
        batch_size=batch_size,
        step=step,
        rows=rows,
        device=device,
        repeats=repeats,
        model=model,
    )


def optimiser_row(model: nn.Module, optimizer, device, repeats: int) -> dict:
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    flops, seconds = timed(optimizer.step, device, repeats)
    return {"part": "optimiser step", "output": (), "flops": flops, "seconds": seconds}


def prior_parts(prior: nn.Module) -> dict[str, nn.Module]:
    parts: dict[str, nn.Module] = {"code embedding": prior.code_embedding}
    for index, block in enumerate(prior.blocks):
        parts[f"block {index} attention"] = block.attention
        parts[f"block {index} MLP"] = block.mlp
    parts["final norm"] = prior.final_norm
    parts["head"] = prior.head
    return parts


def breakdown_prior(precision: str, batch_size: int, repeats: int, device) -> dict:
    config = load_config(None, [], preset="8x")
    settings = config.prior_train
    grid = (32, 16)
    torch.manual_seed(0)
    prior = build_prior(config.prior, config.model.num_embeddings, grid).to(device).train()
    optimizer = torch.optim.AdamW(
        prior.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(1)
    indices = torch.randint(
        0, config.model.num_embeddings, (batch_size, *grid), generator=generator
    )
    indices = indices.to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss, _, _ = prior_loss(prior, indices, None)
        loss.backward()
        optimizer.step()

    parts = prior_parts(prior)
    captured = capture_inputs(parts, step)
    rows = part_rows(parts, captured, device, precision, repeats)
    with torch.no_grad():
        logits = prior(indices).float()

    def loss_pass() -> None:
        F.cross_entropy(logits.detach().requires_grad_(True), indices).backward()

    flops, seconds = timed(loss_pass, device, repeats)
    rows.append({"part": "loss (cross-entropy)", "output": (), "flops": flops, "seconds": seconds})
    rows.append(optimiser_row(prior, optimizer, device, repeats))
    rows = merge_repeated(rows, len(prior.blocks))
    return finish(
        "prior",
        precision,
        batch_size=batch_size,
        step=step,
        rows=rows,
        device=device,
        repeats=repeats,
        model=prior,
    )


def merge_repeated(rows: list[dict], blocks: int) -> list[dict]:
    """The prior's identical blocks as one row per kind (attention, MLP), summed."""
    merged: list[dict] = []
    for row in rows:
        if row["part"].startswith("block "):
            kind = row["part"].split(" ", 2)[2]
            name = f"{blocks} x {kind}"
            existing = next((r for r in merged if r["part"] == name), None)
            if existing is None:
                merged.append({**row, "part": name})
            else:
                existing["flops"] += row["flops"]
                existing["seconds"] += row["seconds"]
        else:
            merged.append(row)
    return merged


def finish(kind, precision, *, batch_size, step, rows, device, repeats, model) -> dict:
    """Adds the whole step and the rest to ``rows``, and the profiler's operator list."""
    step_flops, step_seconds = timed(step, device, repeats)
    parts_seconds = sum(r["seconds"] for r in rows)
    rows.append(
        {
            "part": "rest (glue, not isolated)",
            "output": (),
            "flops": max(step_flops - sum(r["flops"] for r in rows), 0),
            "seconds": step_seconds - parts_seconds,
        }
    )
    return {
        "model": kind,
        "precision": precision,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": step_seconds,
        "step_flops": step_flops,
        "rows": rows,
        "profiler_top_operators": profile_top_operators(step),
    }


def table(result: dict, peak: float) -> str:
    batch, step_seconds = result["batch_size"], result["step_seconds"]
    lines = [
        f"### {result['model']}, {result['precision']}, batch {batch}: "
        f"{step_seconds * 1000:.0f} ms per step, {batch / step_seconds:.1f} items/s, "
        f"{result['step_flops'] / batch / 1e9:.2f} GFLOP per item, "
        f"{result['step_flops'] / step_seconds / 1e9:.0f} GFLOP/s "
        f"({100 * result['step_flops'] / step_seconds / peak:.0f}% of the matmul peak)",
        "",
        "| part | output (C, H, W) | GFLOP/item | FLOP share | ms/step | time share | GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        rate = row["flops"] / row["seconds"] / 1e9 if row["seconds"] > 0 else 0.0
        lines.append(
            f"| {row['part']} | {'x'.join(map(str, row['output'])) or '-'} | "
            f"{row['flops'] / batch / 1e9:.3f} | "
            f"{100 * row['flops'] / result['step_flops']:.1f}% | "
            f"{row['seconds'] * 1000:.1f} | {100 * row['seconds'] / step_seconds:.1f}% | "
            f"{rate:.0f} |"
        )
    lines += ["", "Operators with the most self time (profiler, whole steps):", ""]
    lines += ["| operator | calls/step | ms/step | share |", "|---|---|---|---|"]
    for op in result["profiler_top_operators"]:
        lines.append(
            f"| {op['operator']} | {op['calls_per_step']:.0f} | {op['ms_per_step']:.1f} | "
            f"{100 * op['share']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument(
        "--models", nargs="+", default=["vqvae", "prior"], choices=["vqvae", "prior"]
    )
    parser.add_argument("--vqvae-batch-size", type=int, default=32)
    parser.add_argument("--prior-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per part (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/breakdown"))
    args = parser.parse_args()
    device = torch.device(args.device)
    keep_freed_memory()
    report = {
        "date": date.today().isoformat(),
        **run_facts(device),
        "command": "python benchmarks/breakdown.py " + " ".join(sys.argv[1:]),
        "results": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for precision in args.precisions:
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        peak = matmul_peak(device, dtype)
        report[f"matmul_peak_{precision}_flops"] = peak
        print(f"matmul peak, {precision}: {peak / 1e9:.0f} GFLOP/s", flush=True)
        for kind in args.models:
            if kind == "vqvae":
                result = breakdown_vqvae(precision, args.vqvae_batch_size, args.repeats, device)
            else:
                result = breakdown_prior(precision, args.prior_batch_size, args.repeats, device)
            report["results"].append(result)
            (args.out / "breakdown.json").write_text(json.dumps(report, indent=2) + "\n")
            print(table(result, peak) + "\n", flush=True)


if __name__ == "__main__":
    main()
