"""How well could any detector find the contradicting pairs of the synthetic data?

    python recipes/detection_ceiling.py                          # the default data set
    python recipes/detection_ceiling.py --cdr_std 0.05 --errors 0 0.02

A note contradicts its image when it states the other diagnosis. The image shows that only
through its optic cup: a detector, whatever its statistic, can do no better than one that reads
the cup-to-disc ratio (CDR) from the image and compares it with what the note claims. This
recipe computes that best detector exactly: for a reader whose CDR reading has Gaussian error
``e``, the posterior log-odds that a pair contradicts its note given the reading, the note's
claimed diagnosis and the ratio it states (the Neyman-Pearson optimal score under the
generator's own distributions). For each ``e`` it reports the reader's label AUC (how a
classifier that good would score on the glaucoma label: compare with a model's zero-shot AUC),
the AUC of the optimal score against the truth, and the best precision/recall that a threshold
on it reaches. The reading error is the same for every group, so the figures are optimistic for
the groups whose images the generator degrades.

Writes `ceiling.md` and `ceiling.json` in --output_dir. Nothing is trained or rendered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

from fairvlm_hf.data.synthetic import BAD_PAIR_KINDS, SyntheticConfig, sample_truth

#: The spread of the ratio a note states around the image's: the generator's reading noise
#: (0.03) and its rounding to 0.05 (variance 0.05^2 / 12).
NOTE_NOISE = math.sqrt(0.03**2 + 0.05**2 / 12)
CONTRADICTING = ("swap_contradicting", "contradicting")


def _log_normal(x: np.ndarray, mean: np.ndarray, var: float) -> np.ndarray:
    return -0.5 * ((x - mean) ** 2 / var + math.log(2 * math.pi * var))


def _log_normal2(x: np.ndarray, y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Log density of the bivariate normal with equal means ``mean`` and covariance ``cov``."""
    det = cov[0, 0] * cov[1, 1] - cov[0, 1] ** 2
    dx, dy = x - mean, y - mean
    quad = (cov[1, 1] * dx**2 - 2 * cov[0, 1] * dx * dy + cov[0, 0] * dy**2) / det
    return -0.5 * (quad + math.log((2 * math.pi) ** 2 * det))


def contradiction_log_odds(
    reading: np.ndarray,
    claimed: np.ndarray,
    stated: np.ndarray,
    config: SyntheticConfig,
    error: float,
) -> np.ndarray:
    """Posterior log-odds that each pair's note contradicts its image (higher: more likely).

    ``reading`` is the CDR read from the image with Gaussian error ``error``; ``claimed`` the
    diagnosis the note states; ``stated`` the ratio it states. Under the generator, a clean note
    states the image's own CDR (plus note noise), a same-label swap states another patient's CDR
    of the same diagnosis, and a contradicting note the CDR of a patient of the claimed
    (wrong) diagnosis. Clipping of the ratios is ignored.
    """
    mean = np.where(claimed == 1, config.cdr_glaucoma, config.cdr_normal)
    other = np.where(claimed == 1, config.cdr_normal, config.cdr_glaucoma)
    var_image = config.cdr_std**2 + error**2
    var_note = config.cdr_std**2 + NOTE_NOISE**2
    cov = np.array([[var_image, config.cdr_std**2], [config.cdr_std**2, var_note]])
    log_note = _log_normal(stated, mean, var_note)
    log_clean = _log_normal2(reading, stated, mean, cov)
    log_same = _log_normal(reading, mean, var_image) + log_note
    log_contra = _log_normal(reading, other, var_image) + log_note
    mix = np.asarray(config.bad_pair_mix, dtype=float) / float(np.sum(config.bad_pair_mix))
    share = dict(zip(BAD_PAIR_KINDS, mix, strict=True))
    rate = config.bad_pair_rate
    prior_contra = rate * (share["swap_contradicting"] + share["contradicting"])
    prior_same = rate * share["swap_same_label"]
    prior_clean = 1.0 - rate
    rest = np.logaddexp(
        math.log(max(prior_clean, 1e-300)) + log_clean,
        math.log(max(prior_same, 1e-300)) + log_same,
    )
    return math.log(max(prior_contra, 1e-300)) + log_contra - rest


def best_precision_recall(truth: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """The threshold on ``score`` that maximises min(precision, recall), and both at it."""
    precision, recall, _ = precision_recall_curve(truth, score)
    worst = np.minimum(precision, recall)
    best = int(np.argmax(worst))
    return {"precision": float(precision[best]), "recall": float(recall[best])}


def ceiling_rows(
    config: SyntheticConfig, errors: Sequence[float], *, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per reading error: label AUC of the reader, AUC and best P/R of the optimal score."""
    truth = sample_truth(config, "train")
    contradicting = np.isin(truth["kind"], CONTRADICTING)
    if contradicting.all() or not contradicting.any():
        raise ValueError(
            "detection_ceiling: the training split needs contradicting and other pairs"
        )
    rows = []
    for error in errors:
        if error < 0:
            raise ValueError(f"--errors: reading errors must be >= 0, got {error}")
        rng = np.random.default_rng(seed)
        reading = truth["cdr"] + rng.normal(0.0, error, len(truth["cdr"]))
        score = contradiction_log_odds(
            reading, truth["claimed_glaucoma"], truth["stated_cdr"], config, error
        )
        best = best_precision_recall(contradicting, score)
        rows.append(
            {
                "reading_error": float(error),
                "label_auc": float(roc_auc_score(truth["glaucoma"], reading)),
                "detection_auc": float(roc_auc_score(contradicting, score)),
                **best,
                "reaches_0.8": bool(min(best["precision"], best["recall"]) >= 0.8),
            }
        )
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path, command: str) -> None:
    lines = [
        "# Ceiling of bad-pair detection on the synthetic data",
        "",
        f"    {command}",
        "",
        "| CDR reading error | label AUC of that reader | AUC of the optimal score "
        "(contradicting) | best min(P, R): precision | recall | reaches 0.8 / 0.8 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['reading_error']:g} | {row['label_auc']:.3f} | {row['detection_auc']:.3f} | "
            f"{row['precision']:.3f} | {row['recall']:.3f} | "
            f"{'yes' if row['reaches_0.8'] else 'no'} |"
        )
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--errors",
        type=float,
        nargs="+",
        default=[0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2],
        help="Standard deviations of the CDR reading error, in CDR units (the ratio is 0-1).",
    )
    parser.add_argument("--output_dir", default="outputs/detection_ceiling")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Synthetic data seed.")
    parser.add_argument("--num_train", type=int, default=defaults.num_train)
    parser.add_argument("--cdr_std", type=float, default=defaults.cdr_std)
    parser.add_argument("--bad_pair_rate", type=float, default=defaults.bad_pair_rate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = dataclasses.replace(
        SyntheticConfig(),
        seed=args.seed,
        num_train=args.num_train,
        cdr_std=args.cdr_std,
        bad_pair_rate=args.bad_pair_rate,
    )
    rows = ceiling_rows(config, args.errors)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python recipes/detection_ceiling.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    (out / "ceiling.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), "rows": rows}, indent=2) + "\n"
    )
    write_markdown(rows, out / "ceiling.md", command.strip())
    sys.stdout.write((out / "ceiling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
