"""Where the project finds its own files and keeps its caches: one definition of each place."""

from __future__ import annotations

import os
from pathlib import Path

#: The ES-AUC `evaluate` module, at the repository root (`metrics/es_auc`).
METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "es_auc"

#: Environment variable that moves every cache (generated data, decoded Arrow, default models).
CACHE_ENV = "FAIRVLM_HF_CACHE"


def default_cache_root() -> Path:
    """Where the project caches data and models: ``$FAIRVLM_HF_CACHE``, else ``~/.cache/fairvlm_hf``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fairvlm_hf").expanduser()
