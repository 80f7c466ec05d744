"""recipes/detection_ceiling.py: the best possible detector of contradicting notes."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from _scripts import load_recipe
from scipy import integrate
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fairvlm_hf.data.synthetic import SyntheticConfig, sample_truth


@pytest.fixture(scope="module")
def ceiling():
    return load_recipe("detection_ceiling")


def _integrated_log_odds(reading, claimed, stated, config, error, note_noise):
    """Posterior log-odds by integrating each hypothesis over the unseen true ratio c."""
    s = config.cdr_std
    mix = np.asarray(config.bad_pair_mix) / sum(config.bad_pair_mix)
    p_contra = config.bad_pair_rate * (mix[0] + mix[2])
    p_same = config.bad_pair_rate * mix[1]
    p_clean = 1 - config.bad_pair_rate
    mean = config.cdr_glaucoma if claimed else config.cdr_normal
    other = config.cdr_normal if claimed else config.cdr_glaucoma

    def quad(density):
        return integrate.quad(density, -1, 2, points=[reading, stated], limit=200)[0]

    def image(mu):
        return quad(lambda c: norm.pdf(c, mu, s) * norm.pdf(reading, c, error))

    note = quad(lambda c: norm.pdf(c, mean, s) * norm.pdf(stated, c, note_noise))
    clean = quad(
        lambda c: (
            norm.pdf(c, mean, s) * norm.pdf(reading, c, error) * norm.pdf(stated, c, note_noise)
        )
    )
    return math.log(p_contra * image(other) * note) - math.log(
        p_clean * clean + p_same * image(mean) * note
    )


def test_log_odds_equal_numerical_integration(ceiling):
    """The closed form equals the densities integrated over the unseen true ratio."""
    config = SyntheticConfig()
    for reading, claimed, stated in [(0.4, 1, 0.6), (0.62, 1, 0.65), (0.3, 0, 0.35), (0.5, 0, 0.7)]:
        expected = _integrated_log_odds(reading, claimed, stated, config, 0.04, ceiling.NOTE_NOISE)
        got = ceiling.contradiction_log_odds(
            np.array([reading]), np.array([claimed]), np.array([stated]), config, 0.04
        )[0]
        assert got == pytest.approx(expected, abs=1e-6)


def test_optimal_score_beats_a_simple_one_and_worsens_with_reading_error(ceiling):
    config = dataclasses.replace(SyntheticConfig(), num_train=3000)
    truth = sample_truth(config, "train")
    contradicting = np.isin(truth["kind"], ceiling.CONTRADICTING)
    reading = truth["cdr"] + np.random.default_rng(0).normal(0, 0.03, len(contradicting))
    optimal = ceiling.contradiction_log_odds(
        reading, truth["claimed_glaucoma"], truth["stated_cdr"], config, 0.03
    )
    simple = np.abs(truth["stated_cdr"] - reading)
    assert roc_auc_score(contradicting, optimal) > roc_auc_score(contradicting, simple)
    rows = ceiling.ceiling_rows(config, [0.0, 0.05, 0.2])
    aucs = [row["detection_auc"] for row in rows]
    labels = [row["label_auc"] for row in rows]
    assert aucs == sorted(aucs, reverse=True) and labels == sorted(labels, reverse=True)
    assert rows[0]["reaches_0.8"] and not rows[-1]["reaches_0.8"]


def test_without_class_overlap_a_perfect_reader_finds_every_contradiction(ceiling):
    config = dataclasses.replace(SyntheticConfig(), num_train=2000, cdr_std=0.01)
    (row,) = ceiling.ceiling_rows(config, [0.0])
    assert row["detection_auc"] > 0.999
    assert row["precision"] > 0.99 and row["recall"] > 0.99


def test_main_writes_table_and_json_and_rejects_negative_errors(ceiling, tmp_path, capsys):
    out = tmp_path / "ceiling"
    assert (
        ceiling.main(["--num_train", "500", "--errors", "0", "0.1", "--output_dir", str(out)]) == 0
    )
    record = json.loads((out / "ceiling.json").read_text())
    assert [r["reading_error"] for r in record["rows"]] == [0.0, 0.1]
    assert record["config"]["num_train"] == 500
    table = (out / "ceiling.md").read_text()
    assert "| 0.1 |" in table and table in capsys.readouterr().out
    with pytest.raises(ValueError, match="--errors"):
        ceiling.main(["--num_train", "500", "--errors", "-0.1", "--output_dir", str(out)])
