"""How well can the vision tower learn the glaucoma label from the images, told the true labels?

    python recipes/label_probe.py                                     # default model and data
    python recipes/label_probe.py --default_patch_size 8 --num_train_epochs 20
    python recipes/label_probe.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --data_dir /path/to/FairVLMed

A supervised upper reference for the contrastive runs: the model's vision tower (same
initialisation or pretrained weights) with a linear head (`CLIPForImageClassification`) trained
on the training split's true labels, which no note can corrupt. Bad-pair mining needs the model to
know from the image which notes contradict it (see `recipes/detection_ceiling.py` for the label
AUC that a given precision and recall needs); this shows how much the tower can learn in a given
budget. Reports AUC, ES-AUC and group AUCs on the validation split every epoch and on the test
split at the end, in `probe_results.json` and the Trainer's logs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPForImageClassification, EvalPrediction, Trainer, TrainingArguments

from fairvlm_hf.data import schema
from fairvlm_hf.data.arguments import DataArguments
from fairvlm_hf.evaluation import fairness_report, flatten_report
from fairvlm_hf.modeling import ModelArguments, load_model_and_processor, unwrap_clip
from fairvlm_hf.parser import FairVLMParser

logger = logging.getLogger("label_probe")

DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/label_probe",
    "num_train_epochs": 6,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "learning_rate": 5e-4,
    "weight_decay": 0.05,
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "remove_unused_columns": False,
    "report_to": [],
}


def build_probe(model: torch.nn.Module) -> CLIPForImageClassification:
    """A two-class head on a copy of ``model``'s vision tower (its weights, not shared)."""
    clip = unwrap_clip(model)
    config = clip.config.__class__.from_dict(clip.config.to_dict())
    config.num_labels = 2
    probe = CLIPForImageClassification(config)
    probe.vision_model.load_state_dict(clip.vision_model.state_dict())
    return probe


class ImageLabelTransform:
    """Rows -> ``pixel_values`` and ``labels`` (the true glaucoma label), with the attributes."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch["image"]]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out: dict[str, Any] = {"pixel_values": pixels, "labels": batch[schema.LABEL_COLUMN]}
        for attribute in schema.CATEGORICAL_ATTRIBUTES:
            out[attribute] = batch[attribute]
        return out


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]),
        "labels": torch.as_tensor([int(r["labels"]) for r in rows]),
    }


def group_metrics(attributes: dict[str, np.ndarray], names: Sequence[str]):
    """``compute_metrics`` for a split: AUC, ES-AUC and group AUCs of P(glaucoma)."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = torch.as_tensor(prediction.predictions)
        scores = torch.softmax(logits.float(), dim=-1)[:, 1].numpy()
        report = fairness_report(scores, prediction.label_ids, {a: attributes[a] for a in names})
        return flatten_report(report)

    return compute


def main(argv: list[str] | None = None) -> int:
    parser = FairVLMParser((ModelArguments, DataArguments, TrainingArguments), description=__doc__)
    parser.set_defaults(**DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_and_config(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    if model_args.use_lora:
        raise ValueError("--use_lora: the label probe trains the whole vision tower; unset it")

    splits = data_args.load()
    for name in ("train", "validation", "test"):
        if name not in splits:
            raise ValueError(f"--data_dir: the label probe needs a {name!r} split")
    model, processor = load_model_and_processor(model_args, splits["train"]["text"])
    probe = build_probe(model)
    transform = ImageLabelTransform(processor.image_processor)
    names = list(schema.PROTECTED_ATTRIBUTES)
    data = {name: splits[name].with_transform(transform) for name in splits}
    attributes = {
        name: {a: np.asarray(splits[name][a]) for a in names} for name in ("validation", "test")
    }
    trainer = Trainer(
        model=probe,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collate,
        compute_metrics=group_metrics(attributes["validation"], names),
    )
    trainer.train()
    history = [
        {"epoch": row["epoch"], "auc": row["eval_auc"], "mean_es_auc": row.get("eval_mean_es_auc")}
        for row in trainer.state.log_history
        if "eval_auc" in row
    ]
    trainer.compute_metrics = group_metrics(attributes["test"], names)
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"validation_by_epoch": history, "test": test}
    (out / "probe_results.json").write_text(json.dumps(result, indent=2) + "\n")
    logger.info(
        "test AUC %.3f, mean ES-AUC %.3f (results in %s)",
        test["test_auc"],
        test.get("test_mean_es_auc", float("nan")),
        out / "probe_results.json",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
