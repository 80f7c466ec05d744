"""The ES-AUC evaluate module against scikit-learn, fairlearn and worked examples.

The reference below computes every number the slow, obvious way: one ``roc_auc_score`` per group,
fairlearn's ``demographic_parity_difference`` and ``equalized_odds_difference``, accuracy with
``np.mean``. The module must agree with it to 1e-12 through every input path.
"""

import ast
import doctest
import multiprocessing
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import yaml
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = ROOT / "metrics" / "es_auc"
TOL = 1e-12


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path_factory.mktemp("es_auc_cache")))


def reference_block(scores, labels, codes, threshold=0.5):
    """One attribute's report, computed group by group with sklearn, fairlearn and numpy."""
    known = codes != -1
    s, y, g = scores[known], labels[known], codes[known]
    pred = (s >= threshold).astype(int)
    auc = roc_auc_score(y, s)
    accuracy = np.mean(pred == y)
    group_auc, group_accuracy, group_size, skipped = {}, {}, {}, set()
    for code in np.unique(g):
        member = g == code
        group_size[str(code)] = int(member.sum())
        group_accuracy[str(code)] = np.mean(pred[member] == y[member])
        if len(np.unique(y[member])) == 2:
            group_auc[str(code)] = roc_auc_score(y[member], s[member])
        else:
            skipped.add(str(code))
    return {
        "auc": auc,
        "accuracy": accuracy,
        "es_auc": auc / (1 + sum(abs(auc - v) for v in group_auc.values())),
        "es_acc": accuracy / (1 + sum(abs(accuracy - v) for v in group_accuracy.values())),
        "dpd": demographic_parity_difference(y, pred, sensitive_features=g),
        "deodds": equalized_odds_difference(y, pred, sensitive_features=g),
        "group_auc": group_auc,
        "group_accuracy": group_accuracy,
        "group_size": group_size,
        "skipped_groups": skipped,
        "num_samples": len(scores),
        "num_unknown": int((~known).sum()),
    }


def assert_block_equal(got, want):
    assert set(got) == set(want) | {"skipped_groups"}
    for key in ("auc", "accuracy", "es_auc", "es_acc", "dpd", "deodds"):
        assert got[key] == pytest.approx(want[key], abs=TOL), key
        assert isinstance(got[key], float), key
    for key in ("group_auc", "group_accuracy"):
        assert got[key].keys() == want[key].keys(), key
        for code in want[key]:
            assert got[key][code] == pytest.approx(want[key][code], abs=TOL), (key, code)
    assert got["group_size"] == want["group_size"]
    assert set(got["skipped_groups"]) == want["skipped_groups"]
    assert all(isinstance(reason, str) and reason for reason in got["skipped_groups"].values())
    assert got["num_samples"] == want["num_samples"]
    assert got["num_unknown"] == want["num_unknown"]


def random_case(seed, n, n_attributes=3):
    """Scores with many ties, unknowns, a one-sample group and a one-class group per attribute."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 11, n) / 10.0
    labels = (rng.random(n) < 0.3 + 0.4 * scores).astype(np.int64)
    labels[:2] = [0, 1]
    columns = []
    for j in range(n_attributes):
        codes = rng.integers(-1, 3 + j, n)
        codes[rng.integers(0, n)] = 10 + j  # a group of one sample
        negatives = np.flatnonzero(labels == 0)[:3]
        codes[negatives] = 20 + j  # a group holding negatives only
        columns.append(codes)
    return scores, labels, np.stack(columns, axis=1)


@pytest.mark.parametrize(("seed", "n"), [(0, 40), (1, 157), (2, 1000), (3, 3001)])
def test_single_attribute_equals_sklearn_and_fairlearn(metric, seed, n):
    scores, labels, codes = random_case(seed, n, n_attributes=1)
    got = metric.compute(prediction_scores=scores, references=labels, groups=codes[:, 0])
    want = reference_block(scores, labels, codes[:, 0])
    assert want["skipped_groups"]  # the case does exercise a one-class group
    assert_block_equal(got, want)


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.3])
def test_threshold_counts_scores_equal_to_it_as_positive(metric, threshold):
    scores, labels, codes = random_case(7, 500, n_attributes=1)
    assert np.any(scores == threshold) or threshold == 0.25
    got = metric.compute(
        prediction_scores=scores, references=labels, groups=codes[:, 0], threshold=threshold
    )
    assert_block_equal(got, reference_block(scores, labels, codes[:, 0], threshold))


def test_several_attributes_equal_separate_calls(metric):
    scores, labels, codes = random_case(4, 800)
    names = ["race", "gender", "language"]
    got = metric.compute(
        prediction_scores=scores, references=labels, groups=codes, attribute_names=names
    )
    assert set(got) == {"auc", "accuracy", "num_samples", "attributes"}
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert got["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == labels), abs=TOL)
    assert got["num_samples"] == len(scores)
    assert list(got["attributes"]) == names
    for j, name in enumerate(names):
        alone = metric.compute(prediction_scores=scores, references=labels, groups=codes[:, j])
        assert got["attributes"][name] == alone
        assert_block_equal(alone, reference_block(scores, labels, codes[:, j]))


def test_default_attribute_names_and_one_named_attribute(metric):
    scores, labels, codes = random_case(5, 200, n_attributes=2)
    got = metric.compute(prediction_scores=scores, references=labels, groups=codes)
    assert list(got["attributes"]) == ["attribute_0", "attribute_1"]
    named = metric.compute(
        prediction_scores=scores, references=labels, groups=codes[:, 1], attribute_names=["x"]
    )
    assert named["attributes"]["x"] == got["attributes"]["attribute_1"]


def test_block_without_unknowns_has_the_overall_auc(metric):
    scores, labels, _ = random_case(6, 300)
    codes = np.arange(300) % 3
    got = metric.compute(prediction_scores=scores, references=labels, groups=codes)
    assert got["num_unknown"] == 0
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)


def test_worked_example_two_groups_and_an_unknown(metric):
    scores = [0.9, 0.8, 0.3, 0.6, 0.4, 0.7, 0.2, 0.55, 0.5, 0.1]
    labels = [1, 1, 0, 1, 0, 0, 0, 1, 0, 0]
    groups = [0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    got = metric.compute(prediction_scores=scores, references=labels, groups=groups)
    # The unknown sample (0.1, negative) is left out: 4 positives {.9, .8, .6, .55} and
    # 5 negatives {.3, .4, .7, .2, .5}. Pairs ranked right: .9 -> 5, .8 -> 5, .6 -> 4, .55 -> 4,
    # so AUC = 18 / 20 = 0.9.
    # Group 0: positives {.9, .8, .6} above both negatives {.3, .4}: AUC_0 = 6 / 6 = 1.
    # Group 1: positive .55 above .2 and .5, below .7: AUC_1 = 2 / 3.
    # ES-AUC = 0.9 / (1 + 0.1 + (0.9 - 2/3)) = 0.9 / (4/3) = 0.675.
    assert got["auc"] == pytest.approx(0.9, abs=TOL)
    assert got["group_auc"] == pytest.approx({"0": 1.0, "1": 2 / 3}, abs=TOL)
    assert got["es_auc"] == pytest.approx(0.675, abs=TOL)
    # Predictions at 0.5 (score >= 0.5): group 0 all right (5/5); group 1 wrong on .7 and .5
    # (negatives predicted positive): 2/4. Accuracy 7/9;
    # ES-Acc = (7/9) / (1 + 2/9 + 5/18) = (7/9) / (3/2) = 14/27.
    assert got["accuracy"] == pytest.approx(7 / 9, abs=TOL)
    assert got["group_accuracy"] == pytest.approx({"0": 1.0, "1": 0.5}, abs=TOL)
    assert got["es_acc"] == pytest.approx(14 / 27, abs=TOL)
    # Selection rates 3/5 and 3/4: DPD = 0.15. TPR 1 and 1, FPR 0/2 and 2/3: DEOdds = 2/3.
    assert got["dpd"] == pytest.approx(0.15, abs=TOL)
    assert got["deodds"] == pytest.approx(2 / 3, abs=TOL)
    assert got["group_size"] == {"0": 5, "1": 4}
    assert got["skipped_groups"] == {}
    assert (got["num_samples"], got["num_unknown"]) == (10, 1)


def test_worked_example_ties_and_a_one_class_group(metric):
    scores = [0.5, 0.5, 0.2, 0.8, 0.5, 0.3, 0.3, 0.9]
    labels = [1, 0, 0, 1, 0, 1, 0, 0]
    groups = [0, 0, 0, 1, 1, 1, 1, 2]
    got = metric.compute(prediction_scores=scores, references=labels, groups=groups)
    # Group 0: positive .5 vs negatives {.5, .2}: a tie (1/2) and a win (1): AUC_0 = 1.5 / 2.
    # Group 1: positives {.8, .3} vs negatives {.5, .3}: .8 wins twice, .3 ties .3 (1/2) and
    # loses to .5: AUC_1 = 2.5 / 4.
    # Group 2 holds one negative only: no AUC, skipped.
    # All: positives {.5, .8, .3}, negatives {.5, .2, .5, .3, .9}:
    # .5 -> 1 tie + 1 tie + .2 + .3 = 3; .8 -> 4; .3 -> .2 + tie = 1.5. AUC = 8.5 / 15.
    # ES-AUC = (8.5/15) / (1 + |8.5/15 - 0.75| + |8.5/15 - 0.625|).
    auc = 8.5 / 15
    assert got["auc"] == pytest.approx(auc, abs=TOL)
    assert got["group_auc"] == pytest.approx({"0": 0.75, "1": 0.625}, abs=TOL)
    assert list(got["skipped_groups"]) == ["2"]
    assert "negative" in got["skipped_groups"]["2"]
    assert got["es_auc"] == pytest.approx(auc / (1 + abs(auc - 0.75) + abs(auc - 0.625)), abs=TOL)
    # DEOdds follows fairlearn: group 2 has no positives, so its TPR counts as 0.
    # TPR: group 0 1/1, group 1 1/2 (.8 yes, .3 no), group 2 0 -> gap 1.
    assert got["deodds"] == pytest.approx(1.0, abs=TOL)
    assert got["group_accuracy"]["2"] == 0.0
    assert got["group_size"] == {"0": 3, "1": 4, "2": 1}


def test_one_class_group_deodds_follows_fairlearn(metric):
    labels = np.array([0, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.1, 0.9, 0.6, 0.7, 0.2, 0.8, 0.3])
    groups = np.array([0, 0, 1, 1, 2, 2, 2])  # group 2 holds negatives only
    got = metric.compute(prediction_scores=scores, references=labels, groups=groups)
    pred = (scores >= 0.5).astype(int)
    assert got["deodds"] == pytest.approx(
        equalized_odds_difference(labels, pred, sensitive_features=groups), abs=TOL
    )
    assert got["dpd"] == pytest.approx(
        demographic_parity_difference(labels, pred, sensitive_features=groups), abs=TOL
    )
    assert "2" in got["skipped_groups"] and "2" not in got["group_auc"]


def test_large_and_sparse_group_codes(metric):
    scores, labels, codes = random_case(8, 600, n_attributes=1)
    sparse = np.where(codes[:, 0] >= 0, codes[:, 0] * 10**9 + 7, -1)
    got = metric.compute(prediction_scores=scores, references=labels, groups=sparse)
    assert_block_equal(got, reference_block(scores, labels, sparse))


@pytest.mark.parametrize("multi", [False, True])
def test_add_batch_equals_compute(metric, multi):
    scores, labels, codes = random_case(9, 700)
    groups = codes if multi else codes[:, 0]
    names = ["a", "b", "c"] if multi else None
    direct = metric.compute(
        prediction_scores=scores, references=labels, groups=groups, attribute_names=names
    )
    for start in range(0, len(scores), 128):
        batch = slice(start, start + 128)
        metric.add_batch(
            prediction_scores=scores[batch].tolist(),
            references=labels[batch].tolist(),
            groups=groups[batch].tolist(),
        )
    assert metric.compute(attribute_names=names) == direct
    for i in range(10):
        metric.add(prediction_scores=scores[i], references=labels[i], groups=groups[i])
    metric.add_batch(prediction_scores=scores[10:], references=labels[10:], groups=groups[10:])
    assert metric.compute(attribute_names=names) == direct


def test_pending_batches_and_final_inputs_are_combined(metric):
    scores, labels, codes = random_case(10, 300, n_attributes=1)
    direct = metric.compute(prediction_scores=scores, references=labels, groups=codes[:, 0])
    metric.add_batch(prediction_scores=scores[:100], references=labels[:100], groups=codes[:100, 0])
    got = metric.compute(
        prediction_scores=scores[100:], references=labels[100:], groups=codes[100:, 0]
    )
    assert got == direct


def _distributed_worker(rank, cache_dir, experiment_id, queue):
    scores, labels, codes = random_case(11, 400)
    metric = evaluate.load(
        str(METRIC_DIR),
        num_process=2,
        process_id=rank,
        cache_dir=cache_dir,
        experiment_id=experiment_id,
        timeout=60,
    )
    half = slice(rank * 200, (rank + 1) * 200)
    metric.add_batch(prediction_scores=scores[half], references=labels[half], groups=codes[half])
    queue.put((rank, metric.compute(attribute_names=["a", "b", "c"])))


@pytest.mark.distributed
def test_two_processes_gather_to_the_single_process_result(metric, tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_distributed_worker, args=(rank, str(tmp_path), "t2p", queue))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    results = dict(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    scores, labels, codes = random_case(11, 400)
    want = metric.compute(
        prediction_scores=scores, references=labels, groups=codes, attribute_names=["a", "b", "c"]
    )
    assert results[1] is None
    assert results[0] == want


def test_works_as_trainer_compute_metrics(metric, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import EvalPrediction, Trainer, TrainingArguments

    scores, labels, codes = random_case(12, 96, n_attributes=2)

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, labels=None):
            logits = torch.stack([torch.zeros_like(x), x + self.bias], dim=-1)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    logit = np.log(np.clip(scores, 1e-6, 1 - 1e-6) / np.clip(1 - scores, 1e-6, 1))
    dataset = [
        {"x": torch.tensor(v, dtype=torch.float32), "labels": int(y)}
        for v, y in zip(logit, labels, strict=True)
    ]

    def compute_metrics(prediction: EvalPrediction) -> dict:
        logits = torch.tensor(prediction.predictions)
        positive = torch.softmax(logits, dim=-1)[:, 1].numpy()
        report = metric.compute(
            prediction_scores=positive,
            references=prediction.label_ids,
            groups=codes,
            attribute_names=["race", "gender"],
        )
        return {
            "auc": report["auc"],
            **{f"es_auc_{k}": v["es_auc"] for k, v in report["attributes"].items()},
        }

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=32, use_cpu=True, report_to=[]
    )
    trainer = Trainer(
        model=Scorer(), args=args, eval_dataset=dataset, compute_metrics=compute_metrics
    )
    logged = trainer.evaluate()
    positive = 1 / (1 + np.exp(-logit.astype(np.float32)))
    assert logged["eval_auc"] == pytest.approx(roc_auc_score(labels, positive), abs=1e-9)
    want = reference_block(positive.astype(np.float64), labels, codes[:, 1])
    assert logged["eval_es_auc_gender"] == pytest.approx(want["es_auc"], abs=1e-9)


def test_inputs_as_python_lists_and_float32_give_the_same_result(metric):
    scores, labels, codes = random_case(13, 250, n_attributes=2)
    scores32 = scores.astype(np.float32)
    as_arrays = metric.compute(prediction_scores=scores32, references=labels, groups=codes)
    as_lists = metric.compute(
        prediction_scores=scores32.tolist(), references=labels.tolist(), groups=codes.tolist()
    )
    assert as_arrays == as_lists


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prediction_scores": [0.1, float("nan"), 0.3, float("inf")]}, r"2 NaN .* index 1"),
        ({"references": [0, 1, 2, 1]}, r"0 or 1: 1 label.* 2 at index 2"),
        ({"references": [0.0, 1.0, 0.5, 1.0]}, r"0 or 1"),
        ({"references": [1, 1, 1, 1]}, r"one class"),
        ({"references": [0, 1, 0]}, r"one label per score"),
        ({"groups": [0, 1, 0]}, r"one entry per sample"),
        ({"groups": [0, -2, 0, 1]}, r">= 0, or -1 .* -2 \(sample 1"),
        ({"groups": [0.5, 1, 0, 1]}, r"integer codes"),
        ({"groups": [[0, 1], [1], [0, 1], [1, 1]]}, r"same number of codes"),
        ({"groups": [-1, -1, -1, -1]}, r"every sample has an unknown group"),
        ({"groups": [0, -1, 0, -1]}, r"known group hold one class"),
        ({"groups": [[0, 1]] * 4, "attribute_names": ["a"]}, r"1 name\(s\) but groups has 2"),
        ({"groups": [[0, 1]] * 4, "attribute_names": ["a", "a"]}, r"distinct"),
        ({"groups": [[0, 1]] * 4, "attribute_names": "ab"}, r"list of strings"),
        ({"threshold": float("nan")}, r"threshold must be finite"),
        ({"threshold": "0.5"}, r"threshold must be a real number"),
        ({"prediction_scores": [[0.1, 0.9]] * 4}, r"must be 1-D"),
        ({"prediction_scores": []}, r"empty"),
        ({"predictions": [0, 1, 0, 1]}, r"prediction_scores"),
        ({"groups": None}, r"missing: \['groups'\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(metric, kwargs, match):
    inputs = {
        "prediction_scores": [0.1, 0.9, 0.2, 0.8],
        "references": [0, 1, 0, 1],
        "groups": [0, 0, 1, 1],
    }
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=match):
        metric.compute(**inputs)


def test_readme_examples_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    test = doctest.DocTestParser().get_doctest(code, {}, "README.md", str(METRIC_DIR), 0)
    assert len(test.examples) >= 10
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=sys.stdout.write)
    assert runner.failures == 0


def test_module_docstring_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    source = (METRIC_DIR / "es_auc.py").read_text(encoding="utf-8")
    kwargs_doc = re.search(r'_KWARGS_DESCRIPTION = """(.*?)"""', source, re.S).group(1)
    test = doctest.DocTestParser().get_doctest(
        kwargs_doc, {"evaluate": evaluate}, "kwargs", None, 0
    )
    runner = doctest.DocTestRunner()
    runner.run(test, out=sys.stdout.write)
    assert test.examples and runner.failures == 0


def test_card_front_matter_describes_a_gradio_space():
    text = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---")[1])
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk_version", "description"):
        assert front[key], key
    assert front["sdk"] == "gradio"
    assert front["app_file"] == "app.py"
    assert front["pinned"] is False
    assert {"evaluate", "metric"} <= set(front["tags"])
    for citation in ("luo2024fairclip", "2505.03153", "fairlearn"):
        assert citation in text


def test_space_app_imports_only_what_the_space_installs():
    requirements = (METRIC_DIR / "requirements.txt").read_text(encoding="utf-8").split()
    installed = {re.split(r"[<>=~!\[]", line)[0].lower() for line in requirements}
    installed |= {"gradio"}  # the Space's sdk
    app = ast.parse((METRIC_DIR / "app.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(app):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported
    assert imported - set(sys.stdlib_module_names) <= installed
    script = ast.parse((METRIC_DIR / "es_auc.py").read_text(encoding="utf-8"))
    used = {
        alias.name.split(".")[0]
        for node in ast.walk(script)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(script) if isinstance(node, ast.ImportFrom)}
    assert "fairvlm_hf" not in used
    assert used - set(sys.stdlib_module_names) <= installed


def test_space_app_loads_the_script_beside_it(monkeypatch):
    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    monkeypatch.chdir(ROOT.parent)
    runpy.run_path(str(METRIC_DIR / "app.py"), run_name="__main__")
    (module,) = launched
    assert module.name == "es_auc"
    # The widget builds its table from the first input form: one group code per sample.
    assert list(module.features[0]) == ["prediction_scores", "references", "groups"]
    assert module.features[0]["groups"] == datasets.Value("int64")
    result = module.compute(
        prediction_scores=[0.2, 0.8, 0.6], references=[0, 1, 0], groups=[0, 0, 1]
    )
    assert result["auc"] == 1.0 and result["skipped_groups"] == {
        "1": "only negative labels (1 sample): AUC is undefined"
    }


def test_loads_and_computes_offline(tmp_path):
    script = (
        "import evaluate, sys\n"
        f"m = evaluate.load({str(METRIC_DIR)!r}, cache_dir={str(tmp_path)!r})\n"
        "r = m.compute(prediction_scores=[0.1, 0.9, 0.4, 0.8], references=[0, 1, 0, 1], groups=[0, 0, 1, 1])\n"
        "sys.exit(0 if r['es_auc'] == 1.0 else 1)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
