"""`FairRobustTrainer`: CLIP fine-tuning with Dynamic Bad Pair Mining and the Sinkhorn group term.

``compute_loss`` reads like the objective (docs: METHOD.md sections 1-4)::

    l_i   = per-pair CLIP loss, negatives from the global batch
    w_i   = miner weight of pair i (1 unless flagged)
    L_rob = sum_i w_i l_i / B
    R     = sum_kg Sinkhorn(values of group g of attribute k, values of the whole batch)
    L     = L_rob + lambda * R

Every logging step records L_clip, L_rob, R, each D_kg and the mining counts (TRL-style
``_metrics``, averaged in ``log``). The miner's memory and flags travel in every checkpoint, so
that a resumed run continues exactly as an uninterrupted one. Evaluation scores the validation
images zero-shot and reports AUC and ES-AUC per attribute through ``FairnessMetrics``.

A run owns its ``output_dir`` (a lock file; a fresh run refuses a folder that holds checkpoints),
each checkpoint is assembled in a staging folder and renamed when complete, and SIGINT or SIGTERM
stops training after saving a checkpoint (see ``fairvlm_hf.run_guard`` and
``StopOnSignalCallback``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalLoopOutput,
    get_last_checkpoint,
    rotate_checkpoints,
)

from fairvlm_hf.callbacks import (
    BadPairMiningCallback,
    StopOnSignalCallback,
    TrainingInterrupted,
    WorkersIgnoreSigint,
    check_ground_truth,
    detection_scores,
    flat_detection_scores,
    statistic_separability,
)
from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.collate import FairVLMedCollator
from fairvlm_hf.data.schema import CATEGORICAL_ATTRIBUTES, LABEL_COLUMN
from fairvlm_hf.evaluation import FairnessMetrics, encode_prompts, zero_shot_scores
from fairvlm_hf.modeling import unwrap_clip
from fairvlm_hf.objective.bad_pairs import FAULTY, NOISY, BadPairMiner
from fairvlm_hf.objective.contrastive import pair_cosine, pairwise_clip_loss
from fairvlm_hf.objective.distributed import all_gather_no_grad, all_gather_with_grad
from fairvlm_hf.objective.group_ot import GroupSinkhorn
from fairvlm_hf.run_guard import (
    OutputDirGuard,
    OutputDirInUseError,
    publish_checkpoint,
    staging_dir,
)

logger = logging.getLogger(__name__)

#: File in every checkpoint folder that holds the miner's memory, flags and epoch history.
MINING_STATE_NAME = "bad_pair_miner.pt"
#: Name of the (optional) config field that lets a fresh run delete a folder's old checkpoints.
OVERWRITE_FIELD = "overwrite_output_dir"
#: Files written to ``output_dir`` at the end of training.
FLAG_TABLE_NAME = "bad_pairs.csv"
DETECTION_REPORT_NAME = "bad_pair_detection.json"
FLAG_TABLE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "kind",
    "statistic",
    "first_epoch_flagged",
    "flagged_now",
)


class NonFiniteLossError(RuntimeError):
    """A term of the objective is NaN or infinite; raised before backward and any checkpoint."""


def _scalar(value: Any) -> Any:
    """A JSON- and log-friendly version of a summary value (one-element tensors become numbers)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return value


class FairRobustTrainer(Trainer):
    """`Trainer` for CLIP-style models with the robust (DBPM) and fair (Sinkhorn) objective.

    Args:
        model: a ``CLIPModel`` (or a ``PeftModel`` around one).
        args: a `FairRobustConfig`.
        data_collator: defaults to ``FairVLMedCollator(processing_class)``. Batches must carry
            ``pixel_values``, ``input_ids``, ``attention_mask``, ``sample_id``, ``glaucoma`` and
            the attribute codes.
        processing_class: the CLIP processor; it also encodes the zero-shot prompts.
        compute_metrics: defaults to ``FairnessMetrics(args.eval_attributes)``.
        ground_truth: optional table of known bad pairs (columns ``sample_id``, ``kind``) for the
            precision and recall of the flags; training never reads it otherwise.
        **kwargs: the other arguments of `transformers.Trainer`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: FairRobustConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[Any] | None = None,
        ground_truth: pd.DataFrame | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = FairRobustConfig(output_dir="fairvlm_hf_output")
        if not isinstance(args, FairRobustConfig):
            raise TypeError(
                f"args must be a FairRobustConfig (it holds the objective's settings), "
                f"got {type(args).__name__}"
            )
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "data_collator: give a collator, or a processing_class for the default "
                    "FairVLMedCollator"
                )
            data_collator = FairVLMedCollator(processing_class)
        if compute_metrics is None:
            compute_metrics = FairnessMetrics(args.eval_attributes)
        self.ground_truth = None if ground_truth is None else check_ground_truth(ground_truth)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            **kwargs,
        )
        # CLIPModel.forward takes **kwargs, which would make Trainer skip the division of the
        # loss by the gradient-accumulation steps; the loss returned here is a per-batch mean.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.group_ot = (
            GroupSinkhorn(
                self.args.fairness_attributes,
                blur=self.args.fairness_blur,
                p=2,
                min_group_size=self.args.fairness_min_group_size,
                method=self.args.fairness_ot,
            )
            if self.args.fairness_attributes
            else None
        )
        self._reset_mining()
        self._prompt_embeds: Tensor | None = None
        self._staging_root: Path | None = None
        self._warned: set[str] = set()
        self.add_callback(BadPairMiningCallback(self))
        self.stop_on_signal = StopOnSignalCallback()
        self.add_callback(self.stop_on_signal)

    # ------------------------------------------------------------------ mining state
    def _new_miner(self) -> BadPairMiner | None:
        if not self.args.dbpm:
            return None
        return BadPairMiner(
            warmup_epochs=self.args.dbpm_warmup_epochs,
            threshold=self.args.dbpm_threshold,
            beta_noisy=self.args.dbpm_beta_noisy,
            beta_faulty=self.args.dbpm_beta_faulty,
            weighting=self.args.dbpm_weighting,
            statistic=self.args.dbpm_statistic,
        )

    def _reset_mining(self) -> None:
        """A fresh miner and an empty epoch history (start of a run that does not resume)."""
        self.miner = self._new_miner()
        self._mining_epoch: int | None = None
        self._mining_history: list[dict[str, Any]] = []

    def _flag_rows(self) -> list[dict[str, Any]]:
        """One row per pair ever flagged (sample_id, kind, statistic, first epoch, flagged now)."""
        return [] if self.miner is None else list(self.miner.flag_table())

    def _current_faulty_ids(self) -> list[int]:
        return [] if self.miner is None else self.miner.flagged_ids("faulty")

    def begin_mining_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` of the miner (flags from the losses of the epochs before it).

        Called at every epoch start; an epoch already started (a run resumed in its middle) is
        not started twice. Logs the miner's summary and, given ground truth, the precision and
        recall of the current faulty flags.
        """
        if self.miner is None or (self._mining_epoch is not None and epoch <= self._mining_epoch):
            return
        summary = self.miner.start_epoch(int(epoch))
        self._mining_epoch = int(epoch)
        record: dict[str, Any] = {"epoch": int(epoch)}
        record.update({str(k): _scalar(v) for k, v in dict(summary or {}).items()})
        logs = {
            f"dbpm/epoch_{k}": float(v)
            for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.ground_truth is not None:
            scores = detection_scores(self._current_faulty_ids(), self.ground_truth)
            ids, statistic = self.miner.statistics()
            if len(ids):
                separability = statistic_separability(
                    ids.tolist(), statistic.tolist(), self.ground_truth
                )
                record["statistic_auc"] = separability
                logs.update({f"dbpm/detect/{k}/statistic_auc": v for k, v in separability.items()})
            record["detection"] = scores
            logs.update(flat_detection_scores(scores, "dbpm/detect"))
        self._mining_history.append(record)
        logger.debug("bad-pair mining, epoch %d: %s", epoch, record)
        if logs:
            Trainer.log(self, logs)

    def _mining_state(self) -> dict[str, Any]:
        return {
            "miner": self.miner.state_dict(),
            "epoch": -1 if self._mining_epoch is None else self._mining_epoch,
            "history": json.dumps(self._mining_history),
        }

    def _load_mining_state(self, checkpoint: str) -> None:
        """Restore the miner and its epoch history from ``checkpoint`` (a checkpoint folder)."""
        self._reset_mining()
        if self.miner is None:
            return
        path = Path(checkpoint) / MINING_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no bad-pair mining state in this checkpoint; resuming without it would "
                "restart mining from an empty memory (was the run trained with dbpm=False?)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.miner.load_state_dict(state["miner"])
        self._mining_epoch = None if int(state["epoch"]) < 0 else int(state["epoch"])
        self._mining_history = json.loads(state["history"])
        logger.info("restored bad-pair mining state from %s", path)

    def bad_pair_detection(self) -> dict[str, Any]:
        """Everything about bad-pair mining, as written to ``bad_pair_detection.json``.

        ``settings`` (the rule and its parameters), ``epochs`` (one record per epoch start: the
        miner's summary and, given ground truth, detection scores), ``flag_counts`` (current
        flags by kind, and how many pairs were ever flagged), ``summary`` (the miner's latest)
        and ``detection`` (scores of the final faulty flags, given ground truth).
        """
        args = self.args
        report: dict[str, Any] = {
            "enabled": self.miner is not None,
            "settings": {
                "threshold": args.dbpm_threshold,
                "beta_noisy": args.dbpm_beta_noisy,
                "beta_faulty": args.dbpm_beta_faulty,
                "weighting": args.dbpm_weighting,
                "statistic": args.dbpm_statistic,
                "warmup_epochs": args.dbpm_warmup_epochs,
            },
            "epochs": list(self._mining_history),
        }
        if self.miner is None:
            return report
        rows = self._flag_rows()
        report["flag_counts"] = {
            kind: sum(1 for row in rows if row["kind"] == kind and row["flagged_now"])
            for kind in ("noisy", "faulty")
        }
        report["flag_counts"]["ever_flagged"] = len(rows)
        report["summary"] = {str(k): _scalar(v) for k, v in dict(self.miner.summary()).items()}
        if self.ground_truth is not None:
            report["detection"] = detection_scores(self._current_faulty_ids(), self.ground_truth)
        return report

    def bad_pair_report(self) -> dict[str, Any]:
        """A compact summary of bad-pair mining for the model card.

        ``counts`` (pairs flagged now, by kind, and ever), ``precision`` and ``recall`` of the
        final faulty flags per ground-truth group (given ground truth; None where undefined),
        the rule's settings, and the flag counts of each epoch.
        """
        detail = self.bad_pair_detection()
        if not detail["enabled"]:
            return {"enabled": False}
        report: dict[str, Any] = {"counts": dict(detail["flag_counts"])}
        if "detection" in detail:
            groups = {k: v for k, v in detail["detection"].items() if isinstance(v, dict)}
            report["precision"] = {k: v["precision"] for k, v in groups.items()}
            report["recall"] = {k: v["recall"] for k, v in groups.items()}
        report.update({f"dbpm_{k}": v for k, v in detail["settings"].items()})
        report["flagged per epoch (noisy/faulty)"] = ", ".join(
            f"{e['epoch']}: {e.get('n_noisy', 0)}/{e.get('n_faulty', 0)}" for e in detail["epochs"]
        )
        return report

    def write_bad_pair_report(self, output_dir: str | None = None) -> None:
        """Write ``bad_pairs.csv`` (the flag table) and ``bad_pair_detection.json`` (the details)."""
        if self.miner is None or not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = self._flag_rows()
        table = pd.DataFrame(rows, columns=list(FLAG_TABLE_COLUMNS))
        table.sort_values("sample_id").to_csv(folder / FLAG_TABLE_NAME, index=False)
        with open(folder / DETECTION_REPORT_NAME, "w", encoding="utf-8") as handle:
            json.dump(self.bad_pair_detection(), handle, indent=2)
        logger.info("wrote %s and %s", folder / FLAG_TABLE_NAME, folder / DETECTION_REPORT_NAME)

    # ------------------------------------------------------------------ train / checkpoints
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """`Trainer.train`, guarding ``output_dir`` and restoring the bad-pair state on resume.

        ``resume_from_checkpoint`` is a checkpoint folder, or True (also the string "true") for
        the last checkpoint of ``output_dir``. While training, the run holds the lock of
        ``output_dir`` (`OutputDirInUseError` if another run does); a fresh run into a folder
        that already holds checkpoints raises `ExistingCheckpointsError` unless the config sets
        ``overwrite_output_dir``. SIGINT or SIGTERM stops training after a checkpoint is saved
        and raises `TrainingInterrupted`, which names that checkpoint.
        """
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, str) and checkpoint.lower() == "true":
            checkpoint = checkpoint if os.path.isdir(checkpoint) else True
        with self._output_dir_guard(resuming=bool(checkpoint)):
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
                if checkpoint is None:
                    raise ValueError(
                        f"No valid checkpoint found in output directory ({self.args.output_dir})"
                    )
            if checkpoint:
                if not os.path.isdir(checkpoint):
                    raise FileNotFoundError(
                        f"resume_from_checkpoint={str(checkpoint)!r}: no such checkpoint folder"
                    )
                self._load_mining_state(str(checkpoint))
            else:
                self._reset_mining()
            with self.stop_on_signal.handling_signals():
                output = super().train(
                    resume_from_checkpoint=checkpoint or None,
                    trial=trial,
                    ignore_keys_for_eval=ignore_keys_for_eval,
                )
                self._raise_if_interrupted(trial)
        return output

    @contextmanager
    def _output_dir_guard(self, resuming: bool) -> Iterator[None]:
        """Hold ``OutputDirGuard`` on the processes that save; every process fails alike."""
        guard = None
        failure: Exception | None = None
        if self.args.should_save:
            guard = OutputDirGuard(
                self.args.output_dir,
                resuming=resuming,
                overwrite=bool(getattr(self.args, OVERWRITE_FIELD, False)),
            )
            try:
                guard.__enter__()
            except (OutputDirInUseError, OSError) as error:  # ExistingCheckpointsError too
                guard, failure = None, error
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            messages = gather_object([None if failure is None else str(failure)])
            others = [m for m in messages if m is not None]
            if others and failure is None:
                if guard is not None:
                    guard.release()
                raise RuntimeError(f"another process could not take the output folder: {others[0]}")
        if failure is not None:
            raise failure
        try:
            yield
        finally:
            if guard is not None:
                guard.release()

    def _raise_if_interrupted(self, trial: Any) -> None:
        """Raise `TrainingInterrupted` when a signal stopped training before its last step."""
        callback = self.stop_on_signal
        if not callback.stopped or self.state.global_step >= self.state.max_steps:
            return
        step = self.state.global_step
        checkpoint = None
        if callback.saved_step == step:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{step}"
            )
        where = (
            f"the checkpoint {checkpoint} holds its state: resume with "
            "resume_from_checkpoint=True (--resume_from_checkpoint true)"
            if checkpoint
            else "no checkpoint was saved"
        )
        signal_name = callback.received or "a signal received by another process"
        raise TrainingInterrupted(
            f"training stopped by {signal_name} after step {step} of {self.state.max_steps}; "
            f"{where}",
            signal_name=signal_name,
            global_step=step,
            checkpoint=checkpoint,
        )

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's data loader, whose worker processes (if any) ignore SIGINT."""
        dataloader = super()._get_dataloader(*args, **kwargs)
        if self.args.dataloader_num_workers > 0:
            # accelerate's wrapper iterates its base loader, which starts the workers
            for loader in (dataloader, getattr(dataloader, "base_dataloader", None)):
                if loader is not None and not isinstance(
                    loader.worker_init_fn, WorkersIgnoreSigint
                ):
                    loader.worker_init_fn = WorkersIgnoreSigint(loader.worker_init_fn)
        return dataloader

    def _get_output_dir(self, trial: Any) -> str:
        """The run folder; while a checkpoint is being saved, its staging folder instead."""
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save the usual checkpoint plus the miner's state, and publish it only when complete.

        Everything (weights, optimizer, scheduler, RNG states, trainer state and
        ``bad_pair_miner.pt``) is written into ``.tmp-checkpoint-<step>/checkpoint-<step>``;
        when every process is done, the folder is renamed to ``checkpoint-<step>``, so that
        ``get_last_checkpoint`` never returns a partial checkpoint. Old checkpoints are then
        rotated as the Trainer does (``save_total_limit``).
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = staging_dir(run_dir, self.state.global_step)
        staged = root / name
        if self.args.should_save:
            shutil.rmtree(root, ignore_errors=True)
            staged.mkdir(parents=True)
            if self.miner is not None:
                torch.save(self._mining_state(), staged / MINING_STATE_NAME)
        self.accelerator.wait_for_everyone()
        self._staging_root = root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == root:
            self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staged, os.path.join(run_dir, name))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ objective
    def _split_inputs(
        self, inputs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], Tensor, dict[str, Tensor]]:
        """Model inputs, sample ids and attribute codes of a batch (the label is dropped)."""
        batch = dict(inputs)
        if "sample_id" not in batch:
            raise KeyError(
                f"batch has no 'sample_id' (keys: {sorted(batch)}); the collator must keep it"
            )
        sample_id = batch.pop("sample_id")
        batch.pop(LABEL_COLUMN, None)
        attributes = {name: batch.pop(name) for name in CATEGORICAL_ATTRIBUTES if name in batch}
        batch.pop("return_loss", None)
        missing = [a for a in self.args.fairness_attributes if a not in attributes]
        if missing:
            raise KeyError(
                f"batch has no column(s) {missing} needed by fairness_attributes "
                f"(keys: {sorted(inputs)})"
            )
        return batch, sample_id, attributes

    def _non_finite(self, name: str, detail: str, training: bool) -> NonFiniteLossError:
        phase = "training" if training else "evaluation"
        step = self.state.global_step + (1 if training else 0)
        return NonFiniteLossError(
            f"non-finite {name} ({detail}) in {phase} at global step {step} "
            f"({self.state.global_step} optimizer steps done); stopped before the backward pass "
            "and before any checkpoint"
        )

    def _guard(self, name: str, value: Tensor, training: bool) -> None:
        """Raise `NonFiniteLossError` naming ``name`` and the step if ``value`` is not finite."""
        if not self.args.nan_guard or bool(torch.isfinite(value).all()):
            return
        flat = value.detach().flatten()
        raise self._non_finite(name, str(flat[~torch.isfinite(flat)][0].item()), training)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _record(self, mode: str, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._metrics[mode][key].append(float(value))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """L = L_rob + lambda * R on this batch (see the module docstring).

        In training the (sample id, raw loss) pairs of the global batch feed the miner. In
        evaluation the loss is the same formula with unit weights (validation pairs are never
        mined) and nothing is observed. ``num_items_in_batch`` is unused: the loss is a
        per-batch mean and the Trainer divides it by the accumulation steps.
        """
        training = model.training
        mode = "train" if training else "eval"
        model_inputs, sample_id, attributes = self._split_inputs(inputs)
        outputs = model(**model_inputs, return_loss=False)
        image_embeds = outputs.image_embeds.float()
        text_embeds = outputs.text_embeds.float()
        logit_scale = unwrap_clip(self.accelerator.unwrap_model(model)).logit_scale.exp().float()

        losses = pairwise_clip_loss(image_embeds, text_embeds, logit_scale)
        global_ids = all_gather_no_grad(sample_id.long())
        global_losses = all_gather_no_grad(losses.detach())
        self._guard("loss_clip", global_losses, training)
        terms: dict[str, float] = {"loss_clip": global_losses.mean().item()}

        if training and self.miner is not None:
            weights = self.miner.weights(sample_id, losses.detach()).to(losses)
            global_weights = self.miner.weights(global_ids, global_losses).to(losses)
            flags = self.miner.flags(global_ids)
            terms["dbpm/flagged_noisy"] = float((flags == NOISY).sum())
            terms["dbpm/flagged_faulty"] = float((flags == FAULTY).sum())
            terms["dbpm/mean_weight"] = global_weights.mean().item()
        else:
            weights = torch.ones_like(losses)
            global_weights = torch.ones_like(global_losses)
        loss_rob = (weights * losses).mean()
        global_rob = global_weights * global_losses
        self._guard("loss_rob", global_rob, training)
        terms["loss_rob"] = global_rob.mean().item()

        loss = loss_rob
        if self.group_ot is not None:
            fair_reg = self._group_term(
                image_embeds, text_embeds, losses, attributes, terms, training
            )
            if self.args.fairness_lambda > 0:
                loss = loss + self.args.fairness_lambda * fair_reg
                self._guard("loss (loss_rob + fairness_lambda * fair_reg)", loss.detach(), training)

        if global_ids.numel() == 1:
            self._warn_once(
                "batch_of_one",
                "a global batch of one pair has no negatives: its contrastive loss is exactly 0, "
                "it gives no gradient, and bad-pair mining does not record it (set "
                "dataloader_drop_last=True to avoid a last batch of one)",
            )
        elif training and self.miner is not None:
            self.miner.observe(global_ids, global_losses)
        self._record(mode, terms)
        if return_outputs:
            return loss, {
                "image_embeds": image_embeds,
                "text_embeds": text_embeds,
                "logit_scale": logit_scale.detach(),
            }
        return loss

    def _group_term(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        losses: Tensor,
        attributes: Mapping[str, Tensor],
        terms: dict[str, float],
        training: bool,
    ) -> Tensor:
        """R over the global batch, differentiable when lambda > 0; fills ``terms`` with R, D_kg."""
        if self.args.fairness_target == "loss":
            values = losses
        else:
            values = pair_cosine(image_embeds, text_embeds)
        if self.args.fairness_lambda > 0:
            global_values = all_gather_with_grad(values)
        else:
            global_values = all_gather_no_grad(values)
        groups = {
            name: all_gather_no_grad(attributes[name].long())
            for name in self.args.fairness_attributes
        }
        self._guard(
            f"fairness values ({self.args.fairness_target})", global_values.detach(), training
        )
        try:
            fair_reg, divergences = self.group_ot(global_values, groups)
        except FloatingPointError as error:
            if not self.args.nan_guard:
                raise
            raise self._non_finite("fair_reg", str(error), training) from error
        self._guard("fair_reg", fair_reg.detach(), training)
        terms["fair_reg"] = fair_reg.item()
        for key, value in divergences.items():
            self._guard(f"fair_D/{key}", value, training)
            terms[f"fair_D/{key}"] = float(value)
        return fair_reg

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the objective's terms, averaged since the last logging step, to training logs."""
        if "loss" in logs or "train_loss" in logs:
            averaged = {
                key: sum(values) / len(values)
                for key, values in self._metrics["train"].items()
                if values
            }
            logs = {**logs, **averaged}
            self._metrics["train"].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The Trainer's loop; prompts are encoded once per call and the loss terms are added."""
        self._prompt_embeds = None
        self._metrics["eval"].clear()
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        for key, values in self._metrics["eval"].items():
            if values:
                output.metrics[f"{metric_key_prefix}_{key}"] = sum(values) / len(values)
        self._metrics["eval"].clear()
        self._prompt_embeds = None
        return output

    def _zero_shot_prompt_embeds(self, model: nn.Module) -> Tensor:
        if self._prompt_embeds is None:
            if self.processing_class is None:
                raise ValueError(
                    "processing_class: a processor (or tokenizer) is needed to encode the "
                    "zero-shot prompts"
                )
            prompts = [self.args.zero_shot_negative_prompt, self.args.zero_shot_positive_prompt]
            self._prompt_embeds = encode_prompts(
                self.accelerator.unwrap_model(model), self.processing_class, prompts
            )
        return self._prompt_embeds

    def _eval_labels(self, inputs: Mapping[str, Any]) -> Tensor:
        columns = [LABEL_COLUMN, *self.args.eval_attributes]
        missing = [c for c in columns if c not in inputs]
        if missing:
            raise KeyError(
                f"evaluation batch has no column(s) {missing} (keys: {sorted(inputs)}); "
                "labels are glaucoma then eval_attributes"
            )
        return torch.stack([torch.as_tensor(inputs[c]).long() for c in columns], dim=1)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(eval loss, zero-shot glaucoma scores [B], labels [B, 1 + K]) for one batch.

        Labels are glaucoma then the codes of ``eval_attributes`` in order, which is what
        ``FairnessMetrics`` expects; the Trainer gathers all three across processes.
        """
        inputs = self._prepare_inputs(inputs)
        labels = None if prediction_loss_only else self._eval_labels(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        with torch.no_grad():
            prompt_embeds = self._zero_shot_prompt_embeds(model)
            scores = zero_shot_scores(
                outputs["image_embeds"], prompt_embeds, outputs["logit_scale"]
            )
        return loss, scores.detach(), labels
