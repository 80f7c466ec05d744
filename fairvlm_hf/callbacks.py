"""Epoch hooks of bad-pair mining and the scores of its flags against known bad pairs.

`BadPairMiningCallback` tells the trainer when an epoch starts (the miner recomputes its flags
then) and when training ends (the flag table and the detection summary are written).
`detection_scores` measures flags against a ground-truth table, as the synthetic data provides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from fairvlm_hf.trainer import FairRobustTrainer

logger = logging.getLogger(__name__)

GROUND_TRUTH_COLUMNS: tuple[str, ...] = ("sample_id", "kind")
#: Ground-truth kinds whose name contains this word pair a text that contradicts the image.
CONTRADICTING = "contradicting"


def check_ground_truth(ground_truth: pd.DataFrame) -> pd.DataFrame:
    """Validate a ground-truth table of bad pairs (columns sample_id, kind); return a clean copy."""
    if not isinstance(ground_truth, pd.DataFrame):
        raise TypeError(
            f"ground_truth must be a pandas DataFrame, got {type(ground_truth).__name__}"
        )
    missing = [c for c in GROUND_TRUTH_COLUMNS if c not in ground_truth.columns]
    if missing:
        raise KeyError(
            f"ground_truth is missing column(s) {missing}; it has {list(ground_truth.columns)}"
        )
    table = ground_truth[list(GROUND_TRUTH_COLUMNS)].copy()
    if table["sample_id"].isna().any() or table["kind"].isna().any():
        raise ValueError("ground_truth: sample_id and kind must not be empty")
    table["sample_id"] = table["sample_id"].astype("int64")
    table["kind"] = table["kind"].astype(str)
    duplicated = table["sample_id"][table["sample_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"ground_truth: sample_id(s) listed more than once: {duplicated[:10]}")
    return table


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def detection_scores(flagged: Iterable[int], ground_truth: pd.DataFrame) -> dict[str, Any]:
    """Precision and recall of a set of flagged sample ids against known bad pairs.

    ``all`` counts every ground-truth pair as the target; ``all_contradicting`` the pairs whose
    text contradicts the image (kinds whose name contains "contradicting", the mismatches that a
    high loss should reveal); each truth kind gets its own entry. Recall is the share of the
    target pairs that are flagged, precision the share of the flags that hit the target. A ratio
    with a zero denominator is None (nothing flagged, or no pair of that kind), never NaN.
    """
    truth = check_ground_truth(ground_truth)
    flagged_ids = {int(s) for s in flagged}
    n_flagged = len(flagged_ids)
    scores: dict[str, Any] = {"n_flagged": n_flagged}
    groups = [("all", truth)]
    contradicting = truth[truth["kind"].str.contains(CONTRADICTING, regex=False)]
    if len(contradicting):
        groups.append(("all_contradicting", contradicting))
    groups += [(str(kind), part) for kind, part in truth.groupby("kind")]
    for name, part in groups:
        targets = set(part["sample_id"].tolist())
        hits = len(flagged_ids & targets)
        scores[name] = {
            "n_true": len(targets),
            "n_hit": hits,
            "precision": _ratio(hits, n_flagged),
            "recall": _ratio(hits, len(targets)),
        }
    return scores


def flat_detection_scores(scores: dict[str, Any], prefix: str) -> dict[str, float]:
    """The defined ratios of ``detection_scores`` as flat log keys (``prefix/all/recall``...)."""
    flat: dict[str, float] = {}
    for name, value in scores.items():
        if not isinstance(value, dict):
            continue
        for metric in ("precision", "recall"):
            ratio = value[metric]
            if ratio is not None and math.isfinite(ratio):
                flat[f"{prefix}/{name}/{metric}"] = float(ratio)
    return flat


class BadPairMiningCallback(TrainerCallback):
    """Calls the trainer's mining hooks at each epoch start and at the end of training."""

    def __init__(self, trainer: FairRobustTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        epoch = 0 if state.epoch is None else math.floor(state.epoch + 1e-9)
        self.trainer.begin_mining_epoch(epoch)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.trainer.write_bad_pair_report()
