"""Bad input, numerical edge cases, the output-folder guards and safety defaults.

Each case is checked against an independent value (numpy transport costs, the metric's own
rules, hand-made files) or against the exact error it must raise; docs/reliability.md lists every
case with the test that shows it, including those covered in other test files.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _scripts import load_script
from filelock import FileLock
from transformers import HfArgumentParser

import fairvlm_hf
from fairvlm_hf import modeling
from fairvlm_hf.card import write_model_card
from fairvlm_hf.data.fairvlmed import FairVLMedFormatError, load_fairvlmed
from fairvlm_hf.evaluation import fairness_report
from fairvlm_hf.modeling import ModelArguments, load_model_and_processor
from fairvlm_hf.objective.group_ot import GroupSinkhorn, exact_1d_ot
from fairvlm_hf.run_guard import (
    LOCK_NAME,
    ExistingCheckpointsError,
    OutputDirGuard,
    OutputDirInUseError,
    publish_checkpoint,
    staging_dir,
)
from fairvlm_hf.trainer import FairRobustTrainer, NonFiniteLossError

TOKEN = "hf_" + "ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"


tt = load_script("tiny_train")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return tt.tiny_dataset(n=48)


def _trainer(output_dir, dataset, eval_dataset=None, **overrides) -> FairRobustTrainer:
    values = {"fairness_ot": "exact_1d", "log_level": "error", **overrides}
    return FairRobustTrainer(
        model=tt.tiny_clip(),
        args=tt.tiny_config(output_dir, **values),
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tt.TinyTokenizer(),
    )


def _batch(dataset, rows, **columns):
    batch = tt.TinyCollator()([dataset[i] for i in rows])
    for name, values in columns.items():
        batch[name] = torch.as_tensor(values, dtype=torch.long)
    return batch


def _per_pair_losses(model, batch) -> np.ndarray:
    """Per-pair CLIP losses from CLIPModel's own logits (independent of the objective code)."""
    with torch.no_grad():
        out = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )
    logits = out.logits_per_image.double()
    target = torch.arange(logits.shape[0])
    image = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    text = torch.nn.functional.cross_entropy(logits.T, target, reduction="none")
    return ((image + text) / 2).numpy()


def _exact_w2_half(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 1-D OT cost |a - b|^2 / 2 between uniform empirical measures (expanded sorting)."""
    xs = np.repeat(np.sort(x), len(y))
    ys = np.repeat(np.sort(y), len(x))
    return float(np.mean((xs - ys) ** 2) / 2)


# ---------------------------------------------------------------------------- data files
SPLITS = ("Training", "Validation", "Test")


def _arrays(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {
        "slo_fundus": rng.integers(0, 256, (5, 7), dtype=np.uint8),
        "glaucoma": np.array(index % 2),
        "race": np.array(index % 3),
        "gender": np.array(index % 2),
        "ethnicity": np.array(0),
        "language": np.array(-1),
        "maritalstatus": np.array(1),
        "age": np.array(60.0),
    }


def _folder(root: Path) -> Path:
    rows = []
    for s, split in enumerate(SPLITS):
        (root / split).mkdir(parents=True)
        for j in range(2):
            name = f"data_{1 + 2 * s + j:05d}.npz"
            np.savez(root / split / name, **_arrays(1 + 2 * s + j))
            rows.append((name, "original", f"summary {name}"))
    pd.DataFrame(rows, columns=["File Name", "Original Note", "Summarized Note"]).to_csv(
        root / "gpt-4_summarized_notes.csv", index=False
    )
    return root


def _save_npy_as_npz(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((5, 7), dtype=np.uint8))


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"slo_fundus": np.arange(10, dtype=np.uint8)}, ["'slo_fundus'", "2-D", "(10,)"]),
        ({"slo_fundus": np.full((5, 7), np.inf)}, ["'slo_fundus'", "NaN or infinite"]),
        ({"slo_fundus": np.zeros((0, 7))}, ["'slo_fundus'", "empty"]),
        ({"slo_fundus": np.full((5, 7), "x")}, ["'slo_fundus'", "non-numeric"]),
        ({"glaucoma": np.array(np.nan)}, ["'glaucoma'", "not finite"]),
        ({"race": np.array([{"code": 1}], dtype=object)}, ["'race'", "pickled"]),
        ({"gender": np.array(2)}, ["'gender'", "code 2 is not one of"]),
        (_save_npy_as_npz, ["single .npy array"]),
    ],
    ids=["1-d", "inf", "empty", "strings", "nan-label", "pickle", "gender-2", "npy"],
)
def test_bad_npz_is_named_with_its_file_and_key(tmp_path, change, fragments):
    folder = _folder(tmp_path / "d")
    path = folder / "Validation" / "data_00004.npz"
    if callable(change):
        change(path)
    else:
        np.savez(path, **(_arrays(4) | change))
    with pytest.raises(FairVLMedFormatError) as info:
        load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "Validation/data_00004.npz" in message
    for fragment in fragments:
        assert fragment in message
    assert [p.path for p in info.value.problems] == ["Validation/data_00004.npz"]


# ---------------------------------------------------------------------------- odd batches
def test_batch_of_one_has_zero_loss_no_nan_and_is_not_mined(tmp_path, data, caplog):
    dataset, _ = data
    trainer = _trainer(tmp_path / "run", dataset, fairness_ot="sinkhorn", fairness_min_group_size=1)
    trainer.model.train()
    seen = trainer.miner.state_dict()
    with caplog.at_level(logging.WARNING, logger="fairvlm_hf.trainer"):
        loss = trainer.compute_loss(trainer.model, _batch(dataset, [5]))
    assert loss.item() == 0.0  # one pair: the softmax over a single candidate is 1
    loss.backward()
    assert all(
        torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None
    )
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["loss_clip"] == 0.0 and logged["fair_reg"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(v) for v in logged.values())
    assert "batch of one pair has no negatives" in caplog.text
    after = trainer.miner.state_dict()
    torch.testing.assert_close(after["buffer.cur_count"], seen["buffer.cur_count"])


def test_last_batch_of_one_trains_without_nan(tmp_path):
    dataset, _ = tt.tiny_dataset(n=9, bad_ids=())
    trainer = _trainer(tmp_path / "run", dataset, num_train_epochs=2, fairness_ot="sinkhorn")
    trainer.train()
    rows = tt.step_rows(trainer.state.log_history)
    assert len(rows) == 4
    assert all(math.isfinite(v) for row in rows for v in row.values())
    assert [row["loss_clip"] == 0.0 for row in rows] == [False, True, False, True]


def test_absent_group_and_all_unknown_attribute_give_no_term(tmp_path, data):
    dataset, _ = data
    attributes = ["race", "language"]
    trainer = _trainer(
        tmp_path / "run", dataset, dbpm=False, fairness_lambda=0.5, fairness_attributes=attributes
    )
    race = [0, 1, 0, 1, 1, 0, 0, 1]
    batch = _batch(dataset, range(8), race=race, language=[-1] * 8)
    values = _per_pair_losses(trainer.model, batch)
    codes = np.asarray(race)
    expected_r = sum(_exact_w2_half(values[codes == g], values) for g in (0, 1))

    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert sorted(k for k in logged if k.startswith("fair_D/")) == [
        "fair_D/race=0",
        "fair_D/race=1",
    ]
    assert logged["fair_reg"] == pytest.approx(expected_r, rel=1e-4)
    assert loss.item() == pytest.approx(values.mean() + 0.5 * expected_r, rel=1e-5)

    unknown = _batch(dataset, range(8), race=[-1] * 8, language=[-1] * 8)
    loss = trainer.compute_loss(trainer.model, unknown)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["fair_reg"] == 0.0
    assert loss.item() == pytest.approx(_per_pair_losses(trainer.model, unknown).mean(), rel=1e-5)
    loss.backward()


def _eval_set(n=16, **columns):
    evaluation, _ = tt.tiny_dataset(n=n, seed=1, bad_ids=())
    for name, values in columns.items():
        evaluation = evaluation.remove_columns(name).add_column(name, list(values))
    return evaluation.with_format("torch")


def test_evaluation_errors_name_the_attribute_or_the_single_class(tmp_path, data):
    dataset, _ = data
    unknown = _eval_set(language=[-1] * 16)
    trainer = _trainer(
        tmp_path / "a", dataset, eval_dataset=unknown, eval_attributes=["race", "language"]
    )
    with pytest.raises(
        ValueError, match=r"attribute 'language': every sample has an unknown group"
    ):
        trainer.evaluate()

    one_class = _eval_set(glaucoma=[1] * 16)
    trainer = _trainer(tmp_path / "b", dataset, eval_dataset=one_class, eval_attributes=["race"])
    with pytest.raises(ValueError, match=r"one class only \(16 positive of 16\)"):
        trainer.evaluate()


def test_non_finite_scores_in_evaluation_are_named(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(
        tmp_path / "run", dataset, eval_dataset=_eval_set(), eval_attributes=["race"]
    )
    trainer.model.visual_projection.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss_clip \(nan\) in evaluation"):
        trainer.evaluate()


# ---------------------------------------------------------------------------- numerical guards
def test_infinite_lambda_is_stopped_by_the_total_loss_guard(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(tmp_path / "run", dataset, fairness_lambda=1.0)
    trainer.args.fairness_lambda = float("inf")
    trainer.model.train()
    with pytest.raises(
        NonFiniteLossError, match=r"loss \(loss_rob \+ fairness_lambda \* fair_reg\) \(inf\)"
    ):
        trainer.compute_loss(trainer.model, _batch(dataset, range(8)))


@pytest.mark.parametrize("method", ["sinkhorn", "exact_1d"])
def test_group_of_one_is_finite_and_matches_exact_transport(method):
    values = torch.tensor([0.4, 1.9, 2.2, 0.7, 3.1, 1.0], requires_grad=True)
    groups = {"race": torch.tensor([2, 0, 0, 1, 1, 0])}
    total, terms = GroupSinkhorn(["race"], method=method, blur=0.01, min_group_size=1)(
        values, groups
    )
    x = values.detach().numpy().astype(np.float64)
    assert terms["race=2"].item() == pytest.approx(_exact_w2_half(x[:1], x), rel=0.05)
    assert math.isfinite(total.item())
    total.backward()
    assert torch.isfinite(values.grad).all()
    assert exact_1d_ot(values[:1].detach(), values.detach()).item() == pytest.approx(
        _exact_w2_half(x[:1], x), rel=1e-6
    )


def test_huge_lambda_stays_finite_and_trades_learning_for_equal_losses(tmp_path, data):
    """lambda = 1e6: every value stays finite (gradients are clipped, Adam is scale-free), R is
    driven towards 0 and the CLIP loss stays near log(batch size), the loss of a model that
    cannot tell the pairs apart; with lambda = 0 the same steps learn."""
    dataset, _ = data
    second_half = {}
    for lam in (0.0, 1e6):
        trainer = _trainer(
            tmp_path / f"run{lam}", dataset, dbpm=False, fairness_lambda=lam, max_steps=12
        )
        trainer.train()
        rows = tt.step_rows(trainer.state.log_history)
        assert len(rows) == 12
        for row in rows:
            assert all(math.isfinite(v) for v in row.values())
            assert row["loss"] == pytest.approx(row["loss_rob"] + lam * row["fair_reg"], rel=1e-5)
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
        second_half[lam] = {
            key: float(np.mean([row[key] for row in rows[6:]])) for key in ("fair_reg", "loss_clip")
        }
        if lam > 0:
            assert rows[0]["grad_norm"] > 1e6  # clipped to max_grad_norm before the update
    assert second_half[1e6]["fair_reg"] < 0.5 * second_half[0.0]["fair_reg"]
    assert second_half[1e6]["loss_clip"] > second_half[0.0]["loss_clip"] + 0.2
    assert second_half[1e6]["loss_clip"] == pytest.approx(math.log(8), abs=0.15)


# ---------------------------------------------------------------------------- output folder
def test_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, data):
    dataset, _ = data
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-12").mkdir()
    trainer = _trainer(out, dataset, max_steps=1)
    with pytest.raises(ExistingCheckpointsError) as info:
        trainer.train()
    message = str(info.value)
    for fragment in (
        str(out),
        "checkpoint-4, checkpoint-12",
        "--resume_from_checkpoint",
        "--output_dir",
    ):
        assert fragment in message
    assert (out / "checkpoint-4").is_dir() and trainer.state.global_step == 0


def test_overwrite_opt_in_deletes_old_checkpoints_and_trains(tmp_path, data, caplog):
    dataset, _ = data
    out = tmp_path / "run"
    (out / "checkpoint-30").mkdir(parents=True)
    trainer = _trainer(out, dataset, max_steps=1)
    trainer.args.overwrite_output_dir = True
    with caplog.at_level(logging.WARNING, logger="fairvlm_hf.run_guard"):
        trainer.train()
    assert "deleting the checkpoints of an earlier run" in caplog.text
    assert not (out / "checkpoint-30").exists() and trainer.state.global_step == 1


def test_lock_stale_staging_and_publishing(tmp_path):
    out = tmp_path / "run"
    stale = staging_dir(out, 7) / "checkpoint-7"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    other = FileLock(str(out / LOCK_NAME))
    with other:
        with pytest.raises(OutputDirInUseError, match=re.escape(str(out))):
            OutputDirGuard(out, resuming=False).__enter__()
        assert stale.exists()
    with OutputDirGuard(out, resuming=False):
        assert not staging_dir(out, 7).exists()
        with pytest.raises(OutputDirInUseError):
            OutputDirGuard(out, resuming=True).__enter__()
    with OutputDirGuard(out, resuming=True):
        pass

    for content in (b"first", b"second"):
        staged = staging_dir(out, 3) / "checkpoint-3"
        staged.mkdir(parents=True)
        (staged / "weights").write_bytes(content)
        publish_checkpoint(staged, out / "checkpoint-3")
        assert (out / "checkpoint-3" / "weights").read_bytes() == content
        assert not staging_dir(out, 3).exists()
    with pytest.raises(FileNotFoundError, match="staged checkpoint folder is missing"):
        publish_checkpoint(staging_dir(out, 5) / "checkpoint-5", out / "checkpoint-5")


def test_resume_argument_forms(tmp_path, data):
    dataset, _ = data
    trainer = _trainer(tmp_path / "run", dataset, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    resumed = _trainer(tmp_path / "run", dataset, max_steps=3, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint="true")
    assert resumed.state.global_step == 3
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    missing = _trainer(tmp_path / "other", dataset, max_steps=3)
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint='.*nowhere'"):
        missing.train(resume_from_checkpoint=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- safety
def test_remote_code_is_off_by_default_and_loading_passes_false(tmp_path, monkeypatch):
    assert ModelArguments().trust_remote_code is False
    (parsed,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(
        ["--model_name_or_path", "some/model"]
    )
    assert parsed.trust_remote_code is False

    calls = []

    class Recorder:
        def __init__(self, result):
            self.result = result

        def from_pretrained(self, source, **kwargs):
            calls.append((source, kwargs))
            return self.result

    monkeypatch.setattr(modeling, "AutoModel", Recorder(tt.tiny_clip()))
    monkeypatch.setattr(modeling, "AutoProcessor", Recorder(tt.TinyTokenizer()))
    load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path)))
    assert len(calls) == 2
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)


def test_no_source_file_enables_remote_code():
    package = Path(fairvlm_hf.__file__).parent
    sources = list(package.rglob("*.py")) + list((package.parent / "recipes").rglob("*.py"))
    assert len(sources) > 10
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    assert [str(p) for p in sources if pattern.search(p.read_text())] == []


def _metric_report() -> dict:
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 20)
    scores = np.clip(0.3 * labels + rng.uniform(0, 0.7, 40), 0, 1)
    return fairness_report(scores, labels, {"race": np.arange(40) % 3})


def test_card_from_a_real_config_has_no_paths_or_tokens(tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    config = tt.tiny_config(tmp_path / "runs" / "x", hub_token=TOKEN, hub_model_id="me/model")
    training_config = {**config.to_dict(), "hub_token": TOKEN, "data_dir": str(tmp_path / "data")}
    path = write_model_card(
        out,
        model_name="fairvlm-tiny",
        base_model=str(tmp_path / "base"),
        dataset_name="synthetic FairVLMed",
        eval_results=_metric_report(),
        training_config=training_config,
        bad_pair_summary={"counts": {"faulty": 1}, "table": str(tmp_path / "bad_pairs.csv")},
        plots=[],
    )
    text = path.read_text()
    assert "learning_rate" in text
    for secret in (str(tmp_path), str(Path.home()) + "/", TOKEN):
        assert secret not in text, secret


def test_trainer_logs_carry_no_paths_or_tokens(tmp_path, data, caplog):
    dataset, truth = data
    config = tt.tiny_config(
        tmp_path / "run",
        hub_token=TOKEN,
        fairness_ot="exact_1d",
        max_steps=4,
        dbpm_warmup_epochs=0,
        save_strategy="steps",
        save_steps=2,
    )
    trainer = FairRobustTrainer(
        model=tt.tiny_clip(),
        args=config,
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        processing_class=tt.TinyTokenizer(),
        ground_truth=truth,
    )
    with caplog.at_level(logging.DEBUG):
        trainer.train()
    history = trainer.state.log_history
    assert len(tt.step_rows(history)) == 4
    assert any(k.startswith("dbpm/") for row in history for k in row)
    values = [v for row in history for v in row.values()]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    assert TOKEN not in caplog.text
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert TOKEN not in json.dumps(state)
    shutil.rmtree(tmp_path / "run")
