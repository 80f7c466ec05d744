"""Dynamic Bad Pair Mining: remember each pair's loss, flag outliers, down-weight them.

For every ``sample_id`` the miner keeps running sums of the raw per-pair loss (the current
epoch's sum and count, and the history of per-epoch means, plain and epoch-weighted), never a
growing list: about 24 bytes per pair. At the start of each epoch ``e >= warmup_epochs`` it
computes each pair's statistic ``m`` (the mean of its per-epoch mean losses over epochs ``< e``,
or their linearly epoch-weighted mean), fits a threshold rule to the ``m`` of all pairs seen and
flags pairs as *noisy* (suspiciously easy, low ``m``) or *faulty* (mismatched, high ``m``).
During epoch ``e`` a flagged pair's loss is multiplied by a weight computed from its current
loss; unflagged pairs keep weight 1.

Threshold rules (``threshold``):
    ``sigma``   the papers' rule: ``mu`` and population ``sigma`` of ``m``; noisy when
                ``m <= mu - beta_noisy * sigma``, faulty when ``m >= mu + beta_faulty * sigma``.
                It only works while bad pairs are rare: with 20% bad pairs, ``mu + 3 sigma``
                lies beyond the bad pairs themselves.
    ``mad``     the same with the median and ``1.4826 * MAD``, robust to contamination.
    ``mixture`` a two-component 1-D Gaussian mixture fitted to ``m`` by EM (as
                noisy-correspondence methods fit per-sample losses). Faulty when the posterior of
                the high-mean component exceeds 0.5; noisy when ``m <= mu_low - beta_noisy *
                sigma_low``. A two-component fit always splits the data, even when there is
                one population: a skewed unimodal loss distribution is cut in two (and would
                lose its upper half), and a few outliers on both sides become one wide
                component. So when the components are not separated (Ashman's
                ``D = sqrt(2) |mu_high - mu_low| / sqrt(var_low + var_high) < min_separation``,
                measured about 1.2-1.6 on gamma and log-normal samples, 10 on the worked
                example of 20% bad pairs) the rule falls back to ``sigma``, which is right
                exactly when bad pairs are rare.

Weights of flagged pairs (``weighting``), ``l`` being the pair's current loss and
``center, scale`` the rule's ``mu, sigma`` (median and ``1.4826 * MAD`` for ``mad``; the low
component for mixture-noisy pairs):
    ``gaussian_kernel``  ``exp(-(l - center)^2 / (2 scale^2))``, in ``(0, 1]`` (clamped at the
                         dtype's smallest normal number so a flagged pair never vanishes).
    ``gaussian_pdf``     the papers' density ``exp(...) / (sqrt(2 pi) scale)``: unbounded, so a
                         "bad" pair can be up-weighted when ``scale < 0.4``; for reproduction only.
    ``drop``             ``0``.
A mixture-faulty pair's weight is the posterior of the low-loss component at its current loss
(clipped to the interval between the two component means, where the posterior is monotone:
with unequal variances it turns back up in the tail of the wider component); with
``drop`` it is 0.

Guards: with fewer than ``min_pairs`` pairs seen, or a zero or non-finite scale, nothing is
flagged for the epoch and a warning is logged once per cause.

Under several processes, call ``observe`` with the globally gathered ids and losses so that
every rank holds the same memory, and so the same flags. The state lives on the CPU.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

CLEAN, NOISY, FAULTY = 0, 1, 2
KIND_NAMES: tuple[str, str, str] = ("clean", "noisy", "faulty")
THRESHOLDS = ("mixture", "sigma", "mad")
WEIGHTINGS = ("gaussian_kernel", "gaussian_pdf", "drop")
STATISTICS = ("mean", "epoch_weighted")
MAD_TO_SIGMA = 1.4826
STATE_FORMAT = 1

_INT16_MAX = 32767
_GROWTH = 1.25
#: Per-pair buffers: name -> (dtype, fill value).
_BUFFERS: dict[str, tuple[torch.dtype, int]] = {
    "cur_sum": (torch.float32, 0),
    "cur_count": (torch.int16, 0),
    "hist_sum": (torch.float32, 0),
    "hist_wsum": (torch.float32, 0),
    "hist_count": (torch.int16, 0),
    "hist_wnorm": (torch.int32, 0),
    "flags": (torch.uint8, 0),
    "last_kind": (torch.uint8, 0),
    "first_flagged": (torch.int16, -1),
}
_CONFIG_KEYS = (
    "warmup_epochs",
    "threshold",
    "beta_noisy",
    "beta_faulty",
    "weighting",
    "statistic",
    "min_pairs",
    "min_separation",
    "mixture_max_iter",
    "mixture_tol",
)
_PARAM_KEYS = (
    "noisy_center",
    "noisy_scale",
    "faulty_center",
    "faulty_scale",
    "mix_weight_low",
    "mix_mean_low",
    "mix_std_low",
    "mix_weight_high",
    "mix_mean_high",
    "mix_std_high",
)


def median(x: Tensor) -> Tensor:
    """Median of a 1-D tensor, the mean of the two middle values for an even count (as numpy).

    Uses selection (``kthvalue``), linear in the size, not a sort.
    """
    n = x.numel()
    if n == 0:
        raise ValueError("median of an empty tensor")
    upper = x.kthvalue(n // 2 + 1).values
    if n % 2:
        return upper
    return (x.kthvalue(n // 2).values + upper) / 2


def fit_two_gaussians(
    x: Tensor, max_iter: int = 100, tol: float = 1e-7
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Fit a two-component 1-D Gaussian mixture to ``x`` by EM (float64, vectorised).

    Deterministic initialisation: means at the values of rank ``ceil(n / 4)`` and
    ``ceil(3 n / 4)``, both variances equal to the variance of ``x``, equal weights. Stops when
    no weight, mean or variance (of the standardised values) moves by more than ``tol``, or
    after ``max_iter`` iterations. Variances are floored at ``1e-6`` times the variance of ``x``
    so that a component cannot collapse onto one point. The log-ratio of the two weighted
    component densities is a quadratic in ``x``, so an iteration is one in-place pass for the
    posteriors and three reductions for the moments. Returns ``(weights, means, stds,
    iterations)``, each of shape ``(2,)``, components sorted by mean (low first).
    """
    data = x.detach().to(torch.float64).reshape(-1)
    n = data.numel()
    if n < 2:
        raise ValueError(f"fit_two_gaussians needs at least 2 values, got {n}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("fit_two_gaussians: x contains NaN or infinite values")
    shift = data.mean()
    spread = data.std(unbiased=False)
    if not spread > 0:
        raise ValueError("fit_two_gaussians: all values are identical")
    z = (data - shift).div_(spread)
    z2 = z * z
    resp = torch.empty_like(z)
    total_1, total_2 = float(z.sum()), float(z2.sum())
    floor = 1e-6
    mean = [float(z.kthvalue(max(1, math.ceil(n / 4))).values)]
    mean.append(float(z.kthvalue(max(1, math.ceil(3 * n / 4))).values))
    var = [1.0, 1.0]
    weight = [0.5, 0.5]
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007
        # log(w_k N(z; m_k, v_k)) = c_k - (z - m_k)^2 / (2 v_k): the log-ratio is a quadratic.
        quad, lin, const = [], [], []
        for k in range(2):
            quad.append(-0.5 / var[k])
            lin.append(mean[k] / var[k])
            const.append(math.log(weight[k]) - 0.5 * math.log(var[k]) - mean[k] ** 2 / (2 * var[k]))
        torch.mul(z, quad[1] - quad[0], out=resp)
        resp.add_(lin[1] - lin[0]).mul_(z).add_(const[1] - const[0]).sigmoid_()
        count_high = float(resp.sum())
        first_high = float(torch.dot(resp, z))
        second_high = float(torch.dot(resp, z2))
        moments = (
            (n - count_high, total_1 - first_high, total_2 - second_high),
            (count_high, first_high, second_high),
        )
        change = 0.0
        for k, (count, first, second) in enumerate(moments):
            count = max(count, 1e-300)
            new_weight = max(count / n, 1e-300)
            new_mean = first / count
            new_var = max(second / count - new_mean**2, floor)
            change = max(
                change,
                abs(new_weight - weight[k]),
                abs(new_mean - mean[k]),
                abs(new_var - var[k]),
            )
            weight[k], mean[k], var[k] = new_weight, new_mean, new_var
        if change < tol:
            break
    weights = torch.tensor(weight, dtype=torch.float64)
    means = shift + spread * torch.tensor(mean, dtype=torch.float64)
    stds = spread * torch.tensor(var, dtype=torch.float64).sqrt()
    order = torch.argsort(means)
    return weights[order], means[order], stds[order], iterations


def _log_component(x: Tensor, weight: float, mean: float, std: float) -> Tensor:
    return (
        math.log(weight)
        - math.log(std)
        - 0.5 * math.log(2 * math.pi)
        - (x - mean) ** 2 / (2 * std**2)
    )


def _as_ids(sample_ids: Any, name: str = "sample_ids") -> Tensor:
    if not isinstance(sample_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(sample_ids)}")
    if sample_ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(sample_ids.shape)}")
    if sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {sample_ids.dtype}")
    ids = sample_ids.detach().to("cpu", torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got {int(ids.min())}")
    return ids


def _as_losses(losses: Any, ids: Tensor, name: str = "losses") -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(losses)}")
    if losses.dim() != 1 or losses.shape[0] != ids.shape[0]:
        raise ValueError(
            f"{name} must be 1-D with one entry per sample id ({ids.shape[0]}), "
            f"got shape {tuple(losses.shape)}"
        )
    if not losses.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {losses.dtype}")
    return losses.detach()


class BadPairMiner:
    """Per-pair loss memory, bad-pair flags and their weights (Dynamic Bad Pair Mining).

    Args:
        warmup_epochs: epochs before the first flags (epochs ``< warmup_epochs`` only record).
        threshold: ``"mixture"`` (default), ``"sigma"`` (the papers' rule) or ``"mad"``.
        beta_noisy: multiplier of the scale below the center for noisy pairs (DBPM code: 2).
        beta_faulty: multiplier of the scale above the center for faulty pairs (DBPM code: 3;
            unused by the mixture rule unless it falls back to ``sigma``).
        weighting: ``"gaussian_kernel"`` (bounded, default), ``"gaussian_pdf"`` or ``"drop"``.
        statistic: ``"mean"`` of the per-epoch mean losses, or ``"epoch_weighted"``: their mean
            weighted by ``epoch + 1`` (normalised; DBPM's code leaves it unnormalised, which
            scales every ``m`` by the same factor: identical flags, but ``mu`` and ``sigma``
            shrink against the current losses that the weights compare with them).
        capacity: number of ids to allocate at once (the dataset size, when known); the memory
            otherwise grows by 25% steps to the largest id seen.
        min_pairs: fewer pairs seen than this flags nothing.
        min_separation: Ashman's D below which the mixture rule falls back to ``sigma``.
        mixture_max_iter, mixture_tol: EM stopping rule of the mixture fit.
    """

    def __init__(
        self,
        warmup_epochs: int = 1,
        threshold: str = "mixture",
        beta_noisy: float = 2.0,
        beta_faulty: float = 3.0,
        weighting: str = "gaussian_kernel",
        statistic: str = "mean",
        capacity: int = 0,
        min_pairs: int = 16,
        min_separation: float = 2.0,
        mixture_max_iter: int = 100,
        mixture_tol: float = 1e-7,
    ) -> None:
        config = {
            "warmup_epochs": warmup_epochs,
            "threshold": threshold,
            "beta_noisy": beta_noisy,
            "beta_faulty": beta_faulty,
            "weighting": weighting,
            "statistic": statistic,
            "min_pairs": min_pairs,
            "min_separation": min_separation,
            "mixture_max_iter": mixture_max_iter,
            "mixture_tol": mixture_tol,
        }
        self._set_config(config)
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {capacity!r}")
        self._buffers: dict[str, Tensor] = {
            name: torch.full((capacity,), fill, dtype=dtype)
            for name, (dtype, fill) in _BUFFERS.items()
        }
        self._size = 0
        self._epoch = 0
        self._active = False
        self._params: dict[str, float] = {}
        self._stats: dict[str, float | int | str] = {}
        self._counts = {"n_noisy": 0, "n_faulty": 0, "n_ever_flagged": 0}
        self._last: dict[str, float | int] = {
            "last_batch_size": 0,
            "last_n_flagged": 0,
            "last_mean_weight": 1.0,
        }
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ configuration
    def _set_config(self, config: dict[str, Any]) -> None:
        if not isinstance(config["warmup_epochs"], int) or config["warmup_epochs"] < 0:
            raise ValueError(
                f"warmup_epochs must be a non-negative int, got {config['warmup_epochs']!r}"
            )
        if config["threshold"] not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {config['threshold']!r}")
        if config["weighting"] not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {config['weighting']!r}")
        if config["statistic"] not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {config['statistic']!r}")
        for key in ("beta_noisy", "beta_faulty", "min_separation"):
            value = config[key]
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if not isinstance(config["min_pairs"], int) or config["min_pairs"] < 2:
            raise ValueError(f"min_pairs must be an int >= 2, got {config['min_pairs']!r}")
        if not isinstance(config["mixture_max_iter"], int) or config["mixture_max_iter"] < 1:
            raise ValueError(
                f"mixture_max_iter must be a positive int, got {config['mixture_max_iter']!r}"
            )
        if not config["mixture_tol"] >= 0:
            raise ValueError(f"mixture_tol must be >= 0, got {config['mixture_tol']!r}")
        self.warmup_epochs: int = config["warmup_epochs"]
        self.threshold: str = config["threshold"]
        self.beta_noisy = float(config["beta_noisy"])
        self.beta_faulty = float(config["beta_faulty"])
        self.weighting: str = config["weighting"]
        self.statistic: str = config["statistic"]
        self.min_pairs: int = config["min_pairs"]
        self.min_separation = float(config["min_separation"])
        self.mixture_max_iter: int = config["mixture_max_iter"]
        self.mixture_tol = float(config["mixture_tol"])

    def _config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

    # ------------------------------------------------------------------ properties
    @property
    def active(self) -> bool:
        """Whether flags are in force for the current epoch."""
        return self._active

    @property
    def epoch(self) -> int:
        """The epoch whose losses are being recorded."""
        return self._epoch

    @property
    def capacity(self) -> int:
        """Number of ids the per-pair buffers can hold without growing."""
        return self._buffers["flags"].shape[0]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the per-pair buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    # ------------------------------------------------------------------ memory
    def _grow(self, needed: int) -> None:
        old = self.capacity
        if needed <= old:
            return
        new = max(needed, int(old * _GROWTH) + 1)
        for name, (dtype, fill) in _BUFFERS.items():
            grown = torch.full((new,), fill, dtype=dtype)
            grown[:old] = self._buffers[name]
            self._buffers[name] = grown

    def observe(self, sample_ids: Tensor, losses: Tensor) -> None:
        """Record raw (unweighted) per-pair losses of the current epoch.

        Pass the losses of the whole global batch (gathered over processes), detached or not;
        ids may repeat and come in any order. Raises on a negative id or a non-finite loss.
        """
        ids = _as_ids(sample_ids)
        values = _as_losses(losses, ids).to("cpu", torch.float32)
        if ids.numel() == 0:
            return
        if not bool(torch.isfinite(values).all()):
            bad = ids[~torch.isfinite(values)][:5].tolist()
            raise ValueError(f"losses contain NaN or infinite values (sample ids {bad} ...)")
        top = int(ids.max()) + 1
        self._grow(top)
        self._size = max(self._size, top)
        unique, repeats = torch.unique(ids, return_counts=True)
        count = self._buffers["cur_count"]
        if int((count[unique].to(torch.int64) + repeats).max()) > _INT16_MAX:
            raise OverflowError(
                f"a sample id was observed more than {_INT16_MAX} times in epoch {self._epoch}"
            )
        self._buffers["cur_sum"].index_add_(0, ids, values)
        count.index_add_(0, unique, repeats.to(torch.int16))

    def _fold(self) -> None:
        """Move the current epoch's sums into the history (one mean per observed pair)."""
        n = self._size
        b = {name: t[:n] for name, t in self._buffers.items()}
        seen = b["cur_count"] > 0
        mean = b["cur_sum"] / b["cur_count"].clamp(min=1).to(torch.float32)
        weight = self._epoch + 1
        b["hist_sum"].add_(mean)
        b["hist_wsum"].add_(mean * weight)
        b["hist_count"].add_(seen.to(torch.int16))
        b["hist_wnorm"].add_(seen.to(torch.int32) * weight)
        b["cur_sum"].zero_()
        b["cur_count"].zero_()

    def _statistic_all(self) -> tuple[Tensor, Tensor]:
        """The statistic ``m`` of every id below ``size`` (float64) and the mask of ids seen."""
        n = self._size
        b = self._buffers
        seen = b["hist_count"][:n] > 0
        if self.statistic == "mean":
            num, den = b["hist_sum"][:n], b["hist_count"][:n]
        else:
            num, den = b["hist_wsum"][:n], b["hist_wnorm"][:n]
        m = num.to(torch.float64) / den.clamp(min=1).to(torch.float64)
        return m, seen

    def statistics(self) -> tuple[Tensor, Tensor]:
        """The ids of every pair seen in a finished epoch and their statistic ``m`` (float64).

        For reports (e.g. how well ``m`` separates known bad pairs from clean ones); the flags
        use the same values.
        """
        m, seen = self._statistic_all()
        ids = torch.arange(self._size, dtype=torch.long)
        return ids[seen], m[seen]

    # ------------------------------------------------------------------ epochs and flags
    def start_epoch(self, epoch: int) -> dict[str, Any]:
        """Begin ``epoch``: fold finished epochs into the history and, from ``warmup_epochs``
        on, recompute the statistic, the rule's center and scale, and the flags.

        Calling it again with the current epoch changes nothing. Returns ``summary()``.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise TypeError(f"epoch must be an int, got {type(epoch)}")
        if not 0 <= epoch <= _INT16_MAX:
            raise ValueError(f"epoch must lie in [0, {_INT16_MAX}], got {epoch}")
        if epoch < self._epoch:
            raise ValueError(f"epochs go forward: the miner is at epoch {self._epoch}, got {epoch}")
        if epoch > self._epoch:
            self._fold()
            self._epoch = epoch
        if epoch >= self.warmup_epochs:
            self._recompute()
        else:
            self._clear_flags()
            self._stats = {"n_seen": int((self._buffers["hist_count"][: self._size] > 0).sum())}
        summary = self.summary()
        logger.info(
            "bad-pair mining, epoch %d: active=%s, %d noisy, %d faulty of %d pairs seen",
            epoch,
            summary["active"],
            summary["n_noisy"],
            summary["n_faulty"],
            summary["n_seen"],
        )
        return summary

    def _clear_flags(self) -> None:
        self._buffers["flags"].zero_()
        self._active = False
        self._params = {}
        self._counts["n_noisy"] = 0
        self._counts["n_faulty"] = 0

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            logger.warning(message)

    def _recompute(self) -> None:
        self._clear_flags()
        m_all, seen = self._statistic_all()
        m = m_all[seen]
        n_seen = int(m.numel())
        self._stats = {"n_seen": n_seen}
        if n_seen < self.min_pairs:
            self._warn_once(
                "few",
                f"bad-pair mining: {n_seen} pairs seen, fewer than min_pairs={self.min_pairs}; "
                "nothing is flagged until more pairs have a history",
            )
            return
        mu = float(m.mean())
        sigma = float(m.std(unbiased=False))
        self._stats.update({"mu": mu, "sigma": sigma})
        rule = self.threshold
        mixture = None
        if rule == "mixture":
            mixture = self._fit_mixture(m)
            if mixture is None:
                rule = "sigma"
        if rule == "sigma":
            center, scale = mu, sigma
        elif rule == "mad":
            center = float(median(m))
            scale = MAD_TO_SIGMA * float(median((m - center).abs()))
        else:
            assert mixture is not None
            center, scale = mixture["mix_mean_low"], mixture["mix_std_low"]
        self._stats["rule_applied"] = rule
        if not (math.isfinite(scale) and scale > 0):
            self._warn_once(
                f"scale-{rule}",
                f"bad-pair mining: the {rule} rule's scale is {scale} (statistics nearly "
                "identical); nothing is flagged",
            )
            return
        noisy = m <= center - self.beta_noisy * scale
        if mixture is not None:
            faulty = self._posterior_high(m, mixture) > 0.5
        else:
            faulty = m >= center + self.beta_faulty * scale
        faulty &= ~noisy
        kinds = noisy.to(torch.uint8) * NOISY + faulty.to(torch.uint8) * FAULTY
        self._apply_flags(seen, kinds)
        self._params = {"noisy_center": center, "noisy_scale": scale}
        self._stats.update(
            {"center": center, "scale": scale, "noisy_bound": center - self.beta_noisy * scale}
        )
        if mixture is None:
            self._params.update({"faulty_center": center, "faulty_scale": scale})
            self._stats["faulty_bound"] = center + self.beta_faulty * scale
        else:
            self._params.update(mixture)
        self._active = True

    def _fit_mixture(self, m: Tensor) -> dict[str, float] | None:
        if not float(m.std(unbiased=False)) > 0:
            return None
        weights, means, stds, iterations = fit_two_gaussians(
            m, max_iter=self.mixture_max_iter, tol=self.mixture_tol
        )
        separation = float(
            math.sqrt(2) * (means[1] - means[0]) / torch.sqrt(stds[0] ** 2 + stds[1] ** 2)
        )
        self._stats.update({"mix_separation": separation, "mix_iterations": iterations})
        params = {
            "mix_weight_low": float(weights[0]),
            "mix_mean_low": float(means[0]),
            "mix_std_low": float(stds[0]),
            "mix_weight_high": float(weights[1]),
            "mix_mean_high": float(means[1]),
            "mix_std_high": float(stds[1]),
        }
        self._stats.update(params)
        usable = all(math.isfinite(v) for v in params.values()) and min(weights.tolist()) > 0
        if not usable or not separation >= self.min_separation:
            self._warn_once(
                "mixture-fallback",
                f"bad-pair mining: the two mixture components are not separated (Ashman's D = "
                f"{separation:.3g} < {self.min_separation}); using the sigma rule this epoch",
            )
            return None
        return params

    @staticmethod
    def _posterior_high(x: Tensor, mix: dict[str, float]) -> Tensor:
        """Posterior of the high-mean component at ``x`` clipped to ``[mean_low, mean_high]``."""
        clipped = x.clamp(min=mix["mix_mean_low"], max=mix["mix_mean_high"])
        low = _log_component(
            clipped, mix["mix_weight_low"], mix["mix_mean_low"], mix["mix_std_low"]
        )
        high = _log_component(
            clipped, mix["mix_weight_high"], mix["mix_mean_high"], mix["mix_std_high"]
        )
        return torch.sigmoid(high - low)

    def _apply_flags(self, seen: Tensor, kinds: Tensor) -> None:
        n = self._size
        flags = self._buffers["flags"][:n]
        flags[seen] = kinds
        flagged = flags > 0
        first = self._buffers["first_flagged"][:n]
        first[flagged & (first < 0)] = self._epoch
        last_kind = self._buffers["last_kind"][:n]
        last_kind[flagged] = flags[flagged]
        self._counts["n_noisy"] = int((kinds == NOISY).sum())
        self._counts["n_faulty"] = int((kinds == FAULTY).sum())
        self._counts["n_ever_flagged"] = int((first >= 0).sum())

    # ------------------------------------------------------------------ queries
    def flags(self, sample_ids: Tensor) -> Tensor:
        """Kind of each pair in force this epoch: 0 clean, 1 noisy, 2 faulty (LongTensor).

        Ids never seen are clean. The result lies on the device of ``sample_ids``.
        """
        ids = _as_ids(sample_ids)
        out = torch.zeros(ids.shape, dtype=torch.int64)
        inside = ids < self.capacity
        out[inside] = self._buffers["flags"][ids[inside]].to(torch.int64)
        return out.to(sample_ids.device)

    def flagged_ids(self, kind: str = "faulty") -> list[int]:
        """Sample ids flagged ``kind`` ("noisy" or "faulty") this epoch, in increasing order."""
        if kind not in KIND_NAMES[1:]:
            raise ValueError(f"kind must be one of {list(KIND_NAMES[1:])}, got {kind!r}")
        code = KIND_NAMES.index(kind)
        return torch.nonzero(self._buffers["flags"][: self._size] == code).flatten().tolist()

    def _kernel(self, loss: Tensor, center: float, scale: float) -> Tensor:
        z = (loss - center) / scale
        weight = torch.exp(-0.5 * z * z)
        if self.weighting == "gaussian_pdf":
            return weight / (math.sqrt(2 * math.pi) * scale)
        return weight

    def weights(self, sample_ids: Tensor, losses: Tensor) -> Tensor:
        """Weight of each pair for this epoch's loss: 1 unless flagged (detached).

        ``losses`` are the pairs' current raw losses; the result has their dtype and device.
        """
        ids = _as_ids(sample_ids)
        current = _as_losses(losses, ids)
        out = torch.ones_like(current)
        n_flagged = 0
        if self._active and ids.numel():
            kinds = self.flags(ids).to(current.device)
            n_flagged = int((kinds > 0).sum())
            if n_flagged:
                out = self._flagged_weights(kinds, current.to(torch.float32)).to(current.dtype)
        self._last = {
            "last_batch_size": int(ids.numel()),
            "last_n_flagged": n_flagged,
            "last_mean_weight": float(out.float().mean()) if ids.numel() else 1.0,
        }
        return out

    def _flagged_weights(self, kinds: Tensor, loss: Tensor) -> Tensor:
        p = self._params
        weight = torch.ones_like(loss)
        if self.weighting == "drop":
            return torch.where(kinds > 0, torch.zeros_like(loss), weight)
        noisy_w = self._kernel(loss, p["noisy_center"], p["noisy_scale"])
        if "mix_mean_low" in p:
            faulty_w = 1.0 - self._posterior_high(loss.to(torch.float64), p).to(loss.dtype)
        else:
            faulty_w = self._kernel(loss, p["faulty_center"], p["faulty_scale"])
        weight = torch.where(kinds == NOISY, noisy_w, weight)
        weight = torch.where(kinds == FAULTY, faulty_w, weight)
        tiny = torch.finfo(loss.dtype).tiny
        return torch.where(kinds > 0, weight.clamp(min=tiny), weight)

    def summary(self) -> dict[str, Any]:
        """Counts by kind, the epoch's statistics and the last ``weights`` call, as scalars."""
        out: dict[str, Any] = {
            "epoch": self._epoch,
            "active": self._active,
            "threshold": self.threshold,
            "statistic": self.statistic,
            "weighting": self.weighting,
            "n_seen": 0,
            "n_noisy": self._counts["n_noisy"],
            "n_faulty": self._counts["n_faulty"],
            "n_flagged": self._counts["n_noisy"] + self._counts["n_faulty"],
            "n_ever_flagged": self._counts["n_ever_flagged"],
        }
        out.update(self._stats)
        out.update(self._last)
        return out

    def flag_table(self) -> list[dict[str, Any]]:
        """One row per pair ever flagged, by sample id.

        Keys: ``sample_id``, ``kind`` (of its latest flag, "noisy" or "faulty"), ``statistic``
        (its current ``m``), ``first_epoch_flagged``, ``flagged_now``.
        """
        n = self._size
        first = self._buffers["first_flagged"][:n]
        ids = torch.nonzero(first >= 0).flatten()
        m_all, _ = self._statistic_all()
        kinds = self._buffers["last_kind"][:n][ids].tolist()
        now = (self._buffers["flags"][:n][ids] > 0).tolist()
        return [
            {
                "sample_id": sid,
                "kind": KIND_NAMES[kind],
                "statistic": stat,
                "first_epoch_flagged": fe,
                "flagged_now": flagged,
            }
            for sid, kind, stat, fe, flagged in zip(
                ids.tolist(), kinds, m_all[ids].tolist(), first[ids].tolist(), now, strict=True
            )
        ]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor | int | float | str]:
        """Everything needed for an exact resume (mid-epoch included), trimmed to the ids seen."""
        state: dict[str, Tensor | int | float | str] = {"format": STATE_FORMAT}
        for key, value in self._config().items():
            state[f"config.{key}"] = value
        state.update({"epoch": self._epoch, "size": self._size, "active": int(self._active)})
        for name, tensor in self._buffers.items():
            state[f"buffer.{name}"] = tensor[: self._size].clone()
        for key, value in self._params.items():
            state[f"param.{key}"] = value
        for key, value in self._stats.items():
            state[f"stat.{key}"] = value
        for key, value in self._counts.items():
            state[f"count.{key}"] = value
        for key, value in self._last.items():
            state[f"last.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; its settings replace this miner's (a warning names changes)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"bad-pair state: unknown format {state.get('format')!r} (expected {STATE_FORMAT})"
            )
        missing = [
            key
            for key in (
                *(f"config.{k}" for k in _CONFIG_KEYS),
                *(f"buffer.{k}" for k in _BUFFERS),
                *(f"count.{k}" for k in self._counts),
                *(f"last.{k}" for k in self._last),
                "epoch",
                "size",
                "active",
            )
            if key not in state
        ]
        if missing:
            raise KeyError(f"bad-pair state is missing keys {missing}")
        config = {key: state[f"config.{key}"] for key in _CONFIG_KEYS}
        changed = {k: (v, config[k]) for k, v in self._config().items() if v != config[k]}
        if changed:
            logger.warning("bad-pair state overrides the miner's settings: %s", changed)
        self._set_config(config)
        size = int(state["size"])
        buffers = {}
        for name, (dtype, fill) in _BUFFERS.items():
            saved = state[f"buffer.{name}"]
            if not isinstance(saved, Tensor) or saved.shape != (size,):
                raise ValueError(
                    f"bad-pair state: buffer.{name} must be a tensor of shape ({size},), "
                    f"got {getattr(saved, 'shape', type(saved))}"
                )
            full = torch.full((max(size, self.capacity),), fill, dtype=dtype)
            full[:size] = saved.to("cpu", dtype)
            buffers[name] = full
        self._buffers = buffers
        self._size = size
        self._epoch = int(state["epoch"])
        self._active = bool(state["active"])
        self._params = {k: float(state[f"param.{k}"]) for k in _PARAM_KEYS if f"param.{k}" in state}
        self._stats = {
            k[len("stat.") :]: v
            for k, v in state.items()
            if isinstance(k, str) and k[:5] == "stat."
        }
        self._counts = {k: int(state[f"count.{k}"]) for k in self._counts}
        self._last = {k: state[f"last.{k}"] for k in self._last}
