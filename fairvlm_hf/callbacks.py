"""Trainer callbacks: bad-pair mining's epoch hooks, and a clean stop on SIGINT or SIGTERM.

`BadPairMiningCallback` tells the trainer when an epoch starts (the miner recomputes its flags
then) and when training ends (the flag table and the detection summary are written).
`detection_scores` measures flags against a ground-truth table, as the synthetic data provides.
`StopOnSignalCallback` turns the first SIGINT or SIGTERM into "save a checkpoint at the end of
this optimizer step and stop", and a second one into an immediate abort.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
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


def statistic_separability(
    sample_ids: Iterable[int], statistic: Iterable[float], ground_truth: pd.DataFrame
) -> dict[str, float]:
    """How well the miner's statistic ``m`` separates known bad pairs from clean ones.

    For ``all``, ``all_contradicting`` and each truth kind: the AUC of ``m`` with that kind's pairs
    as positives and the pairs absent from the ground truth as negatives (0.5: no separation;
    1: every bad pair has a higher ``m`` than every clean one). Computed over the pairs that have
    a statistic; a target with no pair seen, or no clean pair, is left out.
    """
    from sklearn.metrics import roc_auc_score

    truth = check_ground_truth(ground_truth)
    values = pd.Series(list(statistic), index=[int(s) for s in sample_ids], dtype="float64")
    bad = set(truth["sample_id"].tolist())
    clean = values[~values.index.isin(bad)]
    targets = {"all": truth}
    contradicting = truth[truth["kind"].str.contains(CONTRADICTING, regex=False)]
    if len(contradicting):
        targets["all_contradicting"] = contradicting
    targets.update({str(kind): part for kind, part in truth.groupby("kind")})
    result: dict[str, float] = {}
    for name, part in targets.items():
        positives = values[values.index.isin(set(part["sample_id"].tolist()))]
        if len(positives) and len(clean):
            labels = [1] * len(positives) + [0] * len(clean)
            result[name] = float(roc_auc_score(labels, pd.concat([positives, clean]).to_numpy()))
    return result


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


class WorkersIgnoreSigint:
    """``worker_init_fn`` wrapper: DataLoader workers ignore SIGINT, then run ``init_fn``.

    Ctrl-C in a terminal sends SIGINT to the whole process group. A worker that receives it ends
    its loop, and the main process, which wants to finish its step and save a checkpoint, then
    fails on the next batch. Ignoring it in the workers leaves the decision to the main process,
    which shuts its workers down itself. SIGTERM is left to PyTorch's worker handler.
    """

    def __init__(self, init_fn: Callable[[int], None] | None) -> None:
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.init_fn is not None:
            self.init_fn(worker_id)


class TrainingInterrupted(RuntimeError):
    """Training stopped early on a signal, after saving a checkpoint it can resume from.

    Attributes: ``signal_name`` (``"SIGTERM"``...), ``global_step`` (optimizer steps done) and
    ``checkpoint`` (the folder that holds the state at that step, or None if none was saved).
    """

    def __init__(
        self, message: str, signal_name: str, global_step: int, checkpoint: str | None
    ) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.global_step = global_step
        self.checkpoint = checkpoint


class StopOnSignalCallback(TrainerCallback):
    """Stop training cleanly on the first SIGINT or SIGTERM; abort at once on the second.

    The handlers are installed only inside `handling_signals` (the trainer wraps ``train`` in
    it) and only in the main thread; a signal whose disposition is "ignore" stays ignored. On the
    first signal the handler only records it. At the end of the current optimizer step the
    callback asks the Trainer to save a checkpoint and stop (``control.should_save``,
    ``control.should_training_stop``), and skips any evaluation due then, so that the process
    exits within the grace period of a scheduler. A second signal restores the handlers that were
    in place before training and delivers the signal again: SIGINT raises ``KeyboardInterrupt``
    and SIGTERM ends the process, without saving. Under several processes the request is
    combined across ranks every step, so that every rank stops at the same step.

    Args:
        signals: the signals to handle (default SIGINT and SIGTERM).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self.received: str | None = None
        self.count = 0
        self.stop_step: int | None = None
        self.saved_step: int | None = None

    @property
    def stopped(self) -> bool:
        """Whether training was asked to stop because of a signal."""
        return self.stop_step is not None

    @contextmanager
    def handling_signals(self) -> Iterator[StopOnSignalCallback]:
        """Install the handlers for the duration of the block; restore the previous ones after."""
        self._reset()
        if threading.current_thread() is not threading.main_thread():
            logger.info("training outside the main thread: SIGINT and SIGTERM are not handled")
            yield self
            return
        try:
            for sig in self.signals:
                previous = signal.getsignal(sig)
                if previous == signal.SIG_IGN:
                    logger.debug("%s is ignored by this process: left as it is", sig.name)
                    continue
                signal.signal(sig, self._handle)
                self._previous[sig] = previous
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.count == 1:
            self.received = name
            logger.warning(
                "%s received: a checkpoint will be saved at the end of the current step and "
                "training will stop; send it again to abort at once without saving",
                name,
            )
            return
        logger.warning("%s received a second time: aborting at once, without saving", name)
        self._restore()
        signal.raise_signal(signum)

    def _requested(self, args: TrainingArguments) -> bool:
        """Whether any rank received a signal (one all-reduce per call under several processes)."""
        local = self.received is not None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if args.world_size > 1 and distributed:
            flag = torch.tensor([float(local)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return local

    def _stop(self, state: TrainerState, control: TrainerControl) -> None:
        if self.stop_step is None:
            logger.warning(
                "stopping at step %d on %s: saving a checkpoint first",
                state.global_step,
                self.received or "a signal received by another process",
            )
        self.stop_step = state.global_step
        control.should_training_stop = True
        control.should_evaluate = False
        control.should_save = self.saved_step != state.global_step

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.stop_step is not None or self._requested(args):
            self._stop(state, control)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.stop_step is not None or self._requested(args):
            self._stop(state, control)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.saved_step = state.global_step
