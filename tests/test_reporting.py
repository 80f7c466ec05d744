"""Plots and the summary table: what is drawn matches the report it is drawn from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle
from PIL import Image as PILImage

from fairvlm_hf import reporting
from fairvlm_hf.data import schema


def attribute_result(group_auc: dict, sizes: dict, skipped: dict, auc: float) -> dict:
    gaps = sum(abs(auc - value) for value in group_auc.values())
    return {
        "auc": auc,
        "accuracy": 0.7,
        "es_auc": auc / (1 + gaps),
        "es_acc": 0.6,
        "dpd": 0.12,
        "deodds": 0.2,
        "group_auc": group_auc,
        "group_accuracy": {code: 0.7 for code in sizes},
        "group_size": sizes,
        "skipped_groups": skipped,
        "num_samples": sum(sizes.values()),
        "num_unknown": 3,
    }


@pytest.fixture
def report() -> dict:
    return {
        "auc": 0.71,
        "accuracy": 0.66,
        "num_samples": 120,
        "attributes": {
            "race": attribute_result(
                {"0": 0.62, "1": 0.69, "2": 0.74}, {"0": 20, "1": 30, "2": 70}, {}, 0.71
            ),
            "language": attribute_result(
                {"0": 0.72, "1": 0.55},
                {"0": 90, "1": 20, "2": 7},
                {"2": "one class (all labels 1)"},
                0.70,
            ),
        },
    }


def predictions(n: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    return pd.DataFrame(
        {
            "sample_id": np.arange(n),
            "score": np.clip(0.4 * label + rng.uniform(0, 0.6, n), 0, 1),
            "prediction": 0,
            "label": label,
            "race": rng.integers(0, 3, n),
            "language": rng.choice([0, 1, 2, -1], n),
        }
    )


def bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_fairness_report_figure_draws_the_report(report) -> None:
    figure = reporting.fairness_report_figure(report)
    axes = figure.axes
    assert len(axes) == 2
    for ax, (attribute, result) in zip(axes, report["attributes"].items(), strict=True):
        codes = sorted(int(c) for c in result["group_size"])
        names = [t.get_text() for t in ax.get_xticklabels()]
        assert names == [schema.group_name(attribute, c) for c in codes]
        heights = [b.get_height() for b in bars(ax)]
        filled = [b.get_fill() for b in bars(ax)]
        for code, height, fill in zip(codes, heights, filled, strict=True):
            if str(code) in result["group_auc"]:
                assert fill and height == pytest.approx(result["group_auc"][str(code)])
            else:
                assert not fill and bars(ax)[codes.index(code)].get_hatch()
        texts = " ".join(t.get_text() for t in ax.texts)
        for size in result["group_size"].values():
            assert f"n={size}" in texts
        lines = [line for line in ax.get_lines() if line.get_label() == "AUC"]
        assert lines and lines[0].get_ydata()[0] == pytest.approx(result["auc"])
        assert f"{result['es_auc']:.4f}" in ax.get_title()
    assert "one class" in " ".join(t.get_text() for t in axes[1].texts)


def test_plot_fairness_report_writes_png(report, tmp_path) -> None:
    path = reporting.plot_fairness_report(report, tmp_path)
    assert path == tmp_path / "fairness_report.png"
    with PILImage.open(path) as image:
        assert image.format == "PNG" and image.width > 400
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    with pytest.raises(KeyError, match="attributes"):
        reporting.plot_fairness_report({"auc": 0.5}, tmp_path / "x.png")


def test_score_distributions_counts_every_group_and_label(tmp_path) -> None:
    frame = predictions()
    figure = reporting.score_distributions_figure(frame, ["race", "language"])
    for ax, attribute in zip(figure.axes, ["race", "language"], strict=True):
        counts = sorted(int(t.get_text()) for t in ax.texts)
        expected = sorted(frame.groupby([attribute, "label"]).size().tolist())
        assert counts == expected
        names = [t.get_text() for t in ax.get_xticklabels()]
        codes = sorted(frame[attribute].unique(), key=lambda c: (c == schema.UNKNOWN, c))
        assert names == [schema.group_name(attribute, c) for c in codes]
    path = reporting.plot_score_distributions(frame, ["race"], tmp_path / "d.png")
    assert path.stat().st_size > 5_000
    with pytest.raises(KeyError, match="gender"):
        reporting.plot_score_distributions(frame, ["gender"], tmp_path / "e.png")


def test_format_summary_table_lists_every_attribute_and_group(report) -> None:
    table = reporting.format_summary_table(report)
    lines = table.splitlines()
    assert "0.7100" in lines[0] and "120" in lines[0]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(report["attributes"]) <= set(rows)
    for attribute, result in report["attributes"].items():
        row = rows[attribute]
        assert f"{result['es_auc']:.4f}" in row and f"{result['dpd']:.4f}" in row
        for code, value in result["group_auc"].items():
            name = schema.group_name(attribute, int(code))
            assert f"{name} {value:.3f} (n={result['group_size'][code]})" in row
    assert "Other - (one class) (n=7)" in rows["language"]
    assert rows["language"].endswith(
        f"unknown (n={report['attributes']['language']['num_unknown']}) |"
    )


def test_training_curves_plot_logged_values(tmp_path) -> None:
    history = [
        {"step": s, "loss": 2.0 / s, "loss_clip": 2.1 / s, "fair_reg": 0.01 * s, "epoch": s / 10}
        for s in range(1, 6)
    ]
    history += [{"step": 5, "eval_loss": 1.1, "eval_auc": 0.61, "eval_es_auc_race": 0.55}]
    history += [{"step": 10, "eval_loss": 0.9, "eval_auc": 0.66, "eval_es_auc_race": 0.58}]
    figure = reporting.training_curves_figure(history)
    train_ax, eval_ax = figure.axes
    lines = {line.get_label(): line for line in train_ax.get_lines()}
    assert set(lines) == {"loss", "loss_clip", "fair_reg"}
    np.testing.assert_allclose(lines["loss"].get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(lines["fair_reg"].get_ydata(), [0.01 * s for s in range(1, 6)])
    eval_lines = {line.get_label(): line for line in eval_ax.get_lines()}
    assert set(eval_lines) == {"eval_loss", "eval_auc", "eval_es_auc_race"}
    np.testing.assert_allclose(eval_lines["eval_auc"].get_ydata(), [0.61, 0.66])
    assert reporting.plot_training_curves(history, tmp_path).name == "training_curves.png"
    with pytest.raises(ValueError, match="none of the keys"):
        reporting.plot_training_curves([{"step": 1, "learning_rate": 1e-5}], tmp_path)
