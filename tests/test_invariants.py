"""Invariants of the objective checked with hypothesis on random inputs.

- The miner's weights lie in (0, 1] with the default settings, whatever the loss history that
  fitted the rule and whatever the current losses; unflagged pairs keep weight 1.
- The group term is 0 (to tolerance) when every group holds the batch's own distribution, it is
  never negative, and it does not depend on the order of the batch or on the names of the codes.

The ES-AUC invariants (ES-AUC <= AUC, equality when every group AUC equals the AUC, invariance
to strictly increasing transforms of the scores and to renaming the groups) are checked in
tests/test_es_auc_properties.py, and the weights for a fixed history in
tests/test_bad_pairs.py::test_gaussian_kernel_weights_lie_in_unit_interval.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.objective.bad_pairs import BadPairMiner
from fairvlm_hf.objective.group_ot import GroupSinkhorn

DEFAULTS = FairRobustConfig(output_dir="unused")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread avoids contention when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


METHODS = ("sinkhorn", "exact_1d")


def _default_miner() -> BadPairMiner:
    """A miner with the settings the trainer uses by default (FairRobustConfig's defaults)."""
    return BadPairMiner(
        warmup_epochs=DEFAULTS.dbpm_warmup_epochs,
        threshold=DEFAULTS.dbpm_threshold,
        beta_noisy=DEFAULTS.dbpm_beta_noisy,
        beta_faulty=DEFAULTS.dbpm_beta_faulty,
        weighting=DEFAULTS.dbpm_weighting,
        statistic=DEFAULTS.dbpm_statistic,
    )


#: Loss values with ties, a clean bulk and far outliers, as real per-pair losses have.
LOSS = st.one_of(
    st.sampled_from([0.0, 0.5, 2.0]),
    st.floats(0.0, 5.0, width=32),
    st.floats(5.0, 1e4, width=32),
)


@st.composite
def histories(draw):
    n = draw(st.integers(4, 40))
    epochs = draw(st.integers(1, 3))
    rows = [draw(st.lists(LOSS, min_size=n, max_size=n)) for _ in range(epochs)]
    current = draw(st.lists(st.floats(0.0, 1e4, width=32), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    return np.asarray(rows, dtype=np.float32), np.asarray(current, dtype=np.float32), order


@settings(max_examples=150, deadline=None)
@given(case=histories())
def test_default_miner_weights_lie_in_unit_interval(case):
    rows, current, order = case
    miner = _default_miner()
    ids = torch.tensor(order)
    for epoch, losses in enumerate(rows):
        miner.start_epoch(epoch)
        miner.observe(ids, torch.from_numpy(losses)[ids])
    miner.start_epoch(len(rows))
    all_ids = torch.arange(len(order))
    weights = miner.weights(all_ids, torch.from_numpy(current))
    assert bool(torch.all(weights > 0)) and bool(torch.all(weights <= 1))
    clean = miner.flags(all_ids) == 0
    assert bool(torch.all(weights[clean] == 1))


VALUES = st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=10)


def _term(values, codes, method, min_group_size=1):
    module = GroupSinkhorn(["race"], method=method, min_group_size=min_group_size)
    total, terms = module(torch.tensor(values, dtype=torch.float32), {"race": torch.tensor(codes)})
    return total.item(), {k: v.item() for k, v in terms.items()}


def _tolerance(values) -> float:
    spread = float(np.ptp(np.asarray(values, dtype=np.float64)))
    return 1e-6 * max(spread**2, 1.0)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=60, deadline=None)
@given(base=VALUES, copies=st.integers(2, 4), data=st.data())
def test_group_term_is_zero_for_identical_distributions(method, base, copies, data):
    values = np.tile(np.asarray(base, dtype=np.float32), copies)
    codes = np.repeat(np.arange(copies), len(base))
    order = np.asarray(data.draw(st.permutations(range(values.size))))
    total, terms = _term(values[order], codes[order], method)
    assert len(terms) == copies
    assert abs(total) <= _tolerance(values)
    assert all(abs(term) <= _tolerance(values) for term in terms.values())


@st.composite
def batches(draw):
    n = draw(st.integers(2, 24))
    values = draw(st.lists(st.floats(0.0, 10.0, width=32), min_size=n, max_size=n))
    codes = draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))
    order = draw(st.permutations(range(n)))
    names = draw(st.lists(st.integers(0, 1000), min_size=4, max_size=4, unique=True))
    return np.asarray(values, dtype=np.float32), np.asarray(codes), np.asarray(order), names


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=60, deadline=None)
@given(case=batches())
def test_group_term_is_non_negative_and_blind_to_order_and_code_names(method, case):
    values, codes, order, names = case
    total, terms = _term(values, codes, method, min_group_size=2)
    assert math.isfinite(total)
    tol = _tolerance(values)
    assert total >= -tol and all(term >= -tol for term in terms.values())
    assert total == pytest.approx(sum(terms.values()), rel=1e-5, abs=tol)

    shuffled_total, shuffled_terms = _term(values[order], codes[order], method, min_group_size=2)
    assert shuffled_total == pytest.approx(total, rel=1e-4, abs=tol)
    assert shuffled_terms.keys() == terms.keys()

    renamed = np.where(codes >= 0, np.asarray(names)[np.maximum(codes, 0)], -1)
    renamed_total, renamed_terms = _term(values, renamed, method, min_group_size=2)
    assert renamed_total == pytest.approx(total, rel=1e-4, abs=tol)
    assert {f"race={names[int(k.split('=')[1])]}" for k in terms} == set(renamed_terms)
    for key, value in terms.items():
        new_key = f"race={names[int(key.split('=')[1])]}"
        assert renamed_terms[new_key] == pytest.approx(value, rel=1e-4, abs=tol)
