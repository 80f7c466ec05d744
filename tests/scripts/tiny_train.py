"""Train a tiny CLIP with `FairRobustTrainer` on in-memory data and write what the tests compare.

One process::

    python tests/scripts/tiny_train.py --output_dir OUT --per_device_batch 8

Two CPU processes (the same global batch when ``--per_device_batch`` is halved)::

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/tiny_train.py \
        --output_dir OUT --per_device_batch 4 --use_cpu

Writes, from the main process, ``OUT/result.json`` (the objective's terms per step, the flag table,
the evaluation metrics and the world size) and ``OUT/final_weights.safetensors``. The helpers
(``tiny_clip``, ``tiny_dataset``, ``TinyCollator``, ``TinyTokenizer``) are shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.trainer import FairRobustTrainer

IMAGE_SIZE = 16
PATCH_SIZE = 8
HIDDEN = 32
LAYERS = 2
VOCAB = 64
SEQ_LEN = 8
PAD_ID, BOS_ID, EOS_ID = 0, 1, VOCAB - 1
N_CLASSES = 8
FIRST_ID = 100
ATTRIBUTE_COLUMNS = ("race", "gender", "ethnicity", "language", "maritalstatus")
#: Words of the tiny tokenizer's fixed vocabulary (any other word maps to token 2).
PROMPT_WORDS = ("a", "photo", "of", "glaucoma", "non-glaucoma")


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A randomly initialised CLIP: width 32, 2 layers per tower, 16-pixel images, vocab 64."""
    tower = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "projection_dim": HIDDEN,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": VOCAB,
            "max_position_embeddings": SEQ_LEN,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        projection_dim=HIDDEN,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model


def tiny_dataset(
    n: int = 48, seed: int = 0, bad_ids: Sequence[int] = (3, 10, 17, 29, 38)
) -> tuple[datasets.Dataset, pd.DataFrame]:
    """Image-text pairs of 8 classes (image pattern and token pattern per class), some mismatched.

    Sample ``i`` has class ``i % 8``; for the indices in ``bad_ids`` the text comes from another
    class, so that those pairs keep a high loss. Returns the dataset (torch format) and the
    ground-truth table (sample_id, kind) of the mismatched pairs.
    """
    rng = np.random.default_rng(seed)
    image_protos = rng.normal(size=(N_CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    text_protos = rng.integers(3, EOS_ID, size=(N_CLASSES, SEQ_LEN - 2))
    classes = np.arange(n) % N_CLASSES
    text_classes = classes.copy()
    bad = np.asarray(sorted(bad_ids), dtype=np.int64)
    text_classes[bad] = (classes[bad] + 3) % N_CLASSES
    pixel_values = image_protos[classes] + 0.3 * rng.normal(size=(n, 3, IMAGE_SIZE, IMAGE_SIZE))
    tokens = text_protos[text_classes].copy()
    tokens[np.arange(n), rng.integers(0, SEQ_LEN - 2, size=n)] = rng.integers(3, EOS_ID, size=n)
    input_ids = np.concatenate(
        [np.full((n, 1), BOS_ID), tokens, np.full((n, 1), EOS_ID)], axis=1
    ).astype(np.int64)
    columns: dict[str, Any] = {
        "sample_id": (FIRST_ID + np.arange(n)).tolist(),
        "pixel_values": pixel_values.astype(np.float32).tolist(),
        "input_ids": input_ids.tolist(),
        "attention_mask": np.ones_like(input_ids).tolist(),
        "glaucoma": (classes % 2).tolist(),
        "race": (np.arange(n) % 3).tolist(),
        "gender": ((np.arange(n) // 3) % 2).tolist(),
        "ethnicity": np.where(np.arange(n) % 7 == 0, -1, (np.arange(n) // 5) % 2).tolist(),
        "language": np.where(np.arange(n) % 5 == 0, -1, np.arange(n) % 2).tolist(),
        "maritalstatus": (np.arange(n) % 4).tolist(),
    }
    dataset = datasets.Dataset.from_dict(columns).with_format("torch")
    truth = pd.DataFrame({"sample_id": (FIRST_ID + bad).tolist(), "kind": "contradicting"})
    return dataset, truth


class TinyCollator:
    """Stacks the pre-made tensors of ``tiny_dataset`` rows into a batch."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            key: torch.stack([torch.as_tensor(f[key]) for f in features])
            for key in ("pixel_values", "input_ids", "attention_mask")
        }
        for key in ("sample_id", "glaucoma", *ATTRIBUTE_COLUMNS):
            batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        batch["pixel_values"] = batch["pixel_values"].float()
        batch["return_loss"] = True
        return batch


class TinyTokenizer:
    """Word-level stand-in for a CLIP processor: encodes the zero-shot prompts."""

    def __call__(
        self,
        text: Sequence[str],
        padding: bool = True,
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        rows = []
        for sentence in text:
            words = sentence.lower().split()[: SEQ_LEN - 2]
            ids = [3 + PROMPT_WORDS.index(w) if w in PROMPT_WORDS else 2 for w in words]
            rows.append([BOS_ID, *ids, EOS_ID])
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tiny_tokenizer.json").write_text(json.dumps({"words": PROMPT_WORDS}))


def tiny_config(output_dir: str | Path, **overrides: Any) -> FairRobustConfig:
    """Training arguments for the tiny runs: 3 epochs, DBPM warm-up 1, no evaluation, CPU."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 3,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "dbpm_warmup_epochs": 1,
        "fairness_lambda": 0.1,
        "fairness_blur": 0.05,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return FairRobustConfig(**values)


def step_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training log rows (those with the objective's terms)."""
    return [row for row in log_history if "loss_clip" in row and "loss" in row]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n_samples", type=int, default=48)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--fairness_ot", default="sinkhorn", choices=["sinkhorn", "exact_1d"])
    parser.add_argument("--use_cpu", action="store_true")
    args = parser.parse_args(argv)

    train, truth = tiny_dataset(n=args.n_samples)
    evaluation, _ = tiny_dataset(n=16, seed=1, bad_ids=())
    config = tiny_config(
        args.output_dir,
        per_device_train_batch_size=args.per_device_batch,
        per_device_eval_batch_size=args.per_device_batch,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        fairness_ot=args.fairness_ot,
        dbpm_threshold="sigma",
        dbpm_beta_noisy=1.0,
        dbpm_beta_faulty=1.0,
        use_cpu=args.use_cpu,
        eval_attributes=["race", "gender"],
    )
    trainer = FairRobustTrainer(
        model=tiny_clip(),
        args=config,
        data_collator=TinyCollator(),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=TinyTokenizer(),
        ground_truth=truth,
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        flags = pd.read_csv(out / "bad_pairs.csv")
        result = {
            "world_size": trainer.args.world_size,
            "steps": step_rows(trainer.state.log_history),
            "flags": flags.to_dict(orient="records"),
            "eval": metrics,
            "report": trainer.bad_pair_detection(),
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
        weights = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(weights, str(out / "final_weights.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
