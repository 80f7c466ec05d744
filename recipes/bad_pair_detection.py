"""How well each threshold rule finds the planted bad pairs of the synthetic data.

    python recipes/bad_pair_detection.py                 # sigma, mad, mixture (+ the seed's 3/3 sigma)
    python recipes/bad_pair_detection.py --rules mixture --num_train_epochs 3

Each rule trains the bad-pair-mining row (recipes/configs/dbpm.yaml: no group term) on the same
data and seed, and reads its `bad_pair_detection.json`: at every epoch start after the warm-up,
the precision and recall of the faulty flags against the ground truth (`bad_pairs.csv` of the
synthetic set, which training never reads), per kind of planted pair, and the AUC of the
statistic m against the truth (how separable the kinds are, whatever the threshold).
Finished runs are reused. Writes `detection.md` and `detection.json` in --output_dir.

    python recipes/bad_pair_detection.py --rescore outputs/dbpm/checkpoint-660

With --rescore, nothing is trained: every rule is applied to the statistic that a finished run
saved in a checkpoint (`bad_pair_miner.pt`), as the next epoch start would apply it, and scored
against the ground truth. This compares the rules on one statistic in seconds; it leaves out the
feedback of each rule's weights on training. Writes `rescore.md` and `rescore.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _runs import RECIPES, Run, execute, read_json

RULES: dict[str, list[str]] = {
    "sigma": ["--dbpm_threshold", "sigma"],
    "mad": ["--dbpm_threshold", "mad"],
    "mixture": ["--dbpm_threshold", "mixture"],
    "sigma_seed_3_3": [
        "--dbpm_threshold",
        "sigma",
        "--dbpm_beta_noisy",
        "3",
        "--dbpm_beta_faulty",
        "3",
    ],
}
TARGETS = ("all_contradicting", "swap_contradicting", "contradicting", "swap_same_label", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/bad_pair_detection")
    parser.add_argument("--num_train_epochs", type=float, default=None)
    parser.add_argument(
        "--rescore",
        metavar="CHECKPOINT",
        default=None,
        help="Apply every rule to the bad-pair state saved in this checkpoint instead of training.",
    )
    parser.add_argument(
        "--statistics",
        nargs="+",
        default=["mean", "epoch_weighted"],
        choices=["mean", "epoch_weighted"],
        help="Statistics to rescore with (--rescore only).",
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="Folder with the ground truth (bad_pairs.csv) for --rescore; default: the synthetic "
        "default data set.",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for train.py")
    return parser


def epoch_rows(detection: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per epoch start with flags in force: counts, precision/recall and statistic AUC."""
    rows = []
    for record in detection.get("epochs", []):
        if not record.get("active"):
            continue
        scores = record.get("detection", {})
        row: dict[str, Any] = {
            "epoch": record["epoch"],
            "n_faulty": record.get("n_faulty"),
            "n_noisy": record.get("n_noisy"),
        }
        for target in TARGETS:
            if target in scores:
                row[f"precision_{target}"] = scores[target]["precision"]
                row[f"recall_{target}"] = scores[target]["recall"]
        for target, auc in (record.get("statistic_auc") or {}).items():
            row[f"statistic_auc_{target}"] = auc
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_markdown(results: dict[str, list[dict[str, Any]]], path: Path, command: str) -> None:
    columns = [
        ("epoch", "epoch"),
        ("n_faulty", "flagged faulty"),
        ("precision_all_contradicting", "precision (contradicting)"),
        ("recall_all_contradicting", "recall (contradicting)"),
        ("recall_swap_same_label", "recall (same-label swaps)"),
        ("statistic_auc_all_contradicting", "AUC of m (contradicting)"),
        ("statistic_auc_swap_same_label", "AUC of m (same-label swaps)"),
    ]
    if any("best_threshold_precision" in row for rows in results.values() for row in rows):
        columns += [
            ("best_threshold_precision", "best threshold on m: precision"),
            ("best_threshold_recall", "recall (contradicting)"),
        ]
    lines = [
        "| rule | " + " | ".join(title for _, title in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for rule, rows in results.items():
        for row in rows:
            lines.append(f"| {rule} | " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    lines += ["", f"Command: `{command}`"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


#: Training flag of a rule -> the ``BadPairMiner`` setting it sets.
MINER_SETTINGS = {
    "--dbpm_threshold": "threshold",
    "--dbpm_beta_noisy": "beta_noisy",
    "--dbpm_beta_faulty": "beta_faulty",
}


def rule_settings(rule: str) -> dict[str, Any]:
    """The miner settings that the training flags of ``rule`` select."""
    flags = RULES[rule]
    settings: dict[str, Any] = {}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        settings[MINER_SETTINGS[flag]] = value if flag == "--dbpm_threshold" else float(value)
    return settings


def best_threshold(sample_ids: list[int], m: Any, ground_truth: Any) -> dict[str, float]:
    """Precision and recall on contradicting pairs at the threshold on ``m`` that maximises
    their minimum: what the best rule could reach on this statistic, chosen in hindsight.
    """
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    from fairvlm_hf.callbacks import CONTRADICTING

    kinds = ground_truth["kind"].astype(str)
    targets = set(ground_truth.loc[kinds.str.contains(CONTRADICTING, regex=False), "sample_id"])
    truth = np.array([int(s) in targets for s in sample_ids])
    if truth.all() or not truth.any():
        return {}
    precision, recall, _ = precision_recall_curve(truth, np.asarray(m, dtype=np.float64))
    best = int(np.argmax(np.minimum(precision, recall)))
    return {
        "best_threshold_precision": float(precision[best]),
        "best_threshold_recall": float(recall[best]),
    }


def rescore(
    checkpoint: Path,
    ground_truth: Any,
    rules: Sequence[str],
    statistics: Sequence[str] = ("mean",),
) -> dict[str, dict]:
    """Each rule's faulty flags on the statistic saved in ``checkpoint``, scored against the truth.

    The saved state is loaded once per rule and statistic (``mean`` or ``epoch_weighted``: the
    miner keeps the sums of both) with those settings in place of the run's, and the next epoch
    is started (which folds the last epoch into the statistic and flags pairs). Keys of the
    result: the rule, followed by `` (epoch_weighted)`` for that statistic.
    """
    import torch

    from fairvlm_hf.callbacks import detection_scores, statistic_separability
    from fairvlm_hf.objective.bad_pairs import BadPairMiner
    from fairvlm_hf.trainer import MINING_STATE_NAME

    path = Path(checkpoint) / MINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--rescore: no {MINING_STATE_NAME} in {checkpoint}")
    saved = torch.load(path, map_location="cpu", weights_only=True)["miner"]
    results: dict[str, dict] = {}
    for rule, statistic in ((r, st) for st in statistics for r in rules):
        state = dict(saved)
        state.update({f"config.{k}": v for k, v in rule_settings(rule).items()})
        state["config.statistic"] = statistic
        miner = BadPairMiner(
            **{k.removeprefix("config."): v for k, v in state.items() if k.startswith("config.")}
        )
        miner.load_state_dict(state)
        record = {**miner.start_epoch(miner.epoch + 1), "active": True}
        ids, m = miner.statistics()
        record["detection"] = detection_scores(miner.flagged_ids("faulty"), ground_truth)
        record["statistic_auc"] = statistic_separability(ids.tolist(), m.tolist(), ground_truth)
        (row,) = epoch_rows({"epochs": [record]})
        row.update(best_threshold(ids.tolist(), m.numpy(), ground_truth))
        results[rule if statistic == "mean" else f"{rule} ({statistic})"] = row
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    command = "python recipes/bad_pair_detection.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.rescore is not None:
        from fairvlm_hf.data.arguments import DataArguments

        truth = DataArguments(data_dir=args.data_dir).ground_truth()
        if truth is None:
            raise FileNotFoundError("--data_dir: no bad_pairs.csv, nothing to score against")
        rows = rescore(Path(args.rescore), truth, args.rules, args.statistics)
        out.mkdir(parents=True, exist_ok=True)
        write_markdown({k: [v] for k, v in rows.items()}, out / "rescore.md", command.strip())
        (out / "rescore.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        print((out / "rescore.md").read_text(encoding="utf-8"))
        return 0
    extra = [a for a in args.extra if a != "--"]
    results: dict[str, list[dict[str, Any]]] = {}
    for rule in args.rules:
        flags = ["--seed", str(args.seed), "--save_total_limit", "1", *RULES[rule]]
        if args.num_train_epochs is not None:
            flags += ["--num_train_epochs", str(args.num_train_epochs)]
        run = Run(f"dbpm-{rule}", RECIPES / "configs" / "dbpm.yaml", out / rule, flags + extra)
        print(f"{rule}: {'reused' if run.done else 'running'} -> {run.output_dir}", flush=True)
        execute(run, out / "logs")
        results[rule] = epoch_rows(read_json(run.output_dir / "bad_pair_detection.json"))
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(results, out / "detection.md", command.strip())
    (out / "detection.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print((out / "detection.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
