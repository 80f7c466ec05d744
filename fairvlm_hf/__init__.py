"""fairvlm-hf: robust and fair CLIP fine-tuning for medical image-text data.

The public names are imported on first use, so that ``import fairvlm_hf`` (and the CLI's
``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "FairRobustConfig": "fairvlm_hf.config",
    "FairRobustTrainer": "fairvlm_hf.trainer",
    "NonFiniteLossError": "fairvlm_hf.trainer",
    "ModelArguments": "fairvlm_hf.modeling",
    "load_model_and_processor": "fairvlm_hf.modeling",
    "save_model_for_release": "fairvlm_hf.modeling",
    "DataArguments": "fairvlm_hf.data.arguments",
    "load_fairvlmed": "fairvlm_hf.data.fairvlmed",
    "EvaluationArguments": "fairvlm_hf.evaluation",
    "evaluate_zero_shot": "fairvlm_hf.evaluation",
    "FairnessMetrics": "fairvlm_hf.evaluation",
    "write_model_card": "fairvlm_hf.card",
    "push_model_folder": "fairvlm_hf.hub",
    "push_metric_space": "fairvlm_hf.hub",
    "BadPairMiner": "fairvlm_hf.objective",
    "GroupSinkhorn": "fairvlm_hf.objective",
    "pairwise_clip_loss": "fairvlm_hf.objective",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fairvlm_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
