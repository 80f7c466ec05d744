"""FairRobustConfig: defaults, validation errors that name the argument, and parsing from YAML."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.schema import PROTECTED_ATTRIBUTES


def _config(tmp_path, **kwargs):
    return FairRobustConfig(output_dir=str(tmp_path / "out"), **kwargs)


def test_defaults_suit_clip_training(tmp_path):
    config = _config(tmp_path)
    assert config.remove_unused_columns is False
    assert config.eval_strategy == IntervalStrategy.EPOCH
    assert config.save_strategy == SaveStrategy.EPOCH
    assert config.metric_for_best_model == "mean_es_auc"
    assert config.greater_is_better is True
    assert config.load_best_model_at_end is True
    assert config.report_to == []
    assert config.seed == 42
    assert config.fairness_attributes == list(PROTECTED_ATTRIBUTES)
    assert config.eval_attributes == list(PROTECTED_ATTRIBUTES)
    assert (config.dbpm, config.dbpm_warmup_epochs) == (True, 1)
    assert (config.dbpm_beta_noisy, config.dbpm_beta_faulty) == (2.0, 3.0)
    assert config.nan_guard is True


def test_every_objective_field_has_help():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(FairRobustConfig) if f.name not in base]
    assert len(own) >= 17
    for f in dataclasses.fields(FairRobustConfig):
        assert f.metadata.get("help", "").strip(), f"field {f.name} has no help text"


def test_defaults_are_not_shared_between_instances(tmp_path):
    first = _config(tmp_path)
    first.fairness_attributes.append("race")
    assert _config(tmp_path).fairness_attributes == list(PROTECTED_ATTRIBUTES)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"fairness_lambda": -0.1}, "fairness_lambda"),
        ({"fairness_attributes": ["race", "height"]}, "fairness_attributes"),
        ({"eval_attributes": ["maritalstatus"]}, "eval_attributes"),
        ({"fairness_attributes": ["race", "race"]}, "fairness_attributes"),
        ({"dbpm_beta_noisy": 0.0}, "dbpm_beta_noisy"),
        ({"dbpm_beta_faulty": -1.0}, "dbpm_beta_faulty"),
        ({"dbpm_threshold": "zscore"}, "dbpm_threshold"),
        ({"dbpm_weighting": "hard"}, "dbpm_weighting"),
        ({"dbpm_statistic": "median"}, "dbpm_statistic"),
        ({"fairness_target": "logits"}, "fairness_target"),
        ({"fairness_ot": "emd"}, "fairness_ot"),
        ({"dbpm_warmup_epochs": -1}, "dbpm_warmup_epochs"),
        ({"fairness_min_group_size": 0}, "fairness_min_group_size"),
        ({"fairness_blur": 0.0}, "fairness_blur"),
        ({"fairness_blur": float("nan")}, "fairness_blur"),
        ({"fairness_lambda": float("nan")}, "fairness_lambda"),
        ({"fairness_lambda": float("inf")}, "fairness_lambda"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        ({"fairness_attributes": [], "fairness_lambda": 0.5}, "fairness_attributes"),
        ({"eval_attributes": []}, "eval_attributes"),
    ],
)
def test_bad_values_raise_naming_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        _config(tmp_path, **kwargs)


def test_attribute_subsets_and_comma_strings(tmp_path):
    config = _config(tmp_path, fairness_attributes="gender, race", eval_attributes=["language"])
    assert config.fairness_attributes == ["gender", "race"]
    assert config.eval_attributes == ["language"]
    assert _config(tmp_path, fairness_attributes=[], fairness_lambda=0.0).fairness_attributes == []


def test_no_evaluation_turns_off_best_model_loading(tmp_path):
    config = _config(tmp_path, eval_strategy="no")
    assert config.load_best_model_at_end is False
    assert config.save_strategy == SaveStrategy.EPOCH


def test_parse_dict_and_yaml(tmp_path):
    parser = HfArgumentParser(FairRobustConfig)
    (config,) = parser.parse_dict(
        {"output_dir": str(tmp_path), "fairness_lambda": 0.25, "dbpm_threshold": "sigma"}
    )
    assert (config.fairness_lambda, config.dbpm_threshold) == (0.25, "sigma")

    path = tmp_path / "run.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'yaml'}\n"
        "dbpm: false\n"
        "fairness_attributes: [race, ethnicity]\n"
        "fairness_target: similarity\n"
        "fairness_ot: exact_1d\n"
        "num_train_epochs: 2\n"
        "learning_rate: 1.0e-5\n"
    )
    (config,) = parser.parse_yaml_file(str(path))
    assert config.dbpm is False
    assert config.fairness_attributes == ["race", "ethnicity"]
    assert (config.fairness_target, config.fairness_ot) == ("similarity", "exact_1d")
    assert (config.num_train_epochs, config.learning_rate) == (2, 1e-5)


def test_unknown_yaml_keys_are_listed(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"output_dir: {tmp_path}\nfairnes_lambda: 0.3\ndbpm_beta: 2\n")
    with pytest.raises(ValueError, match=r"\['dbpm_beta', 'fairnes_lambda'\]"):
        HfArgumentParser(FairRobustConfig).parse_yaml_file(str(path), allow_extra_keys=False)


def test_yaml_values_are_validated(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"output_dir: {tmp_path}\nfairness_attributes: [race, age]\n")
    with pytest.raises(ValueError, match=r"fairness_attributes: unknown attribute\(s\) \['age'\]"):
        HfArgumentParser(FairRobustConfig).parse_yaml_file(str(path))


def test_command_line_choices(tmp_path):
    parser = HfArgumentParser(FairRobustConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--fairness_attributes",
            "race",
            "gender",
            "--dbpm_weighting",
            "drop",
            "--no_nan_guard",
        ]
    )
    assert config.fairness_attributes == ["race", "gender"]
    assert config.dbpm_weighting == "drop"
    assert config.nan_guard is False
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fairness_ot", "x"])
