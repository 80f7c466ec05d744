"""Run the four ablation rows on the same data and seeds, and write `ablation.md` and a plot.

    python recipes/ablation.py                       # 4 rows x 3 seeds on the embedded default
    python recipes/ablation.py --seeds 0 --rows clip fair_robust --num_train_epochs 2
    python recipes/ablation.py --data_dir /path/to/FairVLMed -- --model_name_or_path ...

Rows are config files of recipes/configs/ that differ only in the objective (plain CLIP, the
group regulariser only, bad-pair mining only, both). Each (row, seed) run trains and evaluates
with recipes/train.py in its own folder; finished runs are reused, so an interrupted ablation
resumes. The table reports the mean and standard deviation over seeds of the test AUC, ES-AUC
per attribute, group AUCs, and the precision and recall of the bad-pair flags where mining is on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _runs import RECIPES, Run, execute, read_json

ROWS = ("clip", "fairclip", "dbpm", "fair_robust")
ATTRIBUTES = ("race", "gender", "ethnicity", "language")
ROW_TITLES = {
    "clip": "CLIP",
    "fairclip": "FairCLIP-like (group OT)",
    "dbpm": "DBPM (bad-pair mining)",
    "fair_robust": "FairRobust (both)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="configs to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--output_dir", default="outputs/ablation", help="where runs and tables go")
    parser.add_argument("--num_train_epochs", type=float, default=None, help="override epochs")
    parser.add_argument("--data_dir", default=None, help="FairVLMed folder (default: synthetic)")
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="after --: flags passed to every train.py run"
    )
    return parser


def _runs(args: argparse.Namespace) -> list[tuple[str, int, Run]]:
    extra = [a for a in args.extra if a != "--"]
    runs = []
    for row in args.rows:
        config = RECIPES / "configs" / f"{row}.yaml"
        if not config.is_file():
            raise SystemExit(f"--rows: no config {config}")
        for seed in args.seeds:
            flags = ["--seed", str(seed), "--default_seed", str(seed), "--save_total_limit", "1"]
            if args.num_train_epochs is not None:
                flags += ["--num_train_epochs", str(args.num_train_epochs)]
            if args.data_dir is not None:
                flags += ["--data_dir", args.data_dir]
            out = Path(args.output_dir) / row / f"seed{seed}"
            runs.append((row, seed, Run(f"{row}-seed{seed}", config, out, flags + extra)))
    return runs


def collect(run: Run) -> dict[str, Any]:
    """The figures of one finished run: test metrics, detection scores and time."""
    metrics = read_json(run.output_dir / "eval_results.json")["metrics"]
    summary = read_json(run.output_dir / "run_summary.json")
    record: dict[str, Any] = {"metrics": metrics, "seconds": summary.get("seconds")}
    detection_file = run.output_dir / "bad_pair_detection.json"
    if detection_file.is_file():
        detection = json.loads(detection_file.read_text()).get("detection") or {}
        for target in ("all_contradicting", "swap_same_label", "all"):
            if target in detection:
                record[f"precision_{target}"] = detection[target]["precision"]
                record[f"recall_{target}"] = detection[target]["recall"]
    return record


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _cell(stat: tuple[float, float] | None) -> str:
    return "-" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"


def summarise(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and spread over seeds of every figure, per row."""
    table: dict[str, dict[str, Any]] = {}
    for row, runs in records.items():
        keys = sorted({k for r in runs for k in r["metrics"]})
        stats = {k: _mean_std([r["metrics"].get(k) for r in runs]) for k in keys}
        for extra in (
            "precision_all_contradicting",
            "recall_all_contradicting",
            "recall_swap_same_label",
            "seconds",
        ):
            stats[extra] = _mean_std([r.get(extra) for r in runs])
        table[row] = stats
    return table


def write_markdown(
    table: dict[str, dict[str, Any]], seeds: list[int], path: Path, command: str
) -> None:
    lines = [
        "# Ablation on the same data, model and seeds",
        "",
        f"Seeds: {', '.join(map(str, seeds))}; mean ± standard deviation over seeds, test split.",
        f"Command: `{command}`",
        "",
        "| objective | AUC | "
        + " | ".join(f"ES-AUC {a}" for a in ATTRIBUTES)
        + " | mean ES-AUC | flag precision (contradicting) | flag recall (contradicting) "
        "| flag recall (same-label swaps) | time (s) |",
        "|---" * (len(ATTRIBUTES) + 7) + "|",
    ]
    for row, stats in table.items():
        cells = [_cell(stats.get("auc"))]
        cells += [_cell(stats.get(f"es_auc_{a}")) for a in ATTRIBUTES]
        cells += [_cell(stats.get("mean_es_auc"))]
        cells += [
            _cell(stats.get(k))
            for k in (
                "precision_all_contradicting",
                "recall_all_contradicting",
                "recall_swap_same_label",
            )
        ]
        seconds = stats.get("seconds")
        cells.append("-" if seconds is None else f"{seconds[0]:.0f}")
        lines.append(f"| {ROW_TITLES.get(row, row)} | " + " | ".join(cells) + " |")
    lines += ["", "## Group AUCs", ""]
    for attribute in ATTRIBUTES:
        prefix = f"group_auc_{attribute}_"
        groups = sorted(
            {k[len(prefix) :] for s in table.values() for k in s if k.startswith(prefix)}
        )
        if not groups:
            continue
        lines += [
            f"### {attribute}",
            "",
            "| objective | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for row, stats in table.items():
            lines.append(
                f"| {ROW_TITLES.get(row, row)} | "
                + " | ".join(_cell(stats.get(prefix + g)) for g in groups)
                + " |"
            )
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    metrics = ["auc", *[f"es_auc_{a}" for a in ATTRIBUTES]]
    labels = ["AUC", *[f"ES-AUC\n{a}" for a in ATTRIBUTES]]
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(table), 1)
    for i, (row, stats) in enumerate(table.items()):
        means = [stats[m][0] if stats.get(m) else 0.0 for m in metrics]
        spreads = [stats[m][1] if stats.get(m) else 0.0 for m in metrics]
        positions = [j + i * width for j in range(len(metrics))]
        axis.bar(positions, means, width, yerr=spreads, capsize=3, label=ROW_TITLES.get(row, row))
    axis.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(metrics))], labels)
    axis.set_ylabel("test split")
    lows = [s[m][0] - s[m][1] for s in table.values() for m in metrics if s.get(m)]
    axis.set_ylim(max(0.0, min(lows, default=0.5) - 0.05), 1.0)
    axis.legend(fontsize=8)
    axis.set_title("Ablation: mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    runs = _runs(args)
    records: dict[str, list[dict[str, Any]]] = {row: [] for row in args.rows}
    for index, (row, seed, run) in enumerate(runs, 1):
        status = "reused" if run.done else "running"
        print(f"[{index}/{len(runs)}] {row} seed {seed}: {status} -> {run.output_dir}", flush=True)
        execute(run, out / "logs")
        records[row].append(collect(run))
    table = summarise(records)
    command = "python recipes/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(table, args.seeds, out / "ablation.md", command.strip())
    plot(table, out / "ablation.png")
    (out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print((out / "ablation.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.png'}, {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
