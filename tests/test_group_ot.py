"""GroupSinkhorn against geomloss called directly, and exact 1-D OT against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from geomloss import SamplesLoss
from scipy.stats import wasserstein_distance

from fairvlm_hf.objective.group_ot import GroupSinkhorn, exact_1d_ot


def _batch(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    race = torch.tensor(rng.integers(0, 3, n))
    gender = torch.tensor(rng.integers(0, 2, n))
    language = torch.tensor(rng.integers(-1, 3, n))
    values = torch.tensor(rng.gamma(2.0, 1.0, n), dtype=torch.float32) + 0.3 * race  # shifted
    return values, {"race": race, "gender": gender, "language": language}


def _direct(group: torch.Tensor, values: torch.Tensor, blur=0.05, scaling=0.9) -> torch.Tensor:
    diameter = max(float((values.max() - values.min()).detach()), blur)
    loss = SamplesLoss(
        "sinkhorn", p=2, blur=blur, scaling=scaling, diameter=diameter, backend="tensorized"
    )
    return loss(group.reshape(-1, 1), values.reshape(-1, 1))


def test_terms_equal_geomloss_and_R_is_their_sum():
    values, groups = _batch()
    module = GroupSinkhorn(["race", "gender", "language"])
    total, terms = module(values, groups)
    expected_keys = {f"race={g}" for g in range(3)} | {f"gender={g}" for g in range(2)}
    expected_keys |= {
        f"language={g}" for g in range(3) if int((groups["language"] == g).sum()) >= 2
    }
    assert set(terms) == expected_keys
    for key, term in terms.items():
        name, code = key.split("=")
        members = values[groups[name] == int(code)]
        torch.testing.assert_close(term, _direct(members, values), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(total, torch.stack(list(terms.values())).sum())
    assert total.dim() == 0 and total.requires_grad is False  # values carry no grad here


def test_gradient_flows_through_both_sides_as_in_geomloss():
    values, groups = _batch()
    module = GroupSinkhorn(["race"])
    x = values.clone().requires_grad_(True)
    total, _ = module(x, groups)
    total.backward()

    y = values.clone().requires_grad_(True)
    sum(_direct(y[groups["race"] == g], y) for g in range(3)).backward()
    # batched (padded) and separate geomloss calls differ only by float32 rounding
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)

    # a member of race=0 and a non-member: with one group only, the non-member's gradient comes
    # from the "whole batch" side alone
    only = GroupSinkhorn(["race"], min_group_size=1)
    z = values.clone().requires_grad_(True)
    single = {"race": torch.where(groups["race"] == 0, 0, -1)}
    only(z, single)[0].backward()
    member = int(torch.nonzero(single["race"] == 0)[0])
    outsider = int(torch.nonzero(single["race"] == -1)[0])
    assert z.grad[member].abs() > 0 and z.grad[outsider].abs() > 0


def test_unknown_is_no_group_and_min_group_size_is_respected():
    values = torch.tensor([0.1, 0.5, 0.9, 1.3, 2.0, 2.2, 3.0, 0.7])
    groups = {"language": torch.tensor([0, 0, 0, 1, -1, -1, -1, 2])}
    total, terms = GroupSinkhorn(["language"], min_group_size=2)(values, groups)
    assert set(terms) == {"language=0"}  # group 1 and 2 have one member, -1 is unknown
    torch.testing.assert_close(total, _direct(values[:3], values))
    _, terms_three = GroupSinkhorn(["language"], min_group_size=4)(values, groups)
    assert terms_three == {}
    _, terms_one = GroupSinkhorn(["language"], min_group_size=1)(values, groups)
    assert set(terms_one) == {"language=0", "language=1", "language=2"}


def test_no_group_in_batch_gives_zero_that_still_backpropagates():
    values = torch.tensor([0.3, 0.8, 1.1], requires_grad=True)
    total, terms = GroupSinkhorn(["ethnicity"])(values, {"ethnicity": torch.full((3,), -1)})
    assert terms == {} and total.item() == 0.0
    total.backward()
    assert values.grad is not None and torch.all(values.grad == 0)


@pytest.mark.parametrize("method", ["sinkhorn", "exact_1d"])
def test_identical_distributions_give_zero(method):
    base = torch.distributions.Gamma(2.0, 1.0).sample((20,))
    values = torch.cat([base, base])
    groups = {"race": torch.cat([torch.zeros(20), torch.ones(20)]).long()}
    total, terms = GroupSinkhorn(["race"], method=method)(values, groups)
    scale = float(values.var())
    assert set(terms) == {"race=0", "race=1"}
    # the group holds exactly the batch's distribution: 0 up to Sinkhorn's convergence
    assert abs(total.item()) < (1e-5 * scale if method == "sinkhorn" else 1e-7)


@pytest.mark.parametrize("method", ["sinkhorn", "exact_1d"])
def test_all_identical_values_are_finite_zero(method):
    values = torch.full((16,), 1.7, requires_grad=True)
    groups = {"gender": torch.arange(16) % 2}
    total, _ = GroupSinkhorn(["gender"], method=method)(values, groups)
    assert math.isfinite(total.item()) and abs(total.item()) < 1e-6
    total.backward()
    assert torch.all(torch.isfinite(values.grad))


@pytest.mark.parametrize("method", ["sinkhorn", "exact_1d"])
def test_huge_values_stay_finite(method):
    values, groups = _batch(32)
    big = (values * 1e4).requires_grad_(True)
    total, _ = GroupSinkhorn(["race"], method=method)(big, groups)
    assert math.isfinite(total.item()) and total.item() > 0
    total.backward()
    assert torch.all(torch.isfinite(big.grad))
    if method == "exact_1d":
        # OT scales with the square of the values
        small, _ = GroupSinkhorn(["race"], method=method)(values, groups)
        assert total.item() == pytest.approx(small.item() * 1e8, rel=1e-4)


def test_float32_under_autocast():
    values, groups = _batch()
    half = values.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = GroupSinkhorn(["race"])(half, groups)
    assert total.dtype == torch.float32
    as_float = half.float()
    expected = sum(_direct(as_float[groups["race"] == g], as_float) for g in range(3))
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-8)


def _hand_w2(x: np.ndarray, y: np.ndarray) -> float:
    """W_2^2 / 2 by hand: repeat each sample to a common size, then pair sorted values."""
    n, m = len(x), len(y)
    lcm = n * m // math.gcd(n, m)
    xs = np.sort(np.repeat(x, lcm // n))
    ys = np.sort(np.repeat(y, lcm // m))
    return float(np.mean((xs - ys) ** 2) / 2)


@pytest.mark.parametrize(("n", "m"), [(5, 5), (4, 12), (6, 9), (7, 3), (1, 8)])
def test_exact_1d_matches_hand_computation(n, m):
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.gamma(2.0, 1.0, n), rng.normal(1.0, 0.5, m)
    got = exact_1d_ot(torch.tensor(x), torch.tensor(y))
    assert got.item() == pytest.approx(_hand_w2(x, y), rel=1e-12)
    w1 = exact_1d_ot(torch.tensor(x), torch.tensor(y), p=1)
    assert w1.item() == pytest.approx(wasserstein_distance(x, y), rel=1e-12)


def test_exact_1d_matches_geomloss_at_small_blur():
    """At blur 1e-3 and scaling 0.99 the Sinkhorn divergence is within 3% of W_2^2 / 2.

    The entropic bias at epsilon = 1e-6 is negligible for samples spaced ~0.02 apart; the gap
    that remains is geomloss's epsilon-scaling, which makes one Sinkhorn update per
    temperature and so stops slightly short of convergence: measured 1.4% below exact OT at
    scaling 0.99 (0.3% at 0.999), the same in float64 and at blur 1e-4, on 13 of 40 values in
    [0, 1]. Group sizes here are 11 to 24, where the shortfall is largest.
    """
    values, groups = _batch(40, seed=3)
    values = values / values.max()
    sinkhorn = GroupSinkhorn(["race", "gender"], blur=1e-3, scaling=0.99)
    exact = GroupSinkhorn(["race", "gender"], method="exact_1d")
    _, terms_s = sinkhorn(values, groups)
    _, terms_e = exact(values, groups)
    assert set(terms_s) == set(terms_e)
    for key in terms_s:
        assert terms_s[key].item() == pytest.approx(terms_e[key].item(), rel=3e-2)
        assert terms_s[key].item() < terms_e[key].item()  # the annealing stops short
    # and the gradients agree in direction and size
    x = values.clone().requires_grad_(True)
    sinkhorn(x, groups)[0].backward()
    y = values.clone().requires_grad_(True)
    exact(y, groups)[0].backward()
    cosine = torch.nn.functional.cosine_similarity(x.grad, y.grad, dim=0)
    assert cosine > 0.99


def test_default_settings_against_exact_ot():
    """The defaults (blur 0.05, scaling 0.9) stop short of exact OT by the annealing's shortfall,
    measured up to about 16% for a group close to the batch: allow 25%, and check that it is the
    annealing (scaling 0.99 at the same blur is within 3%), not the blur."""
    values, groups = _batch(128, seed=4)
    _, default = GroupSinkhorn(["race"])(values, groups)
    _, fine = GroupSinkhorn(["race"], scaling=0.99)(values, groups)
    _, exact = GroupSinkhorn(["race"], method="exact_1d")(values, groups)
    for key in exact:
        assert default[key].item() == pytest.approx(exact[key].item(), rel=0.25)
        assert fine[key].item() == pytest.approx(exact[key].item(), rel=3e-2)
        assert default[key].item() < fine[key].item() < exact[key].item()


def test_bad_input_is_refused_with_a_clear_message():
    values, groups = _batch(8)
    with pytest.raises(KeyError, match="ethnicity"):
        GroupSinkhorn(["ethnicity"])(values, groups)
    with pytest.raises(ValueError, match="shape"):
        GroupSinkhorn(["race"])(values, {"race": groups["race"][:4]})
    with pytest.raises(ValueError, match="NaN"):
        GroupSinkhorn(["race"])(torch.full((8,), float("nan")), groups)
    with pytest.raises(ValueError, match="code -2"):
        GroupSinkhorn(["race"])(values, {"race": torch.full((8,), -2)})
    with pytest.raises(TypeError, match="integer codes"):
        GroupSinkhorn(["race"])(values, {"race": groups["race"].float()})
    with pytest.raises(ValueError, match="method"):
        GroupSinkhorn(["race"], method="emd")
    with pytest.raises(TypeError, match="sequence of names"):
        GroupSinkhorn("race")
