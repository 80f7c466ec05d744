"""A run stopped and resumed from a checkpoint ends exactly as an uninterrupted run: same weights,
same per-step losses, same bad-pair flags and reports (the miner's state travels in checkpoints).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from _scripts import load_script
from transformers import TrainerCallback

from fairvlm_hf.trainer import (
    DETECTION_REPORT_NAME,
    FLAG_TABLE_NAME,
    MINING_STATE_NAME,
    FairRobustTrainer,
)

N_SAMPLES = 32
STEPS_PER_EPOCH = N_SAMPLES // 8
STEPS = 3 * STEPS_PER_EPOCH
STEP_KEYS = ("loss", "loss_clip", "loss_rob", "fair_reg", "dbpm/flagged_faulty", "dbpm/mean_weight")


tt = load_script("tiny_train")


class StopAfterEpoch(TrainerCallback):
    """Ends training at the end of epoch ``epochs`` (after its checkpoint is saved)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epochs:
            control.should_training_stop = True


def _trainer(output_dir, dataset, truth, seed=0, callbacks=None, **overrides):
    config = tt.tiny_config(
        output_dir,
        fairness_ot="exact_1d",
        dbpm_threshold="sigma",
        dbpm_beta_faulty=1.0,
        dbpm_beta_noisy=1.0,
        log_level="error",
        **overrides,
    )
    return FairRobustTrainer(
        model=tt.tiny_clip(seed=seed),
        args=config,
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        processing_class=tt.TinyTokenizer(),
        ground_truth=truth,
        callbacks=callbacks,
    )


def _steps(trainer):
    return {row["step"]: row for row in tt.step_rows(trainer.state.log_history)}


def _assert_same_run(resumed, reference):
    """Steps before the checkpoint come back with its trainer state; later ones are recomputed."""
    got, want = _steps(resumed), _steps(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, row in got.items():
        for key in STEP_KEYS:
            assert row[key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
    weights = dict(reference.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        torch.testing.assert_close(value, weights[name], atol=1e-6, rtol=0)
    out, ref = Path(resumed.args.output_dir), Path(reference.args.output_dir)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / FLAG_TABLE_NAME), pd.read_csv(ref / FLAG_TABLE_NAME), rtol=1e-6
    )
    got_report = json.loads((out / DETECTION_REPORT_NAME).read_text())
    want_report = json.loads((ref / DETECTION_REPORT_NAME).read_text())
    assert got_report.keys() == want_report.keys()
    assert got_report["flag_counts"] == want_report["flag_counts"]
    assert got_report["detection"] == want_report["detection"]
    assert len(got_report["epochs"]) == len(want_report["epochs"]) == 3
    for got_epoch, want_epoch in zip(got_report["epochs"], want_report["epochs"], strict=True):
        assert got_epoch.keys() == want_epoch.keys()
        for key, value in want_epoch.items():
            if isinstance(value, float):
                assert got_epoch[key] == pytest.approx(value, rel=1e-6), key
            else:
                assert got_epoch[key] == value, key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dataset, truth = tt.tiny_dataset(n=N_SAMPLES, bad_ids=(3, 10, 17, 29))
    root = tmp_path_factory.mktemp("resume")
    reference = _trainer(root / "full", dataset, truth, save_strategy="steps", save_steps=3)
    reference.train()
    return dataset, truth, root, reference


def test_checkpoints_hold_the_miner_state(runs):
    root = runs[2]
    state = torch.load(root / "full" / "checkpoint-9" / MINING_STATE_NAME, weights_only=True)
    assert state["epoch"] == 2
    assert state["miner"]["epoch"] == 2
    assert len(json.loads(state["history"])) == 3


def test_stopped_after_epoch_two_and_resumed(runs):
    dataset, truth, root, reference = runs
    stopped = _trainer(
        root / "stopped", dataset, truth, save_strategy="epoch", callbacks=[StopAfterEpoch(2)]
    )
    stopped.train()
    assert stopped.state.global_step == 2 * STEPS_PER_EPOCH
    assert (root / "stopped" / "checkpoint-8" / MINING_STATE_NAME).is_file()

    resumed = _trainer(root / "stopped", dataset, truth, seed=7, save_strategy="epoch")
    resumed.train(resume_from_checkpoint=True)
    _assert_same_run(resumed, reference)


def test_resumed_in_the_middle_of_an_epoch(runs):
    dataset, truth, root, reference = runs
    resumed = _trainer(root / "middle", dataset, truth, seed=7)
    resumed.train(resume_from_checkpoint=str(root / "full" / "checkpoint-6"))
    _assert_same_run(resumed, reference)


def test_resume_without_miner_state_is_an_error(runs):
    dataset, truth, root, _ = runs
    broken = root / "broken" / "checkpoint-6"
    shutil.copytree(root / "full" / "checkpoint-6", broken)
    (broken / MINING_STATE_NAME).unlink()
    trainer = _trainer(root / "broken", dataset, truth)
    with pytest.raises(FileNotFoundError, match=MINING_STATE_NAME):
        trainer.train(resume_from_checkpoint=str(broken))
