"""The model card and publishing to the Hub, up to the network boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, AutoProcessor, CLIPModel

import fairvlm_hf
from fairvlm_hf import cli, hub
from fairvlm_hf.card import sanitize, write_model_card
from fairvlm_hf.data.schema import group_name
from fairvlm_hf.modeling import build_default_model, save_model_for_release

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
NOTES = [f"note {i}: {'glaucoma' if i % 2 else 'normal disc'} cup ratio" for i in range(60)]
TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def _attribute_metrics(y, score, groups, attribute):
    """The metric's per-attribute form, computed here with sklearn and fairlearn."""
    auc = roc_auc_score(y, score)
    pred = (score >= 0.5).astype(int)
    group_auc, group_size, skipped = {}, {}, {}
    for code in np.unique(groups):
        mask = groups == code
        group_size[int(code)] = int(mask.sum())
        if len(np.unique(y[mask])) < 2:
            skipped[int(code)] = "one class in the labels"
        else:
            group_auc[int(code)] = float(roc_auc_score(y[mask], score[mask]))
    es_auc = auc / (1 + sum(abs(auc - g) for g in group_auc.values()))
    return {
        "auc": float(auc),
        "es_auc": float(es_auc),
        "es_acc": float(np.mean(pred == y)),
        "dpd": float(demographic_parity_difference(y, pred, sensitive_features=groups)),
        "deodds": float(equalized_odds_difference(y, pred, sensitive_features=groups)),
        "group_auc": group_auc,
        "group_size": group_size,
        "skipped_groups": skipped,
    }


@pytest.fixture(scope="module")
def eval_results() -> dict:
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    race = rng.integers(0, 3, n)
    language = rng.integers(0, 2, n)
    language[:6] = 2
    y[:6] = 1
    return {
        "auc": float(roc_auc_score(y, score)),
        "accuracy": float(np.mean((score >= 0.5) == y)),
        "num_samples": n,
        "attributes": {
            "race": _attribute_metrics(y, score, race, "race"),
            "language": _attribute_metrics(y, score, language, "language"),
        },
    }


def _training_config(tmp_path: Path) -> dict:
    return {
        "output_dir": str(tmp_path / "runs" / "fair_robust"),
        "data_dir": "/home/someone/data/FairVLMed",
        "hub_token": TOKEN,
        "learning_rate": 1e-5,
        "dbpm_beta_faulty": 3.0,
        "fairness_attributes": ["race", "gender"],
        "logging": {"dir": str(Path.home() / "logs"), "push_to_hub_token": "secret"},
    }


def test_card_parses_back_with_the_numbers(tmp_path, eval_results):
    path = write_model_card(
        tmp_path,
        model_name="fairvlm-clip",
        base_model="openai/clip-vit-base-patch16",
        dataset_name="Harvard-FairVLMed",
        eval_results=eval_results,
        training_config=_training_config(tmp_path),
        bad_pair_summary={"counts": {"noisy": 3, "faulty": 41}, "precision": 0.9, "recall": 0.5},
        plots=[],
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.license == "cc-by-nc-nd-4.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert set(data.tags) == {"clip", "fairness", "medical-imaging", "fairvlm-hf"}
    assert data.base_model == "openai/clip-vit-base-patch16"
    results = {(r.metric_type, r.metric_name): r for r in data.eval_results}
    assert results["roc_auc", "AUC"].metric_value == pytest.approx(eval_results["auc"])
    assert results["accuracy", "Accuracy"].metric_value == pytest.approx(eval_results["accuracy"])
    for attribute, metrics in eval_results["attributes"].items():
        result = results["es_auc", f"ES-AUC ({attribute})"]
        assert result.metric_value == pytest.approx(metrics["es_auc"])
        assert result.metric_config == attribute
    for r in data.eval_results:
        assert r.task_type == "zero-shot-image-classification"
        assert r.dataset_split == "test" and r.dataset_name == "Harvard-FairVLMed"
    assert len(data.eval_results) == 2 + len(eval_results["attributes"])

    text = card.text
    race = eval_results["attributes"]["race"]
    for code, auc in race["group_auc"].items():
        row = f"| {group_name('race', code)} ({code}) | {race['group_size'][code]} | {auc:.4f} |"
        assert row in text
    assert f"| race | {race['auc']:.4f} | {race['es_auc']:.4f} | {race['es_acc']:.4f} |" in text
    language = eval_results["attributes"]["language"]
    assert language["skipped_groups"] == {2: "one class in the labels"}
    assert "| Other (2) | 6 | not computed: one class in the labels |" in text
    assert "| faulty | 41 |" in text and "0.9000" in text
    assert "AutoModel.from_pretrained" in text and "pipeline(" in text
    assert "SYNTHETIC" not in text


def test_card_has_no_local_paths_or_tokens(tmp_path, eval_results):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "roc.png").write_bytes(b"png")
    path = write_model_card(
        tmp_path,
        model_name="fairvlm-clip",
        base_model=str(tmp_path / "checkpoints" / "base-clip"),
        dataset_name="FairVLMed (synthetic)",
        eval_results=eval_results,
        training_config=_training_config(tmp_path),
        bad_pair_summary={"counts": {"faulty": 2}, "ground_truth": str(tmp_path / "bad_pairs.csv")},
        plots=[str(tmp_path / "plots" / "roc.png"), "plots/group_auc.png"],
        extra_markdown=f"Trained from {tmp_path}/data with token {TOKEN}.",
    )
    text = path.read_text()
    for secret in (str(tmp_path), "/home/someone", str(Path.home()), TOKEN, "hub_token", "secret"):
        assert secret not in text, secret
    assert "`FairVLMed`" in text and "`fair_robust`" in text and "`bad_pairs.csv`" in text
    assert "![roc](plots/roc.png)" in text and "![group_auc](plots/group_auc.png)" in text
    assert "SYNTHETIC" in text
    data = ModelCard.load(path).data
    assert data.license == "apache-2.0"
    assert data.base_model is None
    with pytest.raises(ValueError, match="plots"):
        write_model_card(
            tmp_path / "plots",
            model_name="m",
            base_model=None,
            dataset_name="d",
            eval_results=eval_results,
            training_config={},
            bad_pair_summary=None,
            plots=[str(tmp_path / "README.md")],
        )


def test_card_for_an_adapter_and_bad_input(tmp_path, eval_results):
    (tmp_path / "adapter_config.json").write_text("{}")
    broken = dict(eval_results["attributes"]["race"], es_auc=float("nan"))
    results = dict(eval_results, attributes={"race": broken})
    path = write_model_card(
        tmp_path,
        model_name="m",
        base_model="openai/clip-vit-base-patch16",
        dataset_name="Harvard-FairVLMed",
        eval_results=results,
        training_config={},
        bad_pair_summary=None,
        plots=[],
        repo_id="org/m",
    )
    card = ModelCard.load(path)
    assert 'PeftModel.from_pretrained(base, "org/m")' in card.text
    assert {r.metric_type for r in card.data.eval_results} == {"roc_auc", "accuracy"}
    assert "| race |" in card.text and "n/a" in card.text
    with pytest.raises(ValueError, match="'attributes'"):
        write_model_card(
            tmp_path,
            model_name="m",
            base_model=None,
            dataset_name="d",
            eval_results={"auc": 0.5},
            training_config={},
            bad_pair_summary=None,
            plots=[],
        )


def test_sanitize_walks_nested_values(tmp_path):
    clean = sanitize({"a": [str(tmp_path / "x.csv"), 1], "api_key": "k", "tokenizer_name": "t"})
    assert clean == {"a": ["x.csv", 1], "tokenizer_name": "t"}


class FakeApi:
    """Records the calls that would reach the Hub."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://example.invalid/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def _uploaded_by_hub(folder: Path, ignore_patterns: list[str]) -> set[str]:
    """What ``upload_folder`` sends: the Hub's own filter over the folder's files."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    patterns = ignore_patterns + DEFAULT_IGNORE_PATTERNS
    return set(filter_repo_objects(files, ignore_patterns=patterns))


@pytest.fixture()
def release_folder(tmp_path, eval_results) -> Path:
    folder = tmp_path / "release"
    model, processor = build_default_model(NOTES, vocab_size=600, **TINY)
    save_model_for_release(model, processor, folder)
    (folder / "eval_results.json").write_text(json.dumps(eval_results))
    (folder / "predictions.csv").write_text("sample_id,score\n0,0.5\n")
    (folder / "bad_pairs.csv").write_text("sample_id,kind\n3,faulty\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "roc.png").write_bytes(b"png")
    write_model_card(
        folder,
        model_name="fairvlm-clip",
        base_model=None,
        dataset_name="FairVLMed (synthetic)",
        eval_results=eval_results,
        training_config={"learning_rate": 1e-4},
        bad_pair_summary={"counts": {"faulty": 1}},
        plots=["plots/roc.png"],
        repo_id="org/fairvlm-clip",
    )
    junk = [
        "checkpoint-10/model.safetensors",
        "checkpoint-10/optimizer.pt",
        "checkpoints/last/state.json",
        "runs/events.out.tfevents.1",
        ".cache/huggingface/download/x.lock",
        "__pycache__/x.cpython-311.pyc",
        "training_args.bin",
    ]
    for name in junk:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    return folder


EXPECTED_MODEL_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "eval_results.json",
    "predictions.csv",
    "bad_pairs.csv",
    "plots/roc.png",
}


def test_push_model_folder_sends_the_release_files(release_folder):
    api = FakeApi()
    files = hub.push_model_folder(release_folder, "org/fairvlm-clip", api=api, private=True)
    assert set(files) == EXPECTED_MODEL_FILES and len(files) == len(EXPECTED_MODEL_FILES)
    (create, created), (upload, uploaded) = api.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert created["repo_id"] == "org/fairvlm-clip" and created["repo_type"] == "model"
    assert created["private"] is True and created["exist_ok"] is True
    assert uploaded["repo_id"] == "org/fairvlm-clip" and uploaded["repo_type"] == "model"
    assert Path(uploaded["folder_path"]) == release_folder
    assert _uploaded_by_hub(release_folder, uploaded["ignore_patterns"]) == EXPECTED_MODEL_FILES

    dry = FakeApi()
    assert hub.push_model_folder(release_folder, "org/x", api=dry, dry_run=True) == files
    assert dry.calls == []

    model = AutoModel.from_pretrained(release_folder)
    assert type(model) is CLIPModel
    processor = AutoProcessor.from_pretrained(release_folder)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    card = ModelCard.load(release_folder / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert (
        "![roc](plots/roc.png)" in card.text and 'from_pretrained("org/fairvlm-clip")' in card.text
    )


def test_push_model_folder_refuses_bad_folders(tmp_path, release_folder):
    with pytest.raises(FileNotFoundError, match="holds no model"):
        hub.push_model_folder(tmp_path / "release" / "plots", "org/m", api=FakeApi())
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hub.push_model_folder(tmp_path / "absent", "org/m", api=FakeApi())
    (release_folder / "notes.txt").write_text(f"token={TOKEN}\n")
    api = FakeApi()
    with pytest.raises(ValueError, match=r"notes\.txt"):
        hub.push_model_folder(release_folder, "org/m", api=api, token=TOKEN)
    assert api.calls == []


def _metric_stand_in(root: Path) -> Path:
    folder = root / "es_auc"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "es_auc.py").write_text("import evaluate\n")
    (folder / "app.py").write_text("import evaluate\n")
    (folder / "requirements.txt").write_text("scikit-learn\n")
    (folder / "README.md").write_text(
        "---\ntitle: ES-AUC\nsdk: gradio\napp_file: app.py\ntags:\n- evaluate\n- metric\n---\n\n# ES-AUC\n"
    )
    (folder / "__pycache__" / "es_auc.cpython-311.pyc").write_bytes(b"x")
    return folder


def test_push_metric_space(tmp_path):
    folder = _metric_stand_in(tmp_path)
    api = FakeApi()
    files = hub.push_metric_space("org/es_auc", metric_dir=folder, api=api)
    expected = {"es_auc.py", "app.py", "requirements.txt", "README.md"}
    assert set(files) == expected
    (_, created), (_, uploaded) = api.calls
    assert created["repo_id"] == "org/es_auc" and created["repo_type"] == "space"
    assert created["space_sdk"] == "gradio" and created["private"] is False
    assert uploaded["repo_type"] == "space" and Path(uploaded["folder_path"]) == folder
    assert _uploaded_by_hub(folder, uploaded["ignore_patterns"]) == expected
    assert Path(fairvlm_hf.__file__).parents[1] / "metrics" / "es_auc" == hub.DEFAULT_METRIC_DIR

    (folder / "app.py").unlink()
    with pytest.raises(FileNotFoundError, match=r"app\.py"):
        hub.push_metric_space("org/es_auc", metric_dir=folder, api=FakeApi())
    with pytest.raises(FileNotFoundError, match="metric_dir"):
        hub.push_metric_space("org/es_auc", metric_dir=tmp_path / "absent", api=FakeApi())


def test_push_metric_cli(tmp_path, capsys):
    folder = _metric_stand_in(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push-metric", "--help"])
    assert exit_info.value.code == 0
    assert "--space" in capsys.readouterr().out
    code = cli.main(
        ["push-metric", "--space", "org/es_auc", "--dry_run", "--metric_dir", str(folder)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "would upload 4 files to Space org/es_auc" in out and "  es_auc.py" in out
    code = hub.push_metric_cli_main(["--space", "o/n", "--metric_dir", str(tmp_path / "absent")])
    assert code == 1 and "metric_dir" in capsys.readouterr().err


def test_offline_push_raises_a_clear_error(release_folder, tmp_path):
    metric = _metric_stand_in(tmp_path)
    script = textwrap.dedent(
        f"""
        from fairvlm_hf import hub
        for call in (
            lambda: hub.push_model_folder({str(release_folder)!r}, "org/m"),
            lambda: hub.push_metric_space("org/s", metric_dir={str(metric)!r}),
        ):
            try:
                call()
            except ConnectionError as error:
                print("ERROR", error)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2, done.stdout + done.stderr
    assert "'org/m'" in lines[0] and "offline" in lines[0]
    assert "'org/s'" in lines[1] and "offline" in lines[1]
