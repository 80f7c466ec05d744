"""BadPairMiner against hand-computed (numpy, sklearn, scipy) statistics, flags and weights."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from sklearn.mixture import GaussianMixture

from fairvlm_hf.objective.bad_pairs import (
    FAULTY,
    NOISY,
    BadPairMiner,
    fit_two_gaussians,
    median,
)

# ----------------------------------------------------------------------------- a loss table
# 3 epochs. Pairs 0..29 are clean (loss near 1), the next ``n_faulty`` are mismatched (near 3),
# the last one is suspiciously easy (near 0). Pair 9 is seen twice in epoch 1, pair 12 is missed
# in epoch 2. With 2 faulty pairs bad pairs are rare (the papers' sigma rule works); with 8 they
# are 20% of the data and form a second population (the mixture's case).
N_CLEAN = 30


def _ids(n_faulty: int = 2) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(number of pairs, faulty ids, noisy ids) of the table with ``n_faulty`` faulty pairs."""
    faulty = tuple(range(N_CLEAN, N_CLEAN + n_faulty))
    return N_CLEAN + n_faulty + 1, faulty, (N_CLEAN + n_faulty,)


N_PAIRS, FAULTY_IDS, NOISY_IDS = _ids()


def _loss_table(n_faulty: int = 2) -> list[tuple[int, int, float]]:
    """(epoch, sample_id, loss) observations, in the order a shuffled loader would give them."""
    n, faulty, noisy = _ids(n_faulty)
    rng = np.random.default_rng(7)
    rows = []
    for epoch in range(3):
        base = np.full(n, 1.0)
        base[list(faulty)] = 3.0
        base[list(noisy)] = 0.02
        losses = np.abs(base + 0.05 * rng.standard_normal(n))
        for sid in rng.permutation(n):
            if epoch == 2 and sid == 12:
                continue
            rows.append((epoch, int(sid), float(losses[sid])))
        if epoch == 1:
            rows.append((1, 9, 1.1))
    return rows


def _reference_statistic(rows, before_epoch: int, weighted: bool) -> dict[int, float]:
    """m per pair by hand: per-epoch means, then their (epoch+1)-weighted or plain mean."""
    per_epoch: dict[tuple[int, int], list[float]] = {}
    for epoch, sid, loss in rows:
        if epoch < before_epoch:
            per_epoch.setdefault((sid, epoch), []).append(np.float32(loss))
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for (sid, epoch), values in per_epoch.items():
        w = epoch + 1 if weighted else 1
        num[sid] = num.get(sid, 0.0) + w * float(np.mean(values))
        den[sid] = den.get(sid, 0.0) + w
    return {sid: num[sid] / den[sid] for sid in sorted(num)}


def _feed(miner: BadPairMiner, rows, epoch: int) -> None:
    batch = [(sid, loss) for e, sid, loss in rows if e == epoch]
    for start in range(0, len(batch), 8):
        chunk = batch[start : start + 8]
        miner.observe(
            torch.tensor([sid for sid, _ in chunk]),
            torch.tensor([loss for _, loss in chunk], dtype=torch.float32),
        )


def _run(miner: BadPairMiner, rows, epochs: int = 3) -> dict:
    summary = {}
    for epoch in range(epochs):
        miner.start_epoch(epoch)
        _feed(miner, rows, epoch)
    summary = miner.start_epoch(epochs)
    return summary


CURRENT = np.array([0.9] * 30 + [2.6, 3.4, 0.05])


def _kernel(losses, center, scale):
    return np.exp(-((losses - center) ** 2) / (2 * scale**2))


@pytest.mark.parametrize("statistic", ["mean", "epoch_weighted"])
def test_sigma_rule_matches_hand_computation(statistic):
    rows = _loss_table()
    miner = BadPairMiner(warmup_epochs=1, threshold="sigma", statistic=statistic, min_pairs=4)
    summary = _run(miner, rows)

    ref = _reference_statistic(rows, 3, weighted=statistic == "epoch_weighted")
    m = np.array([ref[s] for s in range(N_PAIRS)])
    mu, sigma = m.mean(), m.std()
    noisy = m <= mu - 2.0 * sigma
    faulty = m >= mu + 3.0 * sigma
    assert summary["mu"] == pytest.approx(mu, rel=1e-6)
    assert summary["sigma"] == pytest.approx(sigma, rel=1e-5)
    assert summary["n_seen"] == N_PAIRS
    expected = noisy * NOISY + faulty * FAULTY
    flags = miner.flags(torch.arange(N_PAIRS)).numpy()
    np.testing.assert_array_equal(flags, expected)
    assert set(np.flatnonzero(faulty)) == set(FAULTY_IDS)

    weights = miner.weights(torch.arange(N_PAIRS), torch.tensor(CURRENT, dtype=torch.float32))
    ref_w = np.where(expected > 0, _kernel(CURRENT, mu, sigma), 1.0)
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-5, atol=1e-12)
    assert summary["n_faulty"] == int(faulty.sum()) and summary["n_noisy"] == int(noisy.sum())


def test_mad_rule_matches_hand_computation():
    rows = _loss_table()
    miner = BadPairMiner(warmup_epochs=1, threshold="mad", min_pairs=4)
    summary = _run(miner, rows)
    ref = _reference_statistic(rows, 3, weighted=False)
    m = np.array([ref[s] for s in range(N_PAIRS)])
    center = np.median(m)
    scale = 1.4826 * np.median(np.abs(m - center))
    expected = (m <= center - 2 * scale) * NOISY + (m >= center + 3 * scale) * FAULTY
    np.testing.assert_array_equal(miner.flags(torch.arange(N_PAIRS)).numpy(), expected)
    assert set(np.flatnonzero(expected == FAULTY)) == set(FAULTY_IDS)
    assert set(NOISY_IDS) <= set(np.flatnonzero(expected == NOISY))
    assert summary["center"] == pytest.approx(center, rel=1e-6)
    assert summary["scale"] == pytest.approx(scale, rel=1e-5)
    weights = miner.weights(torch.arange(N_PAIRS), torch.tensor(CURRENT, dtype=torch.float32))
    ref_w = np.where(expected > 0, _kernel(CURRENT, center, scale), 1.0)
    ref_w = np.maximum(ref_w, np.finfo(np.float32).tiny)
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-4, atol=0)


def _sklearn_mixture(m: np.ndarray) -> GaussianMixture:
    n = m.size
    start = np.sort(m)[[math.ceil(n / 4) - 1, math.ceil(3 * n / 4) - 1]]
    gm = GaussianMixture(
        2,
        covariance_type="spherical",
        weights_init=[0.5, 0.5],
        means_init=start.reshape(2, 1),
        precisions_init=np.full(2, 1 / m.var()),
        reg_covar=0.0,
        tol=1e-13,
        max_iter=5000,
    )
    return gm.fit(m.reshape(-1, 1))


def test_mixture_rule_matches_sklearn_em():
    rows = _loss_table(n_faulty=8)
    n, faulty_ids, noisy_ids = _ids(8)
    miner = BadPairMiner(
        warmup_epochs=1, threshold="mixture", min_pairs=4, mixture_max_iter=5000, mixture_tol=1e-13
    )
    summary = _run(miner, rows)
    ref = _reference_statistic(rows, 3, weighted=False)
    m = np.array([ref[s] for s in range(n)])
    gm = _sklearn_mixture(m)
    order = np.argsort(gm.means_.ravel())
    w = gm.weights_[order]
    mu = gm.means_.ravel()[order]
    sd = np.sqrt(gm.covariances_[order])
    assert summary["mix_mean_low"] == pytest.approx(mu[0], rel=1e-5)
    assert summary["mix_mean_high"] == pytest.approx(mu[1], rel=1e-5)
    assert summary["mix_std_low"] == pytest.approx(sd[0], rel=1e-4)
    assert summary["mix_std_high"] == pytest.approx(sd[1], rel=1e-4)
    assert summary["mix_weight_high"] == pytest.approx(w[1], rel=1e-5)
    ashman = math.sqrt(2) * (mu[1] - mu[0]) / math.sqrt(sd[0] ** 2 + sd[1] ** 2)
    assert summary["mix_separation"] == pytest.approx(ashman, rel=1e-4)
    assert summary["rule_applied"] == "mixture"

    def posterior_high(x):
        x = np.clip(x, mu[0], mu[1])
        low, high = w[0] * norm.pdf(x, mu[0], sd[0]), w[1] * norm.pdf(x, mu[1], sd[1])
        return high / (low + high)

    noisy = m <= mu[0] - 2 * sd[0]
    faulty = (posterior_high(m) > 0.5) & ~noisy
    expected = noisy * NOISY + faulty * FAULTY
    np.testing.assert_array_equal(miner.flags(torch.arange(n)).numpy(), expected)
    assert set(np.flatnonzero(faulty)) == set(faulty_ids)
    assert set(noisy_ids) <= set(np.flatnonzero(noisy))

    current = np.array([0.9] * N_CLEAN + list(np.linspace(1.5, 3.5, 8)) + [0.05])
    weights = miner.weights(torch.arange(n), torch.tensor(current, dtype=torch.float32))
    ref_w = np.ones(n)
    ref_w[noisy] = _kernel(current[noisy], mu[0], sd[0])
    ref_w[faulty] = 1 - posterior_high(current[faulty])
    ref_w = np.maximum(ref_w, np.finfo(np.float32).tiny)
    np.testing.assert_allclose(weights.numpy(), ref_w, rtol=1e-4, atol=1e-30)
    grid = torch.linspace(0.0, 5.0, 501)
    along = miner.weights(torch.full((501,), faulty_ids[0]), grid)
    assert bool(torch.all(along[1:] <= along[:-1]))  # a higher loss never earns a higher weight
    assert along[0].item() == pytest.approx(1 - posterior_high(np.array([0.0]))[0], rel=1e-4)


def test_mixture_on_rare_bad_pairs_falls_back_to_the_sigma_rule():
    """Two faulty pairs in 33 are no second population: the sigma rule applies (and finds them)."""
    rows = _loss_table(n_faulty=2)
    mixture = BadPairMiner(warmup_epochs=1, threshold="mixture", min_pairs=4)
    sigma = BadPairMiner(warmup_epochs=1, threshold="sigma", min_pairs=4)
    assert _run(mixture, rows)["rule_applied"] == "sigma"
    _run(sigma, rows)
    ids = torch.arange(N_PAIRS)
    assert torch.equal(mixture.flags(ids), sigma.flags(ids))
    assert set(torch.nonzero(mixture.flags(ids) == FAULTY).flatten().tolist()) == set(FAULTY_IDS)


def test_epoch_weighted_statistic_by_hand():
    miner = BadPairMiner(warmup_epochs=1, threshold="sigma", statistic="epoch_weighted")
    # pair 0: epoch 0 losses 1 and 3 (mean 2), epoch 1 loss 5, epoch 2 loss 2
    #   weighted: (1 * 2 + 2 * 5 + 3 * 2) / (1 + 2 + 3) = 3; plain: (2 + 5 + 2) / 3 = 3.
    # pair 1: epoch 0 loss 4, missed in epoch 1, epoch 2 loss 1
    #   weighted: (1 * 4 + 3 * 1) / (1 + 3) = 1.75; plain: (4 + 1) / 2 = 2.5.
    plan = {0: [(0, 1.0), (0, 3.0), (1, 4.0)], 1: [(0, 5.0)], 2: [(0, 2.0), (1, 1.0)]}
    for epoch, obs in plan.items():
        miner.start_epoch(epoch)
        miner.observe(torch.tensor([s for s, _ in obs]), torch.tensor([v for _, v in obs]))
    miner.start_epoch(3)
    state = miner.state_dict()
    weighted = state["buffer.hist_wsum"].double() / state["buffer.hist_wnorm"].double()
    plain = state["buffer.hist_sum"].double() / state["buffer.hist_count"].double()
    assert weighted.tolist() == pytest.approx([3.0, 1.75])
    assert plain.tolist() == pytest.approx([3.0, 2.5])
    assert miner.summary()["n_seen"] == 2 and not miner.active  # fewer than min_pairs

    # the same by hand with the 33-pair table, against the statistic the rule saw
    rows = _loss_table()
    weighted_miner = BadPairMiner(warmup_epochs=1, threshold="sigma", statistic="epoch_weighted")
    summary = _run(weighted_miner, rows)
    ref = _reference_statistic(rows, 3, weighted=True)
    m = np.array([ref[s] for s in range(N_PAIRS)])
    assert summary["mu"] == pytest.approx(m.mean(), rel=1e-6)
    plain_m = np.array(list(_reference_statistic(rows, 3, weighted=False).values()))
    assert abs(m.mean() - plain_m.mean()) > 1e-4  # the weighting changes the statistic


def _worked_example(fraction_bad: float, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    bad = rng.random(n) < fraction_bad
    m = np.where(bad, 1.0, 0.0) + 0.1 * rng.standard_normal(n)
    return bad, m


@pytest.mark.parametrize("threshold", ["sigma", "mad", "mixture"])
def test_method_worked_example(threshold):
    """80% of pairs at loss 0, 20% at 1 (spread 0.1): mu + 3 sigma lies beyond the bad pairs."""
    bad, m = _worked_example(0.2, 4000)
    miner = BadPairMiner(warmup_epochs=1, threshold=threshold)
    miner.observe(torch.arange(m.size), torch.tensor(m, dtype=torch.float32))
    summary = miner.start_epoch(1)
    assert summary["mu"] == pytest.approx(0.2, abs=0.02)
    assert summary["sigma"] == pytest.approx(0.41, abs=0.02)
    faulty = miner.flags(torch.arange(m.size)).numpy() == FAULTY
    recall = (faulty & bad).sum() / bad.sum()
    false_rate = (faulty & ~bad).sum() / (~bad).sum()
    if threshold == "sigma":
        assert recall < 0.01
    else:
        assert recall > 0.99
        assert false_rate < 0.01


def test_sigma_rule_at_13_percent_flags_few_bad_pairs():
    bad, m = _worked_example(0.13, 20000, seed=1)
    miner = BadPairMiner(warmup_epochs=1, threshold="sigma")
    miner.observe(torch.arange(m.size), torch.tensor(m, dtype=torch.float32))
    miner.start_epoch(1)
    faulty = miner.flags(torch.arange(m.size)).numpy() == FAULTY
    recall = (faulty & bad).sum() / bad.sum()
    mu, sigma = m.mean(), m.std()
    expected = norm.sf(mu + 3 * sigma, loc=1.0, scale=0.1)  # about 0.04
    assert recall == pytest.approx(expected, abs=0.02)


def test_mixture_without_two_populations_falls_back_to_sigma_rule(caplog):
    rng = np.random.default_rng(3)
    m = rng.gamma(4.0, 0.25, size=3000)
    mixture = BadPairMiner(warmup_epochs=1, threshold="mixture")
    sigma = BadPairMiner(warmup_epochs=1, threshold="sigma")
    with caplog.at_level(logging.WARNING):
        for miner in (mixture, sigma):
            miner.observe(torch.arange(m.size), torch.tensor(m, dtype=torch.float32))
            miner.start_epoch(1)
    assert mixture.summary()["mix_separation"] < 2.0
    assert mixture.summary()["rule_applied"] == "sigma"
    ids = torch.arange(m.size)
    torch.testing.assert_close(mixture.flags(ids), sigma.flags(ids), rtol=0, atol=0)
    assert "not separated" in caplog.text


def test_fit_two_gaussians_matches_sklearn_on_overlapping_components():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0.0, 1.0, 700), rng.normal(2.5, 0.6, 300)])
    weights, means, stds, _ = fit_two_gaussians(torch.tensor(x), max_iter=5000, tol=1e-13)
    gm = _sklearn_mixture(x)
    order = np.argsort(gm.means_.ravel())
    # both stop near the same fixed point (different stopping rules): agree to 1e-5
    np.testing.assert_allclose(means.numpy(), gm.means_.ravel()[order], atol=1e-5)
    np.testing.assert_allclose(stds.numpy(), np.sqrt(gm.covariances_[order]), atol=1e-5)
    np.testing.assert_allclose(weights.numpy(), gm.weights_[order], atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_median_matches_numpy(n):
    x = torch.tensor(np.random.default_rng(n).normal(size=n))
    assert float(median(x)) == pytest.approx(float(np.median(x.numpy())))


def _active_miner(threshold: str, weighting: str = "gaussian_kernel") -> BadPairMiner:
    rows = _loss_table()
    miner = BadPairMiner(warmup_epochs=1, threshold=threshold, weighting=weighting, min_pairs=4)
    _run(miner, rows)
    assert miner.active
    return miner


_FLAGGED = torch.tensor([*FAULTY_IDS, *NOISY_IDS, 0])
_MINERS = {rule: _active_miner(rule) for rule in ("sigma", "mad", "mixture")}


@pytest.mark.parametrize("threshold", ["sigma", "mad", "mixture"])
@settings(max_examples=60, deadline=None)
@given(
    losses=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32), min_size=4, max_size=4
    )
)
def test_gaussian_kernel_weights_lie_in_unit_interval(threshold, losses):
    miner = _MINERS[threshold]
    w = miner.weights(_FLAGGED, torch.tensor(losses, dtype=torch.float32))
    assert w.dtype == torch.float32
    assert bool(torch.all(w > 0)) and bool(torch.all(w <= 1))
    clean = miner.flags(_FLAGGED) == 0
    assert bool(torch.all(w[clean] == 1))


def test_gaussian_pdf_is_the_papers_density_and_drop_is_zero():
    rows = [(e, sid, 0.4 * loss) for e, sid, loss in _loss_table()]  # sigma < 0.4
    miners = {}
    for weighting in ("gaussian_pdf", "gaussian_kernel", "drop"):
        miners[weighting] = BadPairMiner(
            warmup_epochs=1, threshold="sigma", weighting=weighting, min_pairs=4
        )
        _run(miners[weighting], rows)
    faulty = torch.tensor(FAULTY_IDS)
    s = miners["gaussian_pdf"].summary()
    assert s["scale"] < 1 / math.sqrt(2 * math.pi)
    losses = torch.tensor([1.2, 1.0])
    expected = norm.pdf(losses.numpy(), s["center"], s["scale"])
    pdf = miners["gaussian_pdf"].weights(faulty, losses)
    np.testing.assert_allclose(pdf.numpy(), expected, rtol=1e-5)
    at_center = torch.full((2,), s["center"])
    assert pdf.max() > 1 or miners["gaussian_pdf"].weights(faulty, at_center).min() > 1
    assert miners["gaussian_kernel"].weights(faulty, at_center).tolist() == [1.0, 1.0]
    assert miners["drop"].weights(faulty, losses).tolist() == [0.0, 0.0]
    assert miners["drop"].weights(torch.tensor([0]), torch.tensor([0.4])).item() == 1.0


def test_weights_keep_dtype_and_device_and_are_detached():
    miner = _active_miner("sigma")
    losses = torch.tensor([3.0, 2.9, 0.01, 1.0], dtype=torch.float64, requires_grad=True)
    w = miner.weights(_FLAGGED, losses)
    assert w.dtype == torch.float64 and not w.requires_grad
    w16 = miner.weights(_FLAGGED, losses.detach().to(torch.bfloat16))
    assert w16.dtype == torch.bfloat16 and bool(torch.all(w16 > 0))


def test_inactive_during_warmup_and_unseen_ids_are_clean():
    rows = _loss_table()
    miner = BadPairMiner(warmup_epochs=2, threshold="sigma", min_pairs=4)
    miner.start_epoch(0)
    _feed(miner, rows, 0)
    summary = miner.start_epoch(1)
    assert not miner.active and summary["n_flagged"] == 0
    assert miner.weights(torch.tensor([30]), torch.tensor([9.0])).item() == 1.0
    _feed(miner, rows, 1)
    miner.start_epoch(2)
    assert miner.active
    ids = torch.tensor([30, 10**6])
    assert miner.flags(ids).tolist() == [FAULTY, 0]
    assert miner.weights(ids, torch.tensor([3.0, 50.0]))[1].item() == 1.0


def test_start_epoch_is_idempotent_and_epochs_go_forward():
    rows = _loss_table()
    miner = BadPairMiner(warmup_epochs=1, threshold="mad", min_pairs=4)
    _run(miner, rows)
    before = miner.state_dict()
    miner.start_epoch(3)
    after = miner.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key
    with pytest.raises(ValueError, match="epochs go forward"):
        miner.start_epoch(2)


def test_guards_flag_nothing_and_warn_once(caplog):
    miner = BadPairMiner(warmup_epochs=1, threshold="sigma")
    with caplog.at_level(logging.WARNING):
        for epoch in range(3):
            miner.start_epoch(epoch)
            miner.observe(torch.arange(50), torch.full((50,), 0.7))
    summary = miner.summary()
    assert not miner.active and summary["n_flagged"] == 0
    assert caplog.text.count("scale is 0.0") == 1
    assert miner.weights(torch.arange(3), torch.tensor([0.0, 0.7, 9.0])).tolist() == [1, 1, 1]

    few = BadPairMiner(warmup_epochs=1, threshold="mixture", min_pairs=16)
    few.observe(torch.arange(5), torch.tensor([0.1, 0.2, 0.3, 5.0, 9.0]))
    assert few.start_epoch(1)["n_flagged"] == 0 and not few.active
    for rule in ("mad", "mixture"):
        flat = BadPairMiner(warmup_epochs=1, threshold=rule)
        flat.observe(torch.arange(40), torch.full((40,), 2.0))
        out = flat.start_epoch(1)
        assert out["n_flagged"] == 0 and not flat.active
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in out.values())


def test_flag_table_and_summary():
    rows = _loss_table()
    miner = _active_miner("mad")
    ref = _reference_statistic(rows, 3, weighted=False)
    table = miner.flag_table()
    assert {row["sample_id"] for row in table} >= {*FAULTY_IDS, *NOISY_IDS}
    flags = miner.flags(torch.arange(N_PAIRS))
    for row in table:
        sid = row["sample_id"]
        assert row["statistic"] == pytest.approx(ref[sid], rel=1e-6)
        assert row["first_epoch_flagged"] in (1, 2, 3)
        assert row["flagged_now"] is bool(flags[sid] > 0)
        if sid in (*FAULTY_IDS, *NOISY_IDS):
            assert row["kind"] == ("faulty" if sid in FAULTY_IDS else "noisy")
            assert row["first_epoch_flagged"] == 1 and row["flagged_now"]
    miner.weights(_FLAGGED, torch.tensor([3.0, 3.0, 0.02, 1.0]))
    summary = miner.summary()
    assert summary["last_n_flagged"] == 3 and summary["last_batch_size"] == 4
    assert 0 < summary["last_mean_weight"] < 1
    assert summary["n_ever_flagged"] == len(table)
    for kind in ("noisy", "faulty"):
        expected = sorted(r["sample_id"] for r in table if r["flagged_now"] and r["kind"] == kind)
        assert miner.flagged_ids(kind) == expected
    assert set(miner.flagged_ids("faulty")) >= set(FAULTY_IDS)
    with pytest.raises(ValueError, match="kind must be one of"):
        miner.flagged_ids("clean")


def test_bad_input_is_refused_with_a_clear_message():
    miner = BadPairMiner()
    with pytest.raises(ValueError, match="sample_ids must be non-negative"):
        miner.observe(torch.tensor([0, -3]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        miner.observe(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="one entry per sample id"):
        miner.observe(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integer ids"):
        miner.observe(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="threshold must be one of"):
        BadPairMiner(threshold="zscore")
    with pytest.raises(ValueError, match="weighting must be one of"):
        BadPairMiner(weighting="pdf")
    with pytest.raises(ValueError, match="statistic must be one of"):
        BadPairMiner(statistic="median")
    with pytest.raises(ValueError, match="beta_faulty"):
        BadPairMiner(beta_faulty=-1.0)


def _calls(rows, epoch):
    """The remaining calls of a run, as (kind, args) tuples: observe, weights, start_epoch."""
    out = []
    for e in range(epoch, 4):
        if e > epoch:
            out.append(("start", e))
        batch = [(sid, loss) for ee, sid, loss in rows if ee == e] if e < 3 else []
        for start in range(0, len(batch), 8):
            chunk = batch[start : start + 8]
            ids = torch.tensor([sid for sid, _ in chunk])
            losses = torch.tensor([loss for _, loss in chunk], dtype=torch.float32)
            out.append(("weights", ids, losses * 0.9))
            out.append(("observe", ids, losses))
    return out


@pytest.mark.parametrize("threshold", ["sigma", "mad", "mixture"])
def test_exact_resume_mid_epoch(threshold):
    rows = _loss_table()
    first = BadPairMiner(
        warmup_epochs=1, threshold=threshold, min_pairs=4, statistic="epoch_weighted"
    )
    first.start_epoch(0)
    _feed(first, rows, 0)
    first.start_epoch(1)
    calls = _calls(rows, 1)
    half = len(calls) // 3
    for call in calls[:half]:
        if call[0] == "observe":
            first.observe(call[1], call[2])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = BadPairMiner()  # default settings: the state's settings must take over
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for call in calls[half:]:
        outs = []
        for miner in (first, resumed):
            if call[0] == "start":
                outs.append(miner.start_epoch(call[1]))
            elif call[0] == "observe":
                miner.observe(call[1], call[2])
                outs.append(None)
            else:
                outs.append((miner.weights(call[1], call[2]), miner.flags(call[1])))
        if call[0] == "weights":
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        else:
            assert outs[0] == outs[1]
    assert first.flag_table() == resumed.flag_table()
    assert first.summary() == resumed.summary()
    assert first.summary()["n_flagged"] > 0


def test_load_state_dict_refuses_foreign_state():
    with pytest.raises(ValueError, match="unknown format"):
        BadPairMiner().load_state_dict({"format": 99})
    state = BadPairMiner().state_dict()
    del state["buffer.hist_sum"]
    with pytest.raises(KeyError, match=r"buffer\.hist_sum"):
        BadPairMiner().load_state_dict(state)


def test_memory_of_a_million_pairs():
    n = 1_000_000
    grown = BadPairMiner(warmup_epochs=1, threshold="mixture")
    generator = torch.Generator().manual_seed(0)
    for chunk in torch.randperm(n, generator=generator).split(100_000):
        grown.observe(chunk, torch.rand(chunk.numel(), generator=generator))
    worst = BadPairMiner()
    for chunk in torch.arange(n).split(100_000):  # ascending ids: the most growth steps
        worst.observe(chunk, torch.ones(chunk.numel()))
    sized = BadPairMiner(capacity=n)
    sized.observe(torch.arange(n), torch.ones(n))
    for miner in (grown, worst, sized):
        held = sum(t.numel() * t.element_size() for t in miner._buffers.values())
        assert held == miner.memory_bytes
        assert held <= 32 * 10**6
        saved = sum(
            v.numel() * v.element_size()
            for v in miner.state_dict().values()
            if isinstance(v, torch.Tensor)
        )
        assert saved <= 24 * n
    assert sized.memory_bytes == 24 * n
    summary = grown.start_epoch(1)
    assert summary["n_seen"] == n


def test_statistics_are_the_per_pair_means_of_finished_epochs():
    miner = BadPairMiner(warmup_epochs=1)
    miner.observe(torch.tensor([4, 1, 9]), torch.tensor([1.0, 2.0, 3.0]))
    miner.observe(torch.tensor([4]), torch.tensor([3.0]))  # pair 4 twice in epoch 0: mean 2
    miner.start_epoch(1)
    miner.observe(torch.tensor([4, 1]), torch.tensor([4.0, 0.0]))
    miner.observe(torch.tensor([2]), torch.tensor([5.0]))  # unfinished epoch: not counted yet
    ids, m = miner.statistics()
    assert ids.tolist() == [1, 4, 9]
    np.testing.assert_allclose(m.numpy(), [2.0, 2.0, 3.0])
    miner.start_epoch(2)
    ids, m = miner.statistics()
    assert ids.tolist() == [1, 2, 4, 9]
    np.testing.assert_allclose(m.numpy(), [(2.0 + 0.0) / 2, 5.0, (2.0 + 4.0) / 2, 3.0])
