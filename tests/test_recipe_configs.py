"""The shipped configs parse, and the four ablation rows differ only in the objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.arguments import DataArguments
from fairvlm_hf.modeling import ModelArguments
from fairvlm_hf.parser import FairVLMParser
from fairvlm_hf.workflow import RecipeArguments

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
ROWS = ("clip", "fairclip", "dbpm", "fair_robust")
OBJECTIVE_KEYS = {"dbpm", "fairness_lambda", "output_dir"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_parses(path, tmp_path):
    parser = FairVLMParser((ModelArguments, DataArguments, RecipeArguments, FairRobustConfig))
    *_, config = parser.parse_args_and_config(
        ["--config", str(path), "--output_dir", str(tmp_path), "--bf16", "false", "--use_cpu"]
    )
    assert config.remove_unused_columns is False
    assert config.metric_for_best_model == "mean_es_auc"


def test_ablation_rows_differ_only_in_the_objective():
    rows = {row: yaml.safe_load((CONFIGS / f"{row}.yaml").read_text()) for row in ROWS}
    keys = set().union(*rows.values())
    differing = {k for k in keys if len({repr(r.get(k)) for r in rows.values()}) > 1}
    assert differing == OBJECTIVE_KEYS
    assert [rows[r]["dbpm"] for r in ROWS] == [False, False, True, True]
    assert rows["clip"]["fairness_lambda"] == rows["dbpm"]["fairness_lambda"] == 0
    assert rows["fairclip"]["fairness_lambda"] == rows["fair_robust"]["fairness_lambda"] > 0
