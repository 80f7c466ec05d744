"""recipes/label_probe.py: the vision tower trained on the true labels, as a reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _scripts import load_recipe
from sklearn.metrics import roc_auc_score
from transformers import EvalPrediction

from fairvlm_hf.modeling import build_default_model

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def probe_script():
    return load_recipe("label_probe")


def test_probe_copies_the_vision_tower_and_pools_its_patches(probe_script, tiny_fairvlmed_dataset):
    model, _ = build_default_model(tiny_fairvlmed_dataset["train"]["text"], vocab_size=600, **TINY)
    probe = probe_script.build_probe(model).eval()
    for name, value in model.vision_model.state_dict().items():
        assert torch.equal(probe.vision_model.state_dict()[name], value)
    assert probe.vision_model.embeddings.patch_embedding.weight.data_ptr() != (
        model.vision_model.embeddings.patch_embedding.weight.data_ptr()
    )
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        expected = probe.classifier(hidden[:, 1:].mean(dim=1))
        assert torch.allclose(probe(pixel_values=pixels).logits, expected, atol=1e-6)


def test_group_metrics_score_the_glaucoma_probability(probe_script):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + labels[:, None] * np.array([0.0, 1.0])
    race = rng.integers(0, 3, 200)
    compute = probe_script.group_metrics({"race": race}, ["race"])
    metrics = compute(EvalPrediction(predictions=logits, label_ids=labels))
    scores = torch.softmax(torch.as_tensor(logits), dim=-1)[:, 1].numpy()
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for code, name in ((0, "Asian"), (1, "Black"), (2, "White")):
        group = race == code
        assert metrics[f"group_auc_race_{name}"] == pytest.approx(
            roc_auc_score(labels[group], scores[group]), abs=1e-12
        )


def test_main_trains_and_writes_validation_and_test_results(probe_script, tiny_fairvlmed, tmp_path):
    out = tmp_path / "probe"
    flags = [f"--default_{key} {value}" for key, value in TINY.items()]
    argv = [
        "--data_dir", str(tiny_fairvlmed), "--cache_dir", str(tmp_path / "cache"),
        "--model_cache_dir", str(tmp_path / "models"), "--default_vocab_size", "600",
        *" ".join(flags).split(), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--output_dir", str(out),
    ]  # fmt: skip
    assert probe_script.main(argv) == 0
    result = json.loads((out / "probe_results.json").read_text())
    assert [round(row["epoch"]) for row in result["validation_by_epoch"]] == [1, 2]
    assert 0.0 <= result["test"]["test_auc"] <= 1.0
    assert "test_es_auc_race" in result["test"]
    with pytest.raises(ValueError, match="--use_lora"):
        probe_script.main([*argv, "--use_lora"])
