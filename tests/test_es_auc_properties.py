"""Properties of ES-AUC that hold for every input, checked with hypothesis.

- ES-AUC <= AUC, with equality exactly when every group's AUC equals the population's AUC.
- AUC, ES-AUC and the group AUCs depend on the order of the scores only: a strictly increasing
  transform leaves them unchanged (the thresholded metrics are not invariant and are not checked).
- Renaming the groups renames the keys of the report and changes no value.
"""

from pathlib import Path

import evaluate
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "es_auc"
TOL = 1e-12
AUC_KEYS = ("auc", "es_auc")

#: Strictly increasing maps of the integer score levels 0..30, each exact enough on floats that
#: distinct levels stay distinct.
INCREASING = {
    "affine": lambda k: 3.0 * k - 7.0,
    "cube": lambda k: k.astype(np.float64) ** 3,
    "exp": lambda k: np.exp(k / 7.0),
    "reciprocal": lambda k: -1.0 / (k + 1.0),
    "logistic": lambda k: 1.0 / (1.0 + np.exp(-(k - 15.0) / 4.0)),
}


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path_factory.mktemp("es_auc_props")))


@st.composite
def cases(draw, min_size=4, max_size=60):
    """Score levels with ties, labels with both classes, group codes with unknowns."""
    n = draw(st.integers(min_size, max_size))
    levels = np.array(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    codes = np.array(draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n)))
    known = codes >= 0
    assume(0 < labels.sum() < n)
    assume(0 < labels[known].sum() < known.sum())
    return levels, labels, codes


def _report(metric, scores, labels, codes):
    return metric.compute(prediction_scores=scores, references=labels, groups=codes)


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_es_auc_at_most_auc_with_equality_iff_no_gap(metric, case):
    levels, labels, codes = case
    report = _report(metric, levels / 30.0, labels, codes)
    assert report["es_auc"] <= report["auc"]
    gaps = [abs(report["auc"] - value) for value in report["group_auc"].values()]
    if report["es_auc"] == report["auc"]:
        assert max(gaps, default=0.0) <= TOL
    else:
        assert sum(gaps) > 0
    assert report["es_acc"] <= report["accuracy"]


@settings(max_examples=60, deadline=None)
@given(case=cases(max_size=25), n_groups=st.integers(1, 5))
def test_equal_group_aucs_give_es_auc_equal_to_auc(metric, case, n_groups):
    """Every group holds the same scores and labels, so every group AUC is the pooled AUC."""
    levels, labels, _ = case
    scores = np.tile(levels / 30.0, n_groups)
    codes = np.repeat(np.arange(n_groups) * 7 + 2, levels.size)
    report = _report(metric, scores, np.tile(labels, n_groups), codes)
    assert len(report["group_auc"]) == n_groups
    assert all(value == report["auc"] for value in report["group_auc"].values())
    assert report["es_auc"] == report["auc"]


@settings(max_examples=100, deadline=None)
@given(case=cases(), transform=st.sampled_from(sorted(INCREASING)))
def test_auc_metrics_invariant_to_increasing_transforms(metric, case, transform):
    levels, labels, codes = case
    transformed = INCREASING[transform](levels)
    assert np.all(np.diff(INCREASING[transform](np.arange(31))) > 0)
    before = _report(metric, levels / 30.0, labels, codes)
    after = _report(metric, transformed, labels, codes)
    for key in AUC_KEYS:
        assert after[key] == pytest.approx(before[key], abs=TOL), key
    assert after["group_auc"].keys() == before["group_auc"].keys()
    for code, value in before["group_auc"].items():
        assert after["group_auc"][code] == pytest.approx(value, abs=TOL)
    assert after["skipped_groups"] == before["skipped_groups"]


@settings(max_examples=100, deadline=None)
@given(
    case=cases(),
    new_codes=st.lists(st.integers(0, 10**6), min_size=4, max_size=4, unique=True),
)
def test_renaming_groups_changes_no_value(metric, case, new_codes):
    levels, labels, codes = case
    renamed = np.where(codes >= 0, np.array(new_codes)[np.maximum(codes, 0)], -1)
    before = _report(metric, levels / 30.0, labels, codes)
    after = _report(metric, levels / 30.0, labels, renamed)
    for key in ("auc", "accuracy", "es_auc", "es_acc", "dpd", "deodds"):
        assert after[key] == pytest.approx(before[key], abs=TOL), key
    name = {str(old): str(new) for old, new in enumerate(new_codes)}
    for key in ("group_auc", "group_accuracy", "group_size", "skipped_groups"):
        assert after[key].keys() == {name[code] for code in before[key]}, key
        for code, value in before[key].items():
            assert after[key][name[code]] == value, (key, code)
    assert after["num_unknown"] == before["num_unknown"]
