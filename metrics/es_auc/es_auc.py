"""ES-AUC: equity-scaled AUC, equity-scaled accuracy and group fairness gaps of a binary classifier.

The evaluation of FairCLIP (Luo et al., CVPR 2024) as one `evaluate` module: overall AUC and
accuracy, the same per protected group, their equity-scaled forms, and fairlearn's demographic
parity and equalized odds differences, for one or several protected attributes at once.

The arithmetic is vectorised: one sort of the scores serves every group of every attribute, AUC
is the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's
``roc_auc_score``), and every group count is one ``np.bincount``. Tied scores share their average
rank, so the order inside a tie never matters: the scores get numpy's fast default sort, and each
attribute a stable radix sort of its small-integer group bins.
"""

import logging
import numbers

import datasets
import evaluate
import numpy as np

logger = logging.getLogger(__name__)

#: Group code of a sample whose attribute is not known; such a sample belongs to no group.
UNKNOWN = -1

_CITATION = """\
@inproceedings{luo2024fairclip,
  title     = {FairCLIP: Harnessing Fairness in Vision-Language Learning},
  author    = {Luo, Yan and Shi, Min and Khan, Muhammad Osama and Afzal, Muhammad Muneeb and
               Huang, Hao and Yuan, Shuaihang and Tian, Yu and Song, Luo and Kouhana, Ava and
               Elze, Tobias and Fang, Yi and Wang, Mengyu},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {12289--12301},
  year      = {2024}
}
@article{bansal2025robustfairness,
  title   = {Robust Fairness Vision-Language Learning for Medical Image Analysis},
  author  = {Bansal, Sparsh and Wu, Mingyang and Wang, Xin and Hu, Shu},
  journal = {arXiv preprint arXiv:2505.03153},
  year    = {2025}
}
@article{weerts2023fairlearn,
  title   = {Fairlearn: Assessing and Improving Fairness of AI Systems},
  author  = {Weerts, Hilde and Dud{\\'\\i}k, Miroslav and Edgar, Richard and Jalali, Adrin and
             Lutz, Roman and Madaio, Michael},
  journal = {Journal of Machine Learning Research},
  volume  = {24},
  number  = {257},
  pages   = {1--8},
  year    = {2023}
}
"""

_DESCRIPTION = """\
Equity-scaled AUC (ES-AUC) of a binary classifier across the groups of one or several protected
attributes: ES-AUC = AUC / (1 + sum_g |AUC - AUC_g|). Also reports the group AUCs, accuracy and
equity-scaled accuracy at a threshold, and fairlearn's demographic parity difference (DPD) and
equalized odds difference (DEOdds). Group code -1 means unknown: such samples are left out of that
attribute's groups. A group whose labels hold one class has no AUC: it is named in
`skipped_groups` and left out of the ES-AUC sum.
"""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (`list` of `float`): score of the positive class, one per sample.
    references (`list` of `int`): true labels, 0 or 1.
    groups (`list` of `int`, or `list` of `list` of `int`): the protected group code of each
        sample (one attribute), or one code per attribute for each sample (several attributes).
        -1 means unknown.
    attribute_names (`list` of `str`, optional): names of the attributes, one per column of
        `groups`. When given, or when `groups` holds several codes per sample, the result holds
        one block per attribute under "attributes". Default names are "attribute_0", ...
    threshold (`float`, default 0.5): a sample is predicted positive when its score >= threshold.
Returns:
    One attribute: {"auc", "accuracy", "es_auc", "es_acc", "dpd", "deodds", "group_auc",
    "group_accuracy", "group_size", "skipped_groups", "num_samples", "num_unknown"}.
    Several: {"auc", "accuracy", "num_samples", "attributes": {name: block as above}}.
Examples:
    >>> es_auc = evaluate.load("metrics/es_auc")
    >>> result = es_auc.compute(
    ...     prediction_scores=[0.9, 0.8, 0.3, 0.6, 0.4, 0.7, 0.2, 0.55, 0.5, 0.1],
    ...     references=[1, 1, 0, 1, 0, 0, 0, 1, 0, 0],
    ...     groups=[0, 0, 0, 0, 0, 1, 1, 1, 1, -1],
    ... )
    >>> round(result["auc"], 4), round(result["es_auc"], 4), result["group_auc"]["0"]
    (0.9, 0.675, 1.0)
"""


def _first_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _as_scores(prediction_scores: object) -> np.ndarray:
    """Scores as a 1-D float64 array; a non-finite score is an error, never a silent NaN."""
    try:
        scores = np.asarray(prediction_scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"prediction_scores must be real numbers: {error}") from None
    if scores.ndim != 1:
        raise ValueError(
            "prediction_scores must be 1-D (one score of the positive class per sample), "
            f"got shape {scores.shape}"
        )
    if scores.size == 0:
        raise ValueError("prediction_scores is empty: there is nothing to evaluate")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"prediction_scores holds {int(bad.sum())} NaN or infinite value(s); the first is at "
            f"index {_first_index(bad)} ({scores[_first_index(bad)]})"
        )
    return scores


def _as_labels(references: object, n: int) -> np.ndarray:
    """Labels as a boolean array (True = positive); only 0 and 1 are labels."""
    labels = np.asarray(references)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"references must be 1-D with one label per score ({n}), got shape {labels.shape}"
        )
    if labels.dtype == bool:
        return labels
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"references must be 0/1 labels, got dtype {labels.dtype}")
    positive = labels == 1
    bad = ~(positive | (labels == 0))
    if bad.any():
        first = _first_index(bad)
        raise ValueError(
            f"references must be 0 or 1: {int(bad.sum())} label(s) are not, the first is "
            f"{labels[first]} at index {first}"
        )
    return positive


def _as_group_codes(groups: object, n: int) -> tuple[np.ndarray, bool]:
    """Group codes as an (n, k) int64 array, and whether they came as several codes per sample."""
    try:
        codes = np.asarray(groups)
    except ValueError as error:
        raise ValueError(
            f"groups must hold the same number of codes for every sample: {error}"
        ) from None
    if codes.dtype == object:
        raise ValueError(
            "groups must be integer codes: one per sample, or the same number per sample"
        )
    several = codes.ndim == 2
    if codes.ndim not in (1, 2) or codes.shape[0] != n:
        raise ValueError(
            f"groups must have one entry per sample ({n}): a code each, or a sequence of codes "
            f"each; got shape {codes.shape}"
        )
    if codes.dtype == bool or not (
        np.issubdtype(codes.dtype, np.integer) or np.issubdtype(codes.dtype, np.floating)
    ):
        raise ValueError(f"groups must be integer codes, got dtype {codes.dtype}")
    if np.issubdtype(codes.dtype, np.floating):
        fractional = ~np.isfinite(codes) | (codes != np.round(codes))
        if fractional.any():
            raise ValueError(
                f"groups must be integer codes: {int(fractional.sum())} are not, the first is "
                f"{codes.flat[_first_index(fractional.ravel())]}"
            )
    codes = codes.astype(np.int64, copy=False).reshape(n, -1)
    if codes.shape[1] == 0:
        raise ValueError("groups holds no attribute: each sample has an empty sequence of codes")
    below = codes < UNKNOWN
    if below.any():
        row, column = divmod(_first_index(below.ravel()), codes.shape[1])
        raise ValueError(
            f"groups codes must be >= 0, or {UNKNOWN} for unknown: {int(below.sum())} are not, "
            f"the first is {codes[row, column]} (sample {row}, attribute column {column})"
        )
    return codes, several


def _names(attribute_names: object, k: int, several: bool) -> list[str] | None:
    """Names of the attributes, or None for a single attribute reported as one block."""
    if attribute_names is None:
        return [f"attribute_{j}" for j in range(k)] if several else None
    if isinstance(attribute_names, str) or not all(
        isinstance(name, str) for name in attribute_names
    ):
        raise ValueError(f"attribute_names must be a list of strings, got {attribute_names!r}")
    names = list(attribute_names)
    if len(names) != k:
        raise ValueError(
            f"attribute_names has {len(names)} name(s) but groups has {k} code(s) per sample"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"attribute_names must be distinct, got {names}")
    return names


def _as_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a real number, got {threshold!r}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return float(threshold)


def _compact(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map codes to bins 0..G-1 in increasing code order and unknown to bin G.

    Returns the bin of every sample (the smallest integer type that holds G, so that a stable
    sort of the bins is a radix sort) and the G codes present.
    """
    top = int(codes.max())
    shifted = codes + 1
    if top < 4 * codes.size + 1024:
        present = np.flatnonzero(np.bincount(shifted, minlength=top + 2)[1:])
        lookup = np.full(top + 2, present.size, dtype=_bin_dtype(present.size))
        lookup[present + 1] = np.arange(present.size)
        return lookup[shifted], present
    present, bins = np.unique(shifted, return_inverse=True)
    if present[0] == 0:  # the unknown code: move its bin from first to last
        present = present[1:]
        bins = np.where(bins == 0, present.size + 1, bins) - 1
    return bins.astype(_bin_dtype(present.size)), present - 1


def _bin_dtype(n_groups: int) -> type:
    return np.int8 if n_groups < 127 else np.int16 if n_groups < 32767 else np.int64


def _mann_whitney(
    sorted_scores: np.ndarray, sorted_labels: np.ndarray, bins: np.ndarray | None, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positives, negatives and twice the Mann-Whitney U statistic of every bin.

    ``sorted_scores`` ascend; ``bins`` (None for one bin) is aligned with them. A stable sort by
    bin keeps the scores ascending inside each bin; a tie block is a run of equal scores in one
    bin, whose members share the average rank. ``2 U = 2 R_pos - n_pos (n_pos + 1)`` stays in
    integers up to the final sums, and AUC = 2U / (2 n_pos n_neg).
    """
    size = sorted_scores.size
    scores, labels = sorted_scores, sorted_labels
    if bins is None:
        bins = np.zeros(size, dtype=np.int8)
    else:
        by_bin = np.argsort(bins, kind="stable")
        scores, labels, bins = scores[by_bin], labels[by_bin], bins[by_bin]
    boundary = np.empty(size, dtype=bool)
    boundary[0] = True
    np.not_equal(scores[1:], scores[:-1], out=boundary[1:])
    boundary[1:] |= bins[1:] != bins[:-1]
    starts = np.flatnonzero(boundary)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = size
    counts = np.bincount(bins, minlength=n_bins)
    first = np.cumsum(counts) - counts
    block_bin = bins[starts]
    positives_in_block = np.add.reduceat(labels, starts, dtype=np.int64)
    twice_rank = starts + ends + 1 - 2 * first[block_bin]
    n_pos = np.bincount(block_bin, weights=positives_in_block, minlength=n_bins).astype(np.int64)
    twice_rank_sum = np.bincount(
        block_bin, weights=positives_in_block * twice_rank, minlength=n_bins
    )
    return n_pos, counts - n_pos, twice_rank_sum - n_pos * (n_pos + 1)


def _auc(twice_u: float, n_pos: int, n_neg: int) -> float:
    return float(twice_u / (2.0 * n_pos * n_neg))


def _equity_scaled(overall: float, by_group: list[float]) -> float:
    return float(overall / (1.0 + sum(abs(overall - value) for value in by_group)))


def _gap(values: np.ndarray) -> float:
    return float(values.max() - values.min())


def _one_class_reason(n_pos: int, n_neg: int) -> str:
    kind = "negative" if n_pos == 0 else "positive"
    count = n_pos + n_neg
    return f"only {kind} labels ({count} sample{'s' * (count != 1)}): AUC is undefined"


def _attribute_block(
    name: str | None,
    codes: np.ndarray,
    order: np.ndarray,
    sorted_scores: np.ndarray,
    sorted_labels: np.ndarray,
    outcome: np.ndarray,
    overall_auc: float,
) -> dict:
    """The report of one attribute.

    ``outcome`` is 2 * label + prediction per sample, so that one ``bincount`` of
    4 * bin + outcome gives every group's confusion matrix.
    """
    where = "groups" if name is None else f"attribute {name!r}"
    bins, present = _compact(codes)
    n_groups = present.size
    n = codes.size
    if n_groups == 0:
        raise ValueError(f"{where}: every sample has an unknown group ({UNKNOWN})")
    confusion = np.bincount(4 * bins.astype(np.int64) + outcome, minlength=4 * (n_groups + 1))
    confusion = confusion.reshape(n_groups + 1, 2, 2)
    num_unknown = int(confusion[n_groups].sum())
    known = confusion[:n_groups]
    size = known.sum(axis=(1, 2))
    n_pos = known[:, 1].sum(axis=1)
    n_neg = known[:, 0].sum(axis=1)
    if n_pos.sum() == 0 or n_neg.sum() == 0:
        raise ValueError(
            f"{where}: the samples with a known group hold one class only "
            f"({int(n_pos.sum())} positive, {int(n_neg.sum())} negative), so AUC is undefined"
        )

    sorted_bins = bins[order]
    g_pos, g_neg, g_twice_u = _mann_whitney(sorted_scores, sorted_labels, sorted_bins, n_groups + 1)
    if num_unknown:
        is_known = sorted_bins < n_groups
        k_pos, k_neg, k_twice_u = _mann_whitney(
            sorted_scores[is_known], sorted_labels[is_known], None, 1
        )
        auc = _auc(k_twice_u[0], k_pos[0], k_neg[0])
    else:
        auc = overall_auc

    group_auc: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for g, code in enumerate(present.tolist()):
        if g_pos[g] and g_neg[g]:
            group_auc[str(code)] = _auc(g_twice_u[g], g_pos[g], g_neg[g])
        else:
            skipped[str(code)] = _one_class_reason(int(g_pos[g]), int(g_neg[g]))

    correct = known[:, 0, 0] + known[:, 1, 1]
    accuracy = float(correct.sum() / size.sum())
    group_accuracy = correct / size
    selection_rate = (known[:, 0, 1] + known[:, 1, 1]) / size
    # fairlearn's rates come from sklearn's confusion_matrix(normalize="true"), which sets a rate
    # whose class is absent from the group to 0: a one-class group counts with rate 0.
    tpr = np.divide(known[:, 1, 1], n_pos, out=np.zeros(n_groups), where=n_pos > 0)
    fpr = np.divide(known[:, 0, 1], n_neg, out=np.zeros(n_groups), where=n_neg > 0)

    codes_str = [str(code) for code in present.tolist()]
    return {
        "auc": auc,
        "accuracy": accuracy,
        "es_auc": _equity_scaled(auc, list(group_auc.values())),
        "es_acc": _equity_scaled(accuracy, group_accuracy.tolist()),
        "dpd": _gap(selection_rate),
        "deodds": max(_gap(tpr), _gap(fpr)),
        "group_auc": group_auc,
        "group_accuracy": dict(zip(codes_str, group_accuracy.tolist(), strict=True)),
        "group_size": dict(zip(codes_str, size.tolist(), strict=True)),
        "skipped_groups": skipped,
        "num_samples": n,
        "num_unknown": num_unknown,
    }


def es_auc_report(
    prediction_scores: object,
    references: object,
    groups: object,
    attribute_names: list[str] | None = None,
    threshold: float = 0.5,
) -> dict:
    """AUC, ES-AUC, group AUCs, accuracy, ES-Acc, DPD and DEOdds of one or several attributes.

    The inputs are those of ``EsAuc.compute``; see the module card for the definitions. Raises
    ValueError on a non-finite score, a label outside {0, 1}, a group code below -1, or an
    evaluation set (or an attribute's known samples) that holds a single class.
    """
    scores = _as_scores(prediction_scores)
    n = scores.size
    labels = _as_labels(references, n)
    codes, several = _as_group_codes(groups, n)
    names = _names(attribute_names, codes.shape[1], several)
    cut = _as_threshold(threshold)

    n_pos = int(np.count_nonzero(labels))
    if n_pos in (0, n):
        raise ValueError(
            f"references hold one class only ({n_pos} positive of {n}): AUC is undefined"
        )
    order = np.argsort(scores)
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    all_pos, all_neg, all_twice_u = _mann_whitney(sorted_scores, sorted_labels, None, 1)
    overall_auc = _auc(all_twice_u[0], all_pos[0], all_neg[0])
    predicted = scores >= cut
    outcome = 2 * labels.astype(np.int64) + predicted

    blocks = {
        name: _attribute_block(
            name, codes[:, j], order, sorted_scores, sorted_labels, outcome, overall_auc
        )
        for j, name in enumerate(names or [None])
    }
    if names is None:
        return blocks[None]
    return {
        "auc": overall_auc,
        "accuracy": float(np.count_nonzero(predicted == labels) / n),
        "num_samples": n,
        "attributes": blocks,
    }


_FEATURES_ONE_ATTRIBUTE = datasets.Features(
    {
        "prediction_scores": datasets.Value("float64"),
        "references": datasets.Value("int64"),
        "groups": datasets.Value("int64"),
    }
)
_FEATURES_SEVERAL_ATTRIBUTES = datasets.Features(
    {
        "prediction_scores": datasets.Value("float64"),
        "references": datasets.Value("int64"),
        "groups": datasets.Sequence(datasets.Value("int64")),
    }
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EsAuc(evaluate.Metric):
    """ES-AUC and group fairness metrics, for one attribute or several at once."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_FEATURES_ONE_ATTRIBUTE, _FEATURES_SEVERAL_ATTRIBUTES],
            reference_urls=[
                "https://arxiv.org/abs/2403.19949",
                "https://arxiv.org/abs/2505.03153",
                "https://fairlearn.org/main/user_guide/assessment/common_fairness_metrics.html",
            ],
        )

    def compute(
        self, *, predictions: object = None, references: object = None, **kwargs: object
    ) -> dict | None:
        """Compute the metric over the inputs given here and any batches added before.

        One process with every input given here and no pending batch goes straight to the
        arithmetic on arrays; otherwise evaluate's cache (add / add_batch, several processes)
        gathers the inputs first. Both give the same result; None on processes other than 0.
        """
        if predictions is not None:
            raise ValueError(
                "es_auc takes `prediction_scores` (the score of the positive class), "
                "not `predictions`"
            )
        inputs = {"references": references, **kwargs}
        feature_names = self._feature_names()
        given = [name for name in feature_names if inputs.get(name) is not None]
        if given and len(given) != len(feature_names):
            missing = [name for name in feature_names if name not in given]
            raise ValueError(
                f"es_auc inputs are missing: {missing}; all of {feature_names} are needed"
            )
        if given and self.num_process == 1 and self.writer is None:
            logger.debug("es_auc: computing directly on the %d given samples", len(references))
            return self._compute(**inputs)
        return super().compute(references=references, **kwargs)

    def _compute(
        self,
        prediction_scores: object,
        references: object,
        groups: object,
        attribute_names: list[str] | None = None,
        threshold: float = 0.5,
    ) -> dict:
        """The report of the gathered inputs (evaluate calls this on process 0)."""
        return es_auc_report(
            prediction_scores,
            references,
            groups,
            attribute_names=attribute_names,
            threshold=threshold,
        )
