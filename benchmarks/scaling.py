"""How the objective's two extra pieces scale: the group term with the batch, the miner with N.

(i)  ``GroupSinkhorn`` forward + backward over race, gender, ethnicity and language (codes drawn
     with Harvard-FairVLMed's group shares) on per-pair losses of a batch, with
     ``method="sinkhorn"`` (geomloss, the trainer's defaults: blur 0.05, scaling 0.9) and
     ``method="exact_1d"``, at batch sizes 32 to 1024; its share of one optimizer step of the
     CPU-sized CLIP of ``objective_overhead.py`` at batch 256 (measured); and a check of the
     exact 1-D transport cost against geomloss's Sinkhorn divergence at a small blur.
(ii) ``BadPairMiner`` over data sets of 1e4, 1e5 and 1e6 pairs for each threshold rule: the
     bytes of its per-pair tensors, the time of one training step's calls (``weights`` twice,
     ``flags``, ``observe``, as ``FairRobustTrainer.compute_loss`` makes them) and of
     ``start_epoch`` (the epoch-boundary update), over simulated epochs in which every pair is
     seen once, a fifth of them with high losses.

    python benchmarks/scaling.py            # full sizes, 3 rounds
    python benchmarks/scaling.py --quick    # small sizes, tiny model
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import torch
from objective_overhead import (
    SHAPES,
    build_clip,
    clip_inputs,
    draw_attributes,
    make_batch,
    optimizer_step,
    spread_embeddings,
)
from torch import Tensor

from fairvlm_hf.data.schema import PROTECTED_ATTRIBUTES
from fairvlm_hf.objective.bad_pairs import THRESHOLDS, BadPairMiner
from fairvlm_hf.objective.contrastive import pairwise_clip_loss
from fairvlm_hf.objective.group_ot import GroupSinkhorn

logger = logging.getLogger(__name__)

SECTION = "scaling"
METHODS = ("sinkhorn", "exact_1d")
SHARE_TARGET = 0.02
MEMORY_TARGET_BYTES = 32_000_000
START_EPOCH_TARGET_S = 1.0
#: Per-step batch of the miner simulation (the global batch the trainer observes).
MINER_BATCH = 256
BAD_PAIR_RATE = 0.2


def ot_case(batch: int, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair CLIP losses (logit scale 1 / 0.07) of spread embeddings, and attribute codes."""
    image, text = spread_embeddings(batch, 256, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    losses = pairwise_clip_loss(image, text, 1 / 0.07).detach()
    return losses, draw_attributes(batch, generator)


def cost_entries(groups: dict[str, Tensor], min_group_size: int = 2) -> tuple[int, int]:
    """Cost-matrix entries of one Sinkhorn iteration: computed (groups padded to the largest,
    the batch's own term once per group) and needed (each group's own size, the batch once).

    The debiased divergence of a group of ``n`` values against the batch of ``N`` uses the
    ``n x N``, ``N x n``, ``n x n`` and ``N x N`` cost matrices.
    """
    sizes = []
    batch = 0
    for codes in groups.values():
        batch = codes.numel()
        present, counts = torch.unique(codes, return_counts=True)
        sizes += [
            int(c) for g, c in zip(present, counts, strict=True) if g >= 0 and c >= min_group_size
        ]
    if not sizes:
        return 0, 0
    largest = max(sizes)
    computed = len(sizes) * (2 * largest * batch + largest**2 + batch**2)
    needed = sum(2 * n * batch + n**2 for n in sizes) + batch**2
    return computed, needed


def ot_forward_backward(
    module: GroupSinkhorn, values: Tensor, groups: dict[str, Tensor]
) -> Callable[[], None]:
    """A callable running ``R = module(values)`` and its backward, as in one training step."""

    def run() -> None:
        leaf = values.detach().clone().requires_grad_(True)
        total, _ = module(leaf, groups)
        total.backward()

    return run


def measure_ot(batch_sizes: list[int], repeats: int) -> dict[int, dict[str, list[float]]]:
    """Seconds of forward + backward of the group term, per batch size and method."""
    out = {}
    for batch in batch_sizes:
        values, groups = ot_case(batch)
        timers = {
            method: _common.per_call(
                ot_forward_backward(
                    GroupSinkhorn(PROTECTED_ATTRIBUTES, method=method), values, groups
                )
            )
            for method in METHODS
        }
        out[batch] = _common.rounds(timers, repeats, warmup=1, self_timed=True)
        logger.info(
            "group term at batch %d: %s",
            batch,
            {m: f"{_common.median(t) * 1e3:.2f} ms" for m, t in out[batch].items()},
        )
    return out


def check_exact(
    batch: int, settings: tuple[tuple[float, float], ...]
) -> list[tuple[str, str, float, float]]:
    """Per-term exact 1-D OT vs geomloss at the defaults and at a small blur.

    ``settings`` holds ``(blur, scaling)`` pairs. Returns ``(label, the term with the largest
    relative gap, relative gap of R, seconds)`` rows.
    """
    values, groups = ot_case(batch, seed=3)
    _, exact = GroupSinkhorn(PROTECTED_ATTRIBUTES, method="exact_1d")(values, groups)
    rows = []
    for blur, scaling in settings:
        module = GroupSinkhorn(PROTECTED_ATTRIBUTES, blur=blur, scaling=scaling)
        start = time.perf_counter()
        _, terms = module(values, groups)
        seconds = time.perf_counter() - start
        if terms.keys() != exact.keys():
            raise RuntimeError(f"sinkhorn and exact_1d terms differ: {terms.keys()} vs {exact}")
        gaps = {k: abs(float(terms[k]) - float(exact[k])) for k in exact}
        worst = max(gaps, key=lambda k: gaps[k] / float(exact[k]))
        total_s = sum(float(v) for v in terms.values())
        total_e = sum(float(v) for v in exact.values())
        rows.append(
            (
                f"blur {blur:g}, scaling {scaling:g}",
                f"{100 * gaps[worst] / float(exact[worst]):.2f}% ({worst}: "
                f"{float(terms[worst]):.2e} vs exact {float(exact[worst]):.2e})",
                total_s / total_e - 1,
                seconds,
            )
        )
    return rows


def measure_step(shape_name: str, batch: int, repeats: int, dataset_size: int) -> list[float]:
    """Seconds of one (a) optimizer step (CLIP's own loss) of the benchmark model at ``batch``."""
    shape = SHAPES[shape_name]
    model = build_clip(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    inputs = clip_inputs(make_batch(shape, batch, max(dataset_size, batch)))
    step = optimizer_step(lambda: model(**inputs).loss, optimizer)
    return _common.rounds({"step": step}, repeats, warmup=1)["step"]


def simulate_miner(rule: str, n_pairs: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Run a miner through ``epochs + 1`` simulated epochs over ``n_pairs`` pairs.

    Each epoch visits every pair once, in a fresh random order, in steps of ``MINER_BATCH``
    ids; from epoch 1 on, flags are in force and each step calls ``weights`` twice (local and
    global batch), ``flags`` and ``observe``, as the trainer does. ``start_epoch`` of epochs
    1..``epochs`` is timed.
    """
    generator = torch.Generator().manual_seed(seed)
    base = 1.0 + 0.25 * torch.randn(n_pairs, generator=generator)
    bad = torch.rand(n_pairs, generator=generator) < BAD_PAIR_RATE
    base[bad] = 3.0 + 0.4 * torch.randn(int(bad.sum()), generator=generator)
    miner = BadPairMiner(threshold=rule)
    step_times: list[float] = []
    boundary_times: list[float] = []
    summary: dict[str, Any] = {}
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        summary = miner.start_epoch(epoch)
        if epoch > 0:
            boundary_times.append(time.perf_counter() - start)
        order = torch.randperm(n_pairs, generator=generator)
        noise = 0.1 * torch.randn(n_pairs, generator=generator)
        losses_all = (base + noise).clamp(min=0.01)
        for first in range(0, n_pairs, MINER_BATCH):
            ids = order[first : first + MINER_BATCH]
            losses = losses_all[ids]
            start = time.perf_counter()
            if epoch > 0:
                miner.weights(ids, losses)
                miner.weights(ids, losses)
                miner.flags(ids)
            miner.observe(ids, losses)
            if epoch > 0:
                step_times.append(time.perf_counter() - start)
    state_bytes = sum(
        v.numel() * v.element_size() for v in miner.state_dict().values() if isinstance(v, Tensor)
    )
    return {
        "memory_bytes": miner.memory_bytes,
        "capacity": miner.capacity,
        "state_bytes": state_bytes,
        "step": _common.median(step_times),
        "start_epoch": _common.median(boundary_times),
        "start_epoch_max": max(boundary_times),
        "n_flagged": int(summary["n_flagged"]),
        "rule_applied": summary.get("rule_applied", rule),
    }


def render(
    args: argparse.Namespace,
    ot: dict[int, dict[str, list[float]]],
    step: list[float],
    exact_rows: list[tuple[str, str, float, float]],
    miner: dict[tuple[str, int], dict[str, Any]],
) -> str:
    """The markdown section of this benchmark (without the footer)."""
    ot_rows = []
    for batch, times in ot.items():
        s, e = _common.median(times["sinkhorn"]), _common.median(times["exact_1d"])
        ratio = _common.ratio_of_rounds(times["sinkhorn"], times["exact_1d"])
        values, groups = ot_case(batch)
        computed, needed = cost_entries(groups)
        ot_rows.append(
            [
                batch,
                f"{float(values.min()):.2f} to {float(values.max()):.2f}",
                _common.format_ms(s),
                _common.format_ms(e),
                f"{ratio:.1f}x",
                f"{computed / 1e6:.2f} M / {needed / 1e6:.2f} M",
            ]
        )
    step_s = _common.median(step)
    share_lines = []
    if args.step_batch in ot:
        for method in METHODS:
            t = _common.median(ot[args.step_batch][method])
            share = t / (step_s + t)
            verdict = "above" if share > SHARE_TARGET else "within"
            share_lines.append(
                f"- `{method}` at batch {args.step_batch}: {_common.format_ms(t)} ms of a "
                f"{_common.format_ms(step_s + t)} ms step = {100 * share:.2f}% ({verdict} the "
                f"{100 * SHARE_TARGET:.0f}% budget)"
            )
    exact_table = _common.markdown_table(
        [
            "geomloss settings",
            "largest relative gap of a D_kg (that term: geomloss vs exact)",
            "shortfall of R",
            "forward time (ms)",
        ],
        [
            [label, worst, f"{-100 * total:.2f}%", _common.format_ms(sec)]
            for label, worst, total, sec in exact_rows
        ],
        "llrr",
    )
    miner_rows = []
    for (rule, n), r in miner.items():
        miner_rows.append(
            [
                rule,
                f"{n:,}",
                f"{r['memory_bytes'] / 1e6:.2f}",
                f"{r['memory_bytes'] / n:.1f}",
                f"{r['state_bytes'] / 1e6:.2f}",
                f"{r['step'] * 1e6:.0f}",
                _common.format_ms(r["start_epoch"]),
                f"{r['n_flagged']:,}",
            ]
        )
    biggest = max(n for _, n in miner)
    at_biggest = [r for (_, n), r in miner.items() if n == biggest]
    memory_ok = all(r["memory_bytes"] <= MEMORY_TARGET_BYTES for r in at_biggest)
    boundary_ok = all(r["start_epoch"] < START_EPOCH_TARGET_S for r in at_biggest)
    steps_by_n: dict[int, list[float]] = {}
    for (_, n), r in miner.items():
        steps_by_n.setdefault(n, []).append(r["step"])
    smallest = min(steps_by_n)
    flat = max(_common.median(v) for v in steps_by_n.values()) / _common.median(
        steps_by_n[smallest]
    )
    lines = [
        "## Scaling of the group term and of the miner",
        "",
        "### (i) Group term: forward + backward against the batch size",
        "",
        "`GroupSinkhorn` over race, gender, ethnicity and language (codes drawn with "
        "Harvard-FairVLMed's group shares; groups with fewer than 2 members give no "
        "term, unknown is no group) on per-pair CLIP losses (logit scale 1/0.07) of embeddings whose pair "
        "cosines spread over [0, 0.6], as part-way through fine-tuning; the trainer's defaults (blur 0.05, scaling 0.9, tensorized "
        f"geomloss). Median of {args.repeats} round(s) of a timed loop, both methods in each "
        "round.",
        "",
        _common.markdown_table(
            [
                "batch",
                "losses",
                "sinkhorn (ms)",
                "exact_1d (ms)",
                "sinkhorn / exact_1d",
                "cost entries per iteration, computed / needed",
            ],
            ot_rows,
            "rlrrrr",
        ),
        "",
        "The last column counts the cost-matrix entries of one Sinkhorn iteration as "
        "`GroupSinkhorn` batches the groups (each padded to the largest group, the batch's "
        "own N x N term repeated for every group) against what the groups need (their own "
        "sizes, the batch's term once).",
        "",
        f"Share of one optimizer step at batch {args.step_batch}: a (a) step of the "
        f"`{args.shape}` model of the objective-overhead benchmark (forward, backward, AdamW; "
        f"median of {len(step)} measured step(s)) took {_common.format_ms(step_s)} ms.",
        "",
        *share_lines,
        "",
        f"Exact 1-D transport against geomloss, batch {args.exact_batch} (every D_kg of the "
        "four attributes, `exact_1d` vs `GroupSinkhorn` with geomloss at three settings): the "
        "Sinkhorn divergence converges to the exact cost as the blur shrinks and the scaling "
        "approaches 1, at the price of more iterations; the largest relative gaps are those of "
        "the smallest terms (groups already close to the batch).",
        "",
        exact_table,
        "",
        "### (ii) Bad-pair miner against the data set size",
        "",
        f"Simulated epochs over N pairs, each seen once per epoch in steps of {MINER_BATCH} ids "
        "(a fifth with high losses); the step time is the median over the steps of "
        f"{args.repeats} epoch(s) with flags in force of `weights` (twice), `flags` and "
        "`observe`; `start_epoch` is the epoch-boundary update (fold, statistic, rule, flags), "
        "median over those epochs. Memory: bytes of the per-pair tensors as the trainer "
        "creates the miner (no capacity given, so the buffers grow in 25% steps); checkpoint: "
        "tensor bytes of `state_dict()` (trimmed to the ids seen).",
        "",
        _common.markdown_table(
            [
                "rule",
                "pairs N",
                "memory (MB)",
                "bytes / pair",
                "checkpoint (MB)",
                "step (µs)",
                "start_epoch (ms)",
                "flagged",
            ],
            miner_rows,
            "lrrrrrrr",
        ),
        "",
        f"- memory at N = {biggest:,}: {'within' if memory_ok else 'ABOVE'} the 32 MB target",
        f"- start_epoch at N = {biggest:,}: {'under' if boundary_ok else 'ABOVE'} the 1 s target",
        f"- per-step time: the slowest N is {flat:.2f}x the smallest N (flat means about 1)",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this benchmark."""
    parser = _common.new_parser(__doc__, repeats=3)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes of the group term (default: 32 64 128 256 512 1024; 32 64 with --quick)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=None,
        help="data set sizes of the miner (default: 10000 100000 1000000; 1000 10000 with --quick)",
    )
    parser.add_argument(
        "--step-batch",
        type=int,
        default=None,
        help="batch of the measured model step (default: 256; 64 with --quick)",
    )
    parser.add_argument(
        "--step-repeats",
        type=int,
        default=None,
        help="measured model steps after one warm-up (default: 2; 1 with --quick)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model of the step (default: cpu; tiny with --quick)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its section and write it into ``--output``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _common.check_common_arguments(parser, args)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or ([32, 64] if quick else [32, 64, 128, 256, 512, 1024])
    args.pairs = args.pairs or ([1000, 10_000] if quick else [10_000, 100_000, 1_000_000])
    args.step_batch = args.step_batch or (64 if quick else 256)
    args.step_repeats = args.step_repeats or (1 if quick else 2)
    args.shape = args.shape or ("tiny" if quick else "cpu")
    args.exact_batch = min(256, max(args.batch_sizes))
    if min(args.batch_sizes) < 2 or args.step_batch < 2:
        parser.error("--batch-sizes and --step-batch must be >= 2")
    if min(args.pairs) < 2 * MINER_BATCH:
        parser.error(f"--pairs must be >= {2 * MINER_BATCH}, got {args.pairs}")
    if args.step_repeats < 1:
        parser.error(f"--step-repeats must be >= 1, got {args.step_repeats}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fairvlm_hf.objective.bad_pairs").setLevel(logging.WARNING)
    threads = _common.set_threads(args.threads)
    info = _common.RunInfo("scaling.py", argv, threads)

    miner: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.pairs:
        for rule in THRESHOLDS:
            miner[(rule, n)] = simulate_miner(rule, n, args.repeats)
            logger.info("miner %s, N=%d: %s", rule, n, miner[(rule, n)])
    ot = measure_ot(sorted(set(args.batch_sizes) | {args.step_batch}), args.repeats)
    settings = ((0.05, 0.9),) if quick else ((0.05, 0.9), (0.01, 0.99), (0.001, 0.99))
    exact_rows = check_exact(args.exact_batch, settings)
    step = measure_step(args.shape, args.step_batch, args.step_repeats, max(args.pairs))
    ot = {b: ot[b] for b in sorted(ot) if b in args.batch_sizes or b == args.step_batch}
    section = render(args, ot, step, exact_rows, miner) + "\n\n" + "\n".join(info.footer())
    _common.publish(SECTION, section, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
