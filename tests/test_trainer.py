"""FairRobustTrainer on a tiny CLIP: the objective's value, logging, mining reports, gradient
accumulation, LoRA, bf16, the NaN guard and zero-shot evaluation, each against an independent
computation (CLIPModel's own loss, exact 1-D transport in numpy, scikit-learn, hand-worked sets).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _scripts import load_script
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from fairvlm_hf.callbacks import detection_scores
from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.trainer import (
    DETECTION_REPORT_NAME,
    FLAG_TABLE_NAME,
    FairRobustTrainer,
    NonFiniteLossError,
)

tt = load_script("tiny_train")


@pytest.fixture(scope="module")
def data():
    return tt.tiny_dataset(n=48)


def _trainer(tmp_path, dataset, model=None, eval_dataset=None, ground_truth=None, **overrides):
    defaults = {"fairness_ot": "exact_1d", "log_level": "error"}
    config = tt.tiny_config(tmp_path / "run", **{**defaults, **overrides})
    return FairRobustTrainer(
        model=model if model is not None else tt.tiny_clip(),
        args=config,
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tt.TinyTokenizer(),
        ground_truth=ground_truth,
    )


def _batch(dataset, rows):
    return tt.TinyCollator()([dataset[i] for i in rows])


def _exact_w2_half(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 1-D OT cost with cost |a - b|^2 / 2 between uniform empirical measures.

    Each sorted sample of ``x`` is repeated ``len(y)`` times and each of ``y`` ``len(x)`` times:
    the monotone coupling of the two equal-size expansions is the optimal plan.
    """
    xs = np.repeat(np.sort(x), len(y))
    ys = np.repeat(np.sort(y), len(x))
    return float(np.mean((xs - ys) ** 2) / 2)


def _group_term(values: np.ndarray, batch, attributes, min_size=2) -> float:
    total = 0.0
    for name in attributes:
        codes = batch[name].numpy()
        for code in np.unique(codes):
            members = codes == code
            if code == -1 or members.sum() < min_size:
                continue
            total += _exact_w2_half(values[members], values)
    return total


def _clip_reference(model, batch):
    """CLIPModel's own loss, the per-pair losses from its logits, and the pair cosines."""
    with torch.no_grad():
        out = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            return_loss=True,
        )
    logits = out.logits_per_image
    target = torch.arange(logits.shape[0])
    per_pair = (
        F.cross_entropy(logits, target, reduction="none")
        + F.cross_entropy(logits.T, target, reduction="none")
    ) / 2
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    return out.loss.item(), per_pair.numpy(), cosine.numpy()


# ---------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("target", ["loss", "similarity"])
def test_loss_is_clip_loss_plus_lambda_times_group_term(tmp_path, data, target):
    dataset, _ = data
    attributes = ["race", "gender", "language"]
    trainer = _trainer(
        tmp_path,
        dataset,
        dbpm=False,
        fairness_lambda=0.3,
        fairness_attributes=attributes,
        fairness_target=target,
    )
    batch = _batch(dataset, range(12))
    clip_loss, per_pair, cosine = _clip_reference(trainer.model, batch)
    values = per_pair if target == "loss" else cosine
    expected_r = _group_term(values, batch, attributes)

    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(clip_loss + 0.3 * expected_r, rel=1e-5)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["loss_clip"] == pytest.approx(clip_loss, rel=1e-5)
    assert logged["loss_rob"] == pytest.approx(clip_loss, rel=1e-5)
    assert logged["fair_reg"] == pytest.approx(expected_r, rel=1e-4)
    d_terms = {k: v for k, v in logged.items() if k.startswith("fair_D/")}
    assert sum(d_terms.values()) == pytest.approx(expected_r, rel=1e-4)
    race2 = batch["race"].numpy() == 2
    assert d_terms["fair_D/race=2"] == pytest.approx(
        _exact_w2_half(values[race2], values), rel=1e-4
    )
    assert "fair_D/language=-1" not in d_terms


def test_sinkhorn_group_term_is_close_to_exact_transport(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(
        tmp_path,
        dataset,
        dbpm=False,
        fairness_lambda=1.0,
        fairness_attributes=["race"],
        fairness_ot="sinkhorn",
        fairness_blur=0.01,
    )
    batch = _batch(dataset, range(12))
    clip_loss, per_pair, _ = _clip_reference(trainer.model, batch)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    exact = _group_term(per_pair, batch, ["race"])
    assert loss - clip_loss == pytest.approx(exact, rel=0.05, abs=1e-3)


def test_flagged_pairs_are_down_weighted(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(
        tmp_path,
        dataset,
        fairness_lambda=0.0,
        dbpm_threshold="sigma",
        dbpm_beta_faulty=2.0,
        dbpm_weighting="gaussian_kernel",
    )
    ids = torch.tensor(dataset["sample_id"])
    history = torch.full((len(ids),), 2.0)
    history[:24] = 1.8
    history[[3, 7]] = 6.0
    trainer.miner.observe(ids, history)
    trainer.begin_mining_epoch(1)
    m = history.double().numpy()
    mu, sigma = m.mean(), m.std()
    flagged = m >= mu + 2.0 * sigma
    assert flagged.sum() == 2

    batch = _batch(dataset, range(8))
    _, per_pair, _ = _clip_reference(trainer.model, batch)
    weights = np.where(flagged[:8], np.exp(-((per_pair - mu) ** 2) / (2 * sigma**2)), 1.0)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(float(np.mean(weights * per_pair)), rel=1e-5)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["dbpm/flagged_faulty"] == 2
    assert logged["dbpm/flagged_noisy"] == 0
    assert logged["dbpm/mean_weight"] == pytest.approx(weights.mean(), rel=1e-5)
    assert logged["loss_clip"] == pytest.approx(per_pair.mean(), rel=1e-5)


# ---------------------------------------------------------------------------- a full small run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dataset, truth = tt.tiny_dataset(n=32, bad_ids=(3, 10, 17, 29))
    out = tmp_path_factory.mktemp("trained")
    trainer = _trainer(
        out,
        dataset,
        ground_truth=truth,
        dbpm_threshold="sigma",
        dbpm_beta_faulty=1.0,
        dbpm_beta_noisy=1.0,
        fairness_lambda=0.1,
    )
    trainer.train()
    return trainer, truth


def test_every_step_logs_the_terms_of_the_objective(trained):
    trainer, _ = trained
    rows = [r for r in trainer.state.log_history if "loss_clip" in r]
    assert len(rows) == trainer.state.global_step == 12
    for row in rows:
        for key in ("loss", "loss_rob", "fair_reg", "dbpm/flagged_faulty", "dbpm/mean_weight"):
            assert key in row
        assert row["loss"] == pytest.approx(row["loss_rob"] + 0.1 * row["fair_reg"], rel=1e-5)
        d_sum = sum(v for k, v in row.items() if k.startswith("fair_D/"))
        assert d_sum == pytest.approx(row["fair_reg"], rel=1e-5)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    warmup = [r for r in rows if r["epoch"] <= 1.0]
    assert all(r["loss_rob"] == pytest.approx(r["loss_clip"]) for r in warmup)
    assert all(r["dbpm/mean_weight"] == 1.0 for r in warmup)
    epoch_rows = [r for r in trainer.state.log_history if "dbpm/epoch_n_seen" in r]
    assert [r["dbpm/epoch_n_seen"] for r in epoch_rows] == [0, 32, 32]


def test_flag_table_and_detection_report(trained):
    trainer, truth = trained
    out = Path(trainer.args.output_dir)
    table = pd.read_csv(out / FLAG_TABLE_NAME)
    assert list(table.columns[:4]) == ["sample_id", "kind", "statistic", "first_epoch_flagged"]
    assert len(table) > 0
    assert set(table["kind"]) <= {"noisy", "faulty"}
    assert set(table["first_epoch_flagged"]) <= {1, 2}

    report = json.loads((out / DETECTION_REPORT_NAME).read_text())
    assert report == json.loads(json.dumps(trainer.bad_pair_detection()))
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    now = table[table["flagged_now"]]
    assert report["flag_counts"]["faulty"] == int((now["kind"] == "faulty").sum())
    assert report["flag_counts"]["noisy"] == int((now["kind"] == "noisy").sum())

    ids = np.asarray(trainer.train_dataset["sample_id"])
    predicted = np.isin(ids, now.loc[now["kind"] == "faulty", "sample_id"])
    actual = np.isin(ids, truth["sample_id"])
    detection = report["detection"]["all"]
    assert detection["recall"] == pytest.approx(recall_score(actual, predicted))
    if predicted.any():
        assert detection["precision"] == pytest.approx(precision_score(actual, predicted))
    else:
        assert detection["precision"] is None

    card = trainer.bad_pair_report()
    assert card["counts"] == report["flag_counts"]
    assert card["recall"]["all"] == detection["recall"]
    assert card["dbpm_threshold"] == "sigma"
    per_epoch = [f"{e['epoch']}: {e['n_noisy']}/{e['n_faulty']}" for e in report["epochs"]]
    assert card["flagged per epoch (noisy/faulty)"] == ", ".join(per_epoch)


def test_detection_scores_hand_worked():
    truth = pd.DataFrame(
        {
            "sample_id": [1, 2, 4, 5],
            "kind": ["swap_contradicting", "contradicting", "swap_same_label", "contradicting"],
        }
    )
    scores = detection_scores([1, 2, 3, 9], truth)
    assert scores["n_flagged"] == 4
    assert scores["all"] == {"n_true": 4, "n_hit": 2, "precision": 0.5, "recall": 0.5}
    assert scores["all_contradicting"]["recall"] == pytest.approx(2 / 3)
    assert scores["contradicting"] == {"n_true": 2, "n_hit": 1, "precision": 0.25, "recall": 0.5}
    assert scores["swap_same_label"]["recall"] == 0.0
    empty = detection_scores([], truth)
    assert empty["all"]["precision"] is None and empty["all"]["recall"] == 0.0
    with pytest.raises(KeyError, match="kind"):
        detection_scores([1], truth.rename(columns={"kind": "type"}))


# ---------------------------------------------------------------------------- optimisation
def _sgd_overrides(batch_size, accumulation):
    return {
        "dbpm": False,
        "fairness_lambda": 0.0,
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "max_steps": 1,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_sampling_strategy": "sequential",
    }


@pytest.mark.parametrize(("batch_size", "accumulation"), [(4, 2), (8, 1)])
def test_one_sgd_step_matches_the_mean_of_clip_losses(tmp_path, data, batch_size, accumulation):
    """An optimizer step over accumulated micro-batches descends the mean of their CLIP losses."""
    dataset, _ = data
    model = tt.tiny_clip(seed=3)
    reference = copy.deepcopy(model)
    trainer = _trainer(tmp_path, dataset, model=model, **_sgd_overrides(batch_size, accumulation))
    trainer.train()

    losses = []
    for k in range(accumulation):
        batch = _batch(dataset, range(k * batch_size, (k + 1) * batch_size))
        losses.append(
            reference(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                return_loss=True,
            ).loss
        )
    torch.stack(losses).mean().backward()
    trained = dict(trainer.model.named_parameters())
    for name, before in reference.named_parameters():
        expected = before.detach() - 0.5 * before.grad if before.grad is not None else before
        torch.testing.assert_close(trained[name].detach(), expected.detach(), atol=1e-6, rtol=1e-5)


def test_lora_step_trains_adapters_only(tmp_path, data):
    from fairvlm_hf.modeling import ModelArguments, apply_lora

    dataset, _ = data
    model = apply_lora(tt.tiny_clip(), ModelArguments(use_lora=True, lora_r=4, lora_alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, dataset, model=model, max_steps=2, learning_rate=1e-2)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("lora_B" in n for n in changed)
    assert all(after[n].requires_grad for n in changed)
    assert not any("logit_scale" in n for n in changed)
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and not set(frozen) & changed
    rows = [r for r in trainer.state.log_history if "loss_clip" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_bf16_autocast_step(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(tmp_path, dataset, bf16=True, max_steps=1, fairness_ot="sinkhorn")
    dtypes = []
    hook = trainer.model.visual_projection.register_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype)
    )
    trainer.train()
    hook.remove()
    assert torch.bfloat16 in dtypes
    row = next(r for r in trainer.state.log_history if "loss_clip" in r)
    assert math.isfinite(row["loss"]) and math.isfinite(row["fair_reg"])


# ---------------------------------------------------------------------------- NaN guard
def test_nan_guard_stops_before_the_bad_step_is_saved(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(
        tmp_path, dataset, max_steps=5, save_strategy="steps", save_steps=1, save_only_model=True
    )
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    trainer.model.visual_projection.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"loss_clip .*global step 3") as info:
        trainer.train()
    assert "training" in str(info.value)
    out = Path(trainer.args.output_dir)
    assert (out / "checkpoint-2").is_dir()
    assert not (out / "checkpoint-3").exists()
    assert trainer.state.global_step == 2


def test_nan_guard_names_a_group_term(tmp_path, data, monkeypatch):
    dataset, _ = data
    trainer = _trainer(tmp_path, dataset, fairness_attributes=["race"])
    original = trainer.group_ot.forward

    def bad_forward(values, groups):
        total, terms = original(values, groups)
        return total, {**terms, "race=1": torch.tensor(float("inf"))}

    monkeypatch.setattr(trainer.group_ot, "forward", bad_forward)
    trainer.model.train()
    with pytest.raises(NonFiniteLossError, match=r"fair_D/race=1 \(inf\)"):
        trainer.compute_loss(trainer.model, _batch(dataset, range(8)))


def test_nan_guard_off_lets_the_value_through(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(
        tmp_path, dataset, nan_guard=False, dbpm=False, fairness_lambda=0.0, fairness_attributes=[]
    )
    trainer.model.visual_projection.register_forward_hook(lambda m, a, out: out * float("nan"))
    trainer.model.train()
    assert math.isnan(trainer.compute_loss(trainer.model, _batch(dataset, range(4))).item())


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_reports_zero_shot_auc_and_es_auc(tmp_path, data):
    dataset, _ = data
    evaluation, _ = tt.tiny_dataset(n=16, seed=1, bad_ids=())
    trainer = _trainer(
        tmp_path,
        dataset,
        eval_dataset=evaluation,
        eval_attributes=["race", "gender"],
        fairness_lambda=0.0,
    )
    metrics = trainer.evaluate()

    model = trainer.model.eval()
    batch = _batch(evaluation, range(16))
    prompts = tt.TinyTokenizer()(["A photo of non-glaucoma", "A photo of glaucoma"])
    with torch.no_grad():
        images = F.normalize(model.get_image_features(batch["pixel_values"]).pooler_output, dim=-1)
        texts = F.normalize(model.get_text_features(**prompts).pooler_output, dim=-1)
        scores = (model.logit_scale.exp() * images @ texts.T).softmax(-1)[:, 1].numpy()
    labels = batch["glaucoma"].numpy()
    auc = roc_auc_score(labels, scores)
    assert metrics["eval_auc"] == pytest.approx(auc, abs=1e-6)
    race = batch["race"].numpy()
    gaps = sum(abs(auc - roc_auc_score(labels[race == g], scores[race == g])) for g in range(3))
    assert metrics["eval_es_auc_race"] == pytest.approx(auc / (1 + gaps), abs=1e-6)
    assert "eval_mean_es_auc" in metrics

    halves = [_clip_reference(model, _batch(evaluation, r))[0] for r in (range(8), range(8, 16))]
    assert metrics["eval_loss"] == pytest.approx(np.mean(halves), rel=1e-5)
    assert metrics["eval_loss_clip"] == pytest.approx(np.mean(halves), rel=1e-5)

    prediction = trainer.predict(evaluation)
    np.testing.assert_allclose(prediction.predictions, scores, atol=1e-6)
    expected_labels = np.stack([labels, race, batch["gender"].numpy()], axis=1)
    np.testing.assert_array_equal(prediction.label_ids, expected_labels)


# ---------------------------------------------------------------------------- input errors
def test_clear_errors_on_bad_input(tmp_path, data):
    dataset, truth = data
    config = tt.tiny_config(tmp_path / "e")
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="FairRobustConfig"):
        FairRobustTrainer(
            model=tt.tiny_clip(),
            args=TrainingArguments(output_dir=str(tmp_path)),
            data_collator=tt.TinyCollator(),
        )
    with pytest.raises(ValueError, match="data_collator"):
        FairRobustTrainer(model=tt.tiny_clip(), args=config)
    with pytest.raises(KeyError, match=r"ground_truth is missing column\(s\) \['kind'\]"):
        _trainer(tmp_path, dataset, ground_truth=truth[["sample_id"]])

    trainer = _trainer(tmp_path, dataset)
    batch = _batch(dataset, range(4))
    del batch["language"]
    trainer.model.train()
    with pytest.raises(KeyError, match=r"\['language'\] needed by fairness_attributes"):
        trainer.compute_loss(trainer.model, batch)
    assert isinstance(trainer.args, FairRobustConfig)


# ---------------------------------------------------------------------------- default wiring
def _raw_split(n, seed, first_id):
    """Rows in the layout of ``load_fairvlmed`` (PIL images, notes, labels, attributes)."""
    import datasets
    from PIL import Image

    from fairvlm_hf.data.fairvlmed import FEATURES

    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    return datasets.Dataset.from_dict(
        {
            "sample_id": list(range(first_id, first_id + n)),
            "filename": [f"data_{first_id + i:05d}.npz" for i in range(n)],
            "image": [
                Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)) for _ in labels
            ],
            "text": [
                f"{'glaucoma' if y else 'healthy'} optic disc, note {i}"
                for i, y in enumerate(labels)
            ],
            "glaucoma": labels,
            "race": [i % 3 for i in range(n)],
            "gender": [(i // 2) % 2 for i in range(n)],
            "ethnicity": [i % 2 for i in range(n)],
            "language": [0] * n,
            "maritalstatus": [-1] * n,
            "age": [60.0] * n,
        },
        features=FEATURES,
    )


def test_default_collator_metrics_and_best_checkpoint(tmp_path):
    from fairvlm_hf.data.collate import with_processor_transform
    from fairvlm_hf.modeling import build_default_model

    train, validation = _raw_split(24, 0, 1), _raw_split(12, 1, 101)
    model, processor = build_default_model(
        train["text"], image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
        vocab_size=600,
    )  # fmt: skip
    config = FairRobustConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=6,
        num_train_epochs=2,
        learning_rate=1e-3,
        fairness_ot="exact_1d",
        eval_attributes=["race", "gender"],
        use_cpu=True,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = FairRobustTrainer(
        model=model,
        args=config,
        train_dataset=with_processor_transform(train, processor),
        eval_dataset=with_processor_transform(validation, processor),
        processing_class=processor,
    )
    trainer.train()
    evals = [row for row in trainer.state.log_history if "eval_mean_es_auc" in row]
    assert len(evals) == 2
    for row in evals:
        assert row["eval_mean_es_auc"] == pytest.approx(
            (row["eval_es_auc_race"] + row["eval_es_auc_gender"]) / 2
        )
        assert "eval_loss" in row and "eval_fair_reg" in row
    best = max(evals, key=lambda row: row["eval_mean_es_auc"])
    assert trainer.state.best_metric == pytest.approx(best["eval_mean_es_auc"])
    best_dir = Path(trainer.state.best_model_checkpoint)
    assert best_dir.name == f"checkpoint-{best['step']}"
    assert (best_dir / "bad_pair_miner.pt").is_file()
    assert (Path(config.output_dir) / FLAG_TABLE_NAME).is_file()


def test_statistic_separability_matches_sklearn():
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from fairvlm_hf.callbacks import statistic_separability

    ids = [1, 2, 3, 4, 5, 6, 7]
    m = [0.1, 0.9, 0.3, 0.8, 0.2, 0.5, 0.4]
    truth = pd.DataFrame(
        {"sample_id": [2, 4, 6], "kind": ["contradicting", "swap_same_label", "contradicting"]}
    )
    result = statistic_separability(ids, m, truth)
    clean = [0.1, 0.3, 0.2, 0.4]
    assert result["all"] == pytest.approx(roc_auc_score([1] * 3 + [0] * 4, [0.9, 0.8, 0.5, *clean]))
    assert result["contradicting"] == pytest.approx(
        roc_auc_score([1, 1, 0, 0, 0, 0], [0.9, 0.5, *clean])
    )
    assert result["swap_same_label"] == 1.0
    assert result["all_contradicting"] == result["contradicting"]
