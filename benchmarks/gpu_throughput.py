"""Throughput and peak memory of a ViT-B/16-shaped CLIP on a CUDA GPU, CLIP loss vs FairRobust.

Builds a ``CLIPModel`` of ViT-B/16's shape from its config (vision 12 layers x 768, patch 16,
image 224; text 12 layers x 512, 77 tokens; random weights, nothing downloaded), and times
optimizer steps (forward and loss under bf16 autocast, backward, AdamW) of

  (a)  ``CLIPModel``'s own loss, and
  (b)  the full FairRobust objective through ``FairRobustTrainer.compute_loss`` (miner active
       after a simulated warm-up epoch, Sinkhorn group term over four attributes),
  (b') the same with ``fairness_ot="exact_1d"``,

at batch 32 and 128: samples per second (median over interleaved rounds, the device
synchronised around each step) and peak memory (``torch.cuda.max_memory_allocated`` over one
step). Writes its table between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->``. Refuses to
run, and writes nothing, when no CUDA device is present. Takes a few minutes at most.

    python benchmarks/gpu_throughput.py
    python benchmarks/gpu_throughput.py --quick    # tiny model, batch 8 (still needs CUDA)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import torch
from objective_overhead import (
    DEFAULT_DATASET_SIZE,
    SHAPES,
    ClipShape,
    build_clip,
    clip_inputs,
    make_batch,
    make_trainer,
)
from torch import Tensor

logger = logging.getLogger(__name__)

SECTION = "gpu"
DEVICE = "cuda"
VARIANTS = {
    "(a)": "(a) `CLIPModel` loss",
    "(b)": "(b) FairRobust objective (sinkhorn)",
    "(b')": "(b') FairRobust objective (exact_1d)",
}


def cuda_step(
    loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One synchronised optimizer step with the forward pass and the loss under bf16 autocast."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()

    return step


def peak_memory(step: Callable[[], None]) -> int:
    """Bytes of ``torch.cuda.max_memory_allocated`` over one step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    return int(torch.cuda.max_memory_allocated())


def measure_batch(
    shape: ClipShape, batch_size: int, args: argparse.Namespace, output_dir: str
) -> dict[str, Any]:
    """Step times and peak memory of every variant at one batch size."""
    device = torch.device(DEVICE)
    model = build_clip(shape).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = {
        k: v.to(device) if isinstance(v, Tensor) else v
        for k, v in make_batch(shape, batch_size, DEFAULT_DATASET_SIZE).items()
    }
    trainers = {
        method: make_trainer(model, method, output_dir, DEFAULT_DATASET_SIZE, use_cpu=False)
        for method in ("sinkhorn", "exact_1d")
    }
    steps = {
        "(a)": cuda_step(lambda: model(**clip_inputs(batch)).loss, optimizer),
        "(b)": cuda_step(lambda: trainers["sinkhorn"].compute_loss(model, dict(batch)), optimizer),
        "(b')": cuda_step(lambda: trainers["exact_1d"].compute_loss(model, dict(batch)), optimizer),
    }
    times = _common.rounds(steps, args.repeats, warmup=3)
    memory = {name: peak_memory(step) for name, step in steps.items()}
    return {"batch": batch_size, "times": times, "memory": memory}


def render(shape: ClipShape, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown section of this benchmark (without the footer)."""
    rows = []
    for r in results:
        for key, label in VARIANTS.items():
            seconds = _common.median(r["times"][key])
            ratio = _common.ratio_of_rounds(r["times"][key], r["times"]["(a)"])
            rows.append(
                [
                    r["batch"],
                    label,
                    _common.format_ms(seconds),
                    f"{r['batch'] / seconds:,.0f}",
                    f"{ratio:.3f}",
                    f"{r['memory'][key] / 2**30:.2f}",
                ]
            )
    table = _common.markdown_table(
        ["batch", "variant", "ms/step", "samples/s", "step time / (a)", "peak memory (GiB)"],
        rows,
        "rlrrrr",
    )
    properties = torch.cuda.get_device_properties(0)
    return "\n".join(
        [
            "## GPU throughput (ViT-B/16-shaped CLIP)",
            "",
            f"GPU: {torch.cuda.get_device_name(0)} ({properties.total_memory / 2**30:.0f} GiB), "
            f"CUDA {torch.version.cuda}. Model: `CLIPModel` built from its config, "
            f"{shape.describe()}, random weights. Forward and loss under bf16 autocast, AdamW; "
            f"median of {args.repeats} round(s) after 3 warm-up rounds, variants interleaved, "
            "the device synchronised after each step; peak memory over one step. The miner "
            "lives on the CPU, as in training.",
            "",
            table,
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this benchmark."""
    parser = _common.new_parser(__doc__, repeats=10)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 32 128; 8 with --quick)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its section and write it into ``--output``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _common.check_common_arguments(parser, args)
    if not torch.cuda.is_available():
        sys.stderr.write(
            "gpu_throughput.py: no CUDA device is available (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}); this benchmark "
            "measures a GPU and needs one. Nothing was measured or written.\n"
        )
        return 2
    args.batch_sizes = args.batch_sizes or ([8] if args.quick else [32, 128])
    if min(args.batch_sizes) < 2:
        parser.error(f"--batch-sizes must be >= 2, got {args.batch_sizes}")
    shape = SHAPES["tiny" if args.quick else "vit-b16"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True
    threads = _common.set_threads(args.threads)
    info = _common.RunInfo("gpu_throughput.py", argv, threads)
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as output_dir:
        results = []
        for batch_size in args.batch_sizes:
            results.append(measure_batch(shape, batch_size, args, output_dir))
            torch.cuda.empty_cache()
    section = render(shape, results, args) + "\n\n" + "\n".join(info.footer())
    _common.publish(SECTION, section, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
