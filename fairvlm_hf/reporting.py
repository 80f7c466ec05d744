"""Plots and text tables of evaluation and training results.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so
that nothing here opens a window or changes the caller's matplotlib backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fairvlm_hf.data import schema

logger = logging.getLogger(__name__)

#: Training-log keys drawn by :func:`plot_training_curves` when present.
TRAINING_LOSS_KEYS: tuple[str, ...] = ("loss", "loss_clip", "loss_rob", "fair_reg")

_LABEL_COLOURS = {0: "#4C72B0", 1: "#DD8452"}


def _new_figure(n_panels: int, panel_width: float = 4.5, panel_height: float = 3.6) -> Figure:
    figure = Figure(figsize=(panel_width * n_panels, panel_height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path, default_name: str) -> Path:
    """Save ``figure`` to ``path`` (a file, or a folder that gets ``default_name``)."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    logger.info("wrote %s", path)
    return path


def _attribute_results(report: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    attributes = report.get("attributes")
    if not attributes:
        raise KeyError("report: no 'attributes' entry (expected the multi-attribute report)")
    return attributes


def _group_codes(result: Mapping[str, Any]) -> list[int]:
    """Every group code a per-attribute result mentions, in code order."""
    codes = set(result.get("group_size", {})) | set(result.get("group_auc", {}))
    codes |= set(result.get("skipped_groups", {}))
    return sorted((int(code) for code in codes), key=_code_order)


def _code_order(code: int) -> tuple[bool, int]:
    """Known codes in order, unknown last."""
    return (code == schema.UNKNOWN, code)


def _skipped_label(key: str, skipped: Mapping[str, str]) -> str:
    """Short label of a group without an AUC: the metric skips a group only for holding one class."""
    return "one class" if key in skipped else "no AUC"


def _skipped_cell(key: str, skipped: Mapping[str, str]) -> str:
    return f"- ({_skipped_label(key, skipped)})"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def plot_fairness_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Save :func:`fairness_report_figure` as ``fairness_report.png`` (``path``: file or folder)."""
    return _save(fairness_report_figure(report), path, "fairness_report.png")


def fairness_report_figure(report: Mapping[str, Any]) -> Figure:
    """Per attribute, a panel of group AUC bars against the overall AUC (dashed line).

    Each bar is annotated with its group size; a group without an AUC (one class) is drawn as an
    empty hatched bar labelled with the reason. The panel title gives the attribute's ES-AUC.
    """
    attributes = _attribute_results(report)
    figure = _new_figure(len(attributes))
    axes = figure.subplots(1, len(attributes), squeeze=False)[0]
    for ax, (attribute, result) in zip(axes, attributes.items(), strict=True):
        codes = _group_codes(result)
        names = [schema.group_name(attribute, code) for code in codes]
        sizes = result.get("group_size", {})
        group_auc = result.get("group_auc", {})
        skipped = result.get("skipped_groups", {})
        for x, code in enumerate(codes):
            key = str(code)
            size = sizes.get(key)
            label = f"n={size}" if size is not None else ""
            if key in group_auc:
                height = float(group_auc[key])
                ax.bar(x, height, color="#4C72B0", edgecolor="black")
                ax.text(x, height + 0.02, f"{height:.3f}", ha="center", va="bottom", fontsize=8)
                ax.text(x, 0.03, label, ha="center", va="bottom", fontsize=8, color="white")
            else:
                ax.bar(x, 1.0, fill=False, hatch="//", edgecolor="grey")
                reason = _skipped_label(key, skipped)
                ax.text(
                    x, 0.5, reason, ha="center", va="center", fontsize=8, backgroundcolor="white"
                )
                ax.text(
                    x, 0.03, label, ha="center", va="bottom", fontsize=8, backgroundcolor="white"
                )
        overall = result.get("auc", report.get("auc"))
        if overall is not None and math.isfinite(float(overall)):
            ax.axhline(float(overall), color="black", linestyle="--", linewidth=1, label="AUC")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xticks(range(len(codes)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0.0, 1.25)
        ax.set_ylabel("AUC")
        ax.set_title(f"{attribute}: ES-AUC {_fmt(result.get('es_auc'))}", fontsize=10)
    return figure


def plot_score_distributions(
    predictions_frame: pd.DataFrame, attributes: Sequence[str], path: str | Path
) -> Path:
    """Save :func:`score_distributions_figure` as ``score_distributions.png`` (file or folder)."""
    return _save(
        score_distributions_figure(predictions_frame, attributes), path, "score_distributions.png"
    )


def score_distributions_figure(
    predictions_frame: pd.DataFrame, attributes: Sequence[str]
) -> Figure:
    """Per attribute, box plots of scores by group and label, with sample counts on top.

    ``predictions_frame`` has columns ``score``, ``label`` and one integer-code column per
    attribute (the ``predictions.csv`` table). Unknown codes are drawn as their own group.
    """
    required = ["score", "label", *attributes]
    missing = [c for c in required if c not in predictions_frame.columns]
    if missing:
        raise KeyError(
            f"predictions_frame is missing column(s) {missing}; it has {list(predictions_frame.columns)}"
        )
    if not attributes:
        raise ValueError("attributes: give at least one attribute")
    figure = _new_figure(len(attributes))
    axes = figure.subplots(1, len(attributes), squeeze=False)[0]
    labels = sorted(int(v) for v in predictions_frame["label"].unique())
    width = 0.8 / max(len(labels), 1)
    for ax, attribute in zip(axes, attributes, strict=True):
        codes = sorted((int(c) for c in predictions_frame[attribute].unique()), key=_code_order)
        for j, label in enumerate(labels):
            data, positions, counts = [], [], []
            for x, code in enumerate(codes):
                selected = predictions_frame.loc[
                    (predictions_frame[attribute] == code) & (predictions_frame["label"] == label),
                    "score",
                ].to_numpy(dtype=float)
                if selected.size:
                    data.append(selected)
                    positions.append(x + (j - (len(labels) - 1) / 2) * width)
                    counts.append(selected.size)
            if not data:
                continue
            colour = _LABEL_COLOURS.get(label, "grey")
            boxes = ax.boxplot(
                data,
                positions=positions,
                widths=width * 0.9,
                patch_artist=True,
                medianprops={"color": "black"},
            )
            for box in boxes["boxes"]:
                box.set_facecolor(colour)
                box.set_alpha(0.7)
            for position, count in zip(positions, counts, strict=True):
                ax.text(position, 1.02, str(count), ha="center", va="bottom", fontsize=7)
            ax.plot(
                [], [], color=colour, linewidth=6, label=schema.LABEL_NAMES.get(label, str(label))
            )
        ax.set_xticks(
            range(len(codes)),
            [schema.group_name(attribute, code) for code in codes],
            rotation=20,
            ha="right",
            fontsize=8,
        )
        ax.set_xlim(-0.6, len(codes) - 0.4)
        ax.set_ylim(-0.02, 1.1)
        ax.set_ylabel("score (glaucoma probability)")
        ax.set_title(f"{attribute} (numbers: samples)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    return figure


def format_summary_table(report: Mapping[str, Any]) -> str:
    """A markdown table of the report: per attribute AUC, ES-AUC, ES-Acc, DPD, DEOdds, group AUCs."""
    attributes = _attribute_results(report)
    lines = [
        f"AUC {_fmt(report.get('auc'))}, accuracy {_fmt(report.get('accuracy'))}, "
        f"{report.get('num_samples', '?')} samples",
        "",
        "| attribute | AUC | ES-AUC | ES-Acc | DPD | DEOdds | group AUC (n) |",
        "|---|---|---|---|---|---|---|",
    ]
    for attribute, result in attributes.items():
        sizes = result.get("group_size", {})
        group_auc = result.get("group_auc", {})
        skipped = result.get("skipped_groups", {})
        groups = []
        for code in _group_codes(result):
            key = str(code)
            name = schema.group_name(attribute, code)
            value = _fmt(group_auc[key], 3) if key in group_auc else _skipped_cell(key, skipped)
            groups.append(f"{name} {value} (n={sizes.get(key, '?')})")
        if result.get("num_unknown"):
            groups.append(f"unknown (n={result['num_unknown']})")
        lines.append(
            f"| {attribute} | {_fmt(result.get('auc'))} | {_fmt(result.get('es_auc'))} | "
            f"{_fmt(result.get('es_acc'))} | {_fmt(result.get('dpd'))} | "
            f"{_fmt(result.get('deodds'))} | {'; '.join(groups)} |"
        )
    return "\n".join(lines)


def plot_training_curves(
    log_history: Sequence[Mapping[str, Any]],
    path: str | Path,
    train_keys: Sequence[str] = TRAINING_LOSS_KEYS,
    eval_keys: Sequence[str] | None = None,
) -> Path:
    """Save :func:`training_curves_figure` as ``training_curves.png`` (file or folder)."""
    figure = training_curves_figure(log_history, train_keys, eval_keys)
    return _save(figure, path, "training_curves.png")


def training_curves_figure(
    log_history: Sequence[Mapping[str, Any]],
    train_keys: Sequence[str] = TRAINING_LOSS_KEYS,
    eval_keys: Sequence[str] | None = None,
) -> Figure:
    """Losses and eval metrics by step, from ``Trainer.state.log_history``.

    ``eval_keys`` defaults to ``eval_loss``, ``eval_auc``, ``eval_mean_es_auc`` and every
    ``eval_es_auc_<attribute>`` found in the log. Keys absent from the log are not drawn; a log
    with none of the keys is an error.
    """
    if eval_keys is None:
        found = {key for entry in log_history for key in entry}
        eval_keys = [k for k in ("eval_loss", "eval_auc", "eval_mean_es_auc") if k in found]
        eval_keys += sorted(k for k in found if k.startswith("eval_es_auc_"))
    panels = [
        ("training", [k for k in train_keys if any(k in e for e in log_history)]),
        ("evaluation", [k for k in eval_keys if any(k in e for e in log_history)]),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(
            f"log_history has none of the keys {list(train_keys) + list(eval_keys)} to plot"
        )
    figure = _new_figure(len(panels), panel_width=5.5)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = [
                (entry.get("step", i), float(entry[key]))
                for i, entry in enumerate(log_history)
                if key in entry and entry[key] is not None
            ]
            steps, values = zip(*points, strict=True)
            ax.plot(np.asarray(steps), np.asarray(values), marker="o", markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return figure
