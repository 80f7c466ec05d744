"""The end-to-end job behind ``recipes/train.py``: data -> model -> train -> release -> report.

Kept in the library (not in the recipe) so that the recipe, the ablation and the tests run the
same code. Every file a user looks at afterwards is written here, into ``output_dir``:
the released model and processor, ``eval_results.json``, ``predictions.csv``, ``bad_pairs.csv``,
the plots and the model card.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.arguments import DataArguments
from fairvlm_hf.data.collate import with_processor_transform
from fairvlm_hf.modeling import ModelArguments, load_model_and_processor, save_model_for_release

logger = logging.getLogger(__name__)

#: Training-config keys worth showing in the card (the objective and the schedule).
CARD_CONFIG_KEYS: tuple[str, ...] = (
    "dbpm",
    "dbpm_warmup_epochs",
    "dbpm_threshold",
    "dbpm_beta_noisy",
    "dbpm_beta_faulty",
    "dbpm_weighting",
    "dbpm_statistic",
    "fairness_attributes",
    "fairness_lambda",
    "fairness_blur",
    "fairness_target",
    "fairness_min_group_size",
    "fairness_ot",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "metric_for_best_model",
)


@dataclass
class RecipeArguments:
    """Options of the recipe itself (what happens around training)."""

    test_fairclip_protocol: bool = field(
        default=False,
        metadata={
            "help": "Evaluate the test split with FairCLIP's protocol too (drop every sample "
            "with an unknown protected attribute), for comparison with published numbers."
        },
    )
    release_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where to write the released model, card and reports. Unset: output_dir "
            "(checkpoints stay in its checkpoint-* subfolders)."
        },
    )


def _base_model(model_args: ModelArguments) -> str | None:
    """The Hub id the model was fine-tuned from (None for the default or a local folder)."""
    base = model_args.model_name_or_path
    return None if base is None or Path(base).exists() else base


@dataclass
class Job:
    """What :func:`build_trainer` assembles: the raw splits, the processor and the trainer."""

    splits: Any
    processor: Any
    trainer: Any


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, config: FairRobustConfig
) -> Job:
    """Load the data and the model and wire them into a `FairRobustTrainer`."""
    from fairvlm_hf.trainer import FairRobustTrainer

    # The main process generates, decodes and caches first; the others then read its caches.
    with config.main_process_first(desc="data and model preparation"):
        splits = data_args.load()
        model, processor = load_model_and_processor(model_args, texts=splits["train"]["text"])
    trainer = FairRobustTrainer(
        model=model,
        args=config,
        train_dataset=with_processor_transform(splits["train"], processor),
        eval_dataset=with_processor_transform(splits["validation"], processor),
        processing_class=processor,
        ground_truth=data_args.ground_truth(),
    )
    return Job(splits=splits, processor=processor, trainer=trainer)


def run_recipe(
    model_args: ModelArguments,
    data_args: DataArguments,
    config: FairRobustConfig,
    recipe_args: RecipeArguments | None = None,
) -> dict[str, Any]:
    """Train with ``config`` and write the released model and every report; return a summary.

    Under several processes every rank trains; only the main process writes the release.
    """
    from fairvlm_hf.card import write_model_card
    from fairvlm_hf.evaluation import EvaluationArguments, evaluate_zero_shot, flatten_report
    from fairvlm_hf.reporting import format_summary_table, plot_training_curves

    recipe_args = recipe_args or RecipeArguments()
    started = time.perf_counter()
    push_to_hub, config.push_to_hub = config.push_to_hub, False

    job = build_trainer(model_args, data_args, config)
    splits, processor, trainer = job.splits, job.processor, job.trainer
    train_result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    summary: dict[str, Any] = {"train": train_result.metrics}
    if not trainer.is_world_process_zero():
        return summary

    out = Path(recipe_args.release_dir or config.output_dir)
    save_model_for_release(trainer.model, processor, out, merge_lora=model_args.merge_lora_on_save)
    eval_args = EvaluationArguments(
        negative_prompt=config.zero_shot_negative_prompt,
        positive_prompt=config.zero_shot_positive_prompt,
        attributes=list(config.eval_attributes),
        batch_size=config.per_device_eval_batch_size,
        split="test",
    )
    report = evaluate_zero_shot(trainer.model, processor, splits, eval_args, output_dir=out)
    summary["test"] = flatten_report(report)
    if recipe_args.test_fairclip_protocol:
        protocol_args = EvaluationArguments(**{**asdict(eval_args), "fairclip_protocol": True})
        protocol_dir = out / "fairclip_protocol"
        protocol_report = evaluate_zero_shot(
            trainer.model, processor, splits, protocol_args, output_dir=protocol_dir
        )
        summary["test_fairclip_protocol"] = flatten_report(protocol_report)
    plots = [p for p in ("fairness_report.png", "score_distributions.png") if (out / p).exists()]
    if trainer.state.log_history:
        plot_training_curves(trainer.state.log_history, out / "training_curves.png")
        plots.append("training_curves.png")
    bad_pairs = trainer.bad_pair_report() if config.dbpm else None
    write_model_card(
        out,
        model_name=config.hub_model_id or out.resolve().name,
        repo_id=config.hub_model_id,
        base_model=_base_model(model_args),
        dataset_name="Harvard-FairVLMed" if data_args.data_dir else "synthetic FairVLMed",
        eval_results=report,
        training_config={k: getattr(config, k) for k in CARD_CONFIG_KEYS},
        bad_pair_summary=bad_pairs,
        plots=plots,
        synthetic=data_args.data_dir is None,
        adapter=model_args.use_lora and not model_args.merge_lora_on_save,
    )
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["best_checkpoint"] = (
        Path(trainer.state.best_model_checkpoint).name
        if trainer.state.best_model_checkpoint
        else None
    )
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.info("results of the test split:\n%s", format_summary_table(report))
    if push_to_hub:
        from fairvlm_hf.hub import push_model_folder

        repo_id = config.hub_model_id or out.name
        pushed = push_model_folder(
            out, repo_id, token=config.hub_token, private=bool(config.hub_private_repo)
        )
        summary["pushed"] = {"repo_id": repo_id, "files": pushed}
    summary["report"] = report
    summary["output_dir"] = str(out)
    return summary
