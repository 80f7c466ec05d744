"""The main job end to end: `recipes/train.py` on a tiny synthetic set, with one and two processes.

The released folder must load with plain transformers in a fresh process (no fairvlm_hf, no
peft), work in the zero-shot pipeline, and carry a card whose model-index parses back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _scripts import load_recipe

from fairvlm_hf.data.fairvlmed import read_ground_truth

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "train.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

TINY = [
    "--synthetic_num_train", "96",
    "--synthetic_num_val", "48",
    "--synthetic_num_test", "64",
    "--synthetic_image_size", "32",
    "--default_image_size", "32",
    "--default_patch_size", "8",
    "--default_hidden_size", "32",
    "--default_num_layers", "1",
    "--default_num_heads", "2",
    "--default_vocab_size", "600",
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32",
    "--warmup_steps", "0",
    "--logging_steps", "2",
    "--dbpm_warmup_epochs", "1",
]  # fmt: skip

RELEASE_FILES = {
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "README.md",
    "eval_results.json",
    "predictions.csv",
    "bad_pairs.csv",
    "bad_pair_detection.json",
    "fairness_report.png",
    "score_distributions.png",
    "training_curves.png",
    "run_summary.json",
}


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "FAIRVLM_HF_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _run(command: list[str], cache: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe_cache")


@pytest.fixture(scope="module")
def one_process_run(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run1") / "out"
    _run([sys.executable, str(TRAIN), *TINY, "--output_dir", str(out)], cache)
    return out


@pytest.mark.slow
def test_one_process_run_writes_the_release(one_process_run):
    names = {p.name for p in one_process_run.iterdir()}
    assert names >= RELEASE_FILES, sorted(RELEASE_FILES - names)
    assert (one_process_run / "tokenizer.json").exists() or (
        one_process_run / "vocab.json"
    ).exists()
    results = json.loads((one_process_run / "eval_results.json").read_text())
    predictions = pd.read_csv(one_process_run / "predictions.csv")
    assert len(predictions) == results["num_samples"] == 64
    assert set(results["attributes"]) == {"race", "gender", "ethnicity", "language"}
    summary = json.loads((one_process_run / "run_summary.json").read_text())
    assert summary["best_checkpoint"].startswith("checkpoint-")
    assert summary["test"]["auc"] == pytest.approx(results["auc"])


@pytest.mark.slow
def test_release_loads_with_plain_transformers_in_a_fresh_process(one_process_run):
    script = f"""
import sys, json
sys.modules["peft"] = None
sys.modules["fairvlm_hf"] = None
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline, CLIPModel
from huggingface_hub import ModelCard
folder = {str(one_process_run)!r}
model = AutoModel.from_pretrained(folder)
assert isinstance(model, CLIPModel), type(model)
processor = AutoProcessor.from_pretrained(folder)
classify = pipeline("zero-shot-image-classification", model=folder)
image = Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype("uint8")).convert("RGB")
out = classify(image, candidate_labels=["glaucoma", "non-glaucoma"])
assert abs(sum(o["score"] for o in out) - 1) < 1e-5
card = ModelCard.load(folder + "/README.md")
results = {{(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}}
print(json.dumps([[k[0], k[1], v] for k, v in results.items()]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    card_values = json.loads(result.stdout.strip().splitlines()[-1])
    expected = json.loads((one_process_run / "eval_results.json").read_text())
    aucs = [v for kind, _name, v in card_values if kind == "roc_auc"]
    assert pytest.approx(expected["auc"], abs=1e-4) in aucs
    es_aucs = sorted(v for kind, _name, v in card_values if kind == "es_auc")
    expected_es = sorted(
        block["es_auc"] for block in expected["attributes"].values() if "es_auc" in block
    )
    assert es_aucs == pytest.approx(expected_es, abs=1e-4)


@pytest.mark.slow
def test_card_has_no_local_paths(one_process_run):
    card = (one_process_run / "README.md").read_text()
    assert str(one_process_run) not in card
    assert str(Path.home()) not in card


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_and_release(one_process_run, cache, tmp_path):
    out = tmp_path / "out2"
    launch = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
    ]  # fmt: skip
    _run([*launch, str(TRAIN), "--use_cpu", *TINY, "--output_dir", str(out)], cache)
    names = {p.name for p in out.iterdir()}
    assert names >= RELEASE_FILES, sorted(RELEASE_FILES - names)
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    # 96 pairs, 2 epochs, 2 x 16 per step: 3 optimizer steps per epoch over the global batch.
    assert state["global_step"] == 6


def test_rescoring_a_checkpoint_reproduces_the_next_epoch_flags(one_process_run, cache):
    """The detection recipe's --rescore applies a rule exactly as training's next epoch did."""
    detection = load_recipe("bad_pair_detection")
    first = min(one_process_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    record = json.loads((one_process_run / "bad_pair_detection.json").read_text())
    data_dir = next(p for p in (cache / "synthetic").iterdir() if p.is_dir())
    rows = detection.rescore(first, read_ground_truth(data_dir), ["mixture", "mad"])
    logged = next(e for e in record["epochs"] if e["epoch"] == rows["mixture"]["epoch"])
    assert record["settings"]["threshold"] == "mixture" and logged["active"]
    assert rows["mixture"]["n_faulty"] == logged["n_faulty"]
    assert rows["mixture"]["n_noisy"] == logged["n_noisy"]
    for target, auc in logged["statistic_auc"].items():
        assert rows["mixture"][f"statistic_auc_{target}"] == pytest.approx(auc, abs=1e-12)
    assert rows["mad"]["statistic_auc_all"] == rows["mixture"]["statistic_auc_all"]


def test_best_threshold_is_the_best_of_every_cut():
    detection = load_recipe("bad_pair_detection")
    truth = pd.DataFrame(
        {
            "filename": [f"data_{i:05d}.npz" for i in (2, 5, 6, 8)],
            "sample_id": [2, 5, 6, 8],
            "kind": ["contradicting", "swap_contradicting", "swap_same_label", "contradicting"],
        }
    )
    ids = list(range(1, 11))
    m = [0.1, 0.9, 0.2, 0.3, 0.8, 0.85, 0.4, 0.35, 0.5, 0.6]
    targets = {2, 5, 8}
    best = (0.0, None, None)
    for cut in sorted(set(m)):  # flag every pair with m >= cut
        flagged = {i for i, v in zip(ids, m, strict=True) if v >= cut}
        precision = len(flagged & targets) / len(flagged)
        recall = len(flagged & targets) / len(targets)
        best = max(best, (min(precision, recall), precision, recall))
    got = detection.best_threshold(ids, m, truth)
    assert (got["best_threshold_precision"], got["best_threshold_recall"]) == pytest.approx(
        best[1:]
    )
