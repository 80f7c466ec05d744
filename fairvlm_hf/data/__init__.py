"""Harvard-FairVLMed data: the on-disk reader, the synthetic generator and collation.

Names are imported on first use, so that importing one module (the schema, or the generator
behind ``fairvlm-hf synth``) does not load the others and their dependencies (``torch``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fairvlm_hf.data.arguments import DataArguments
    from fairvlm_hf.data.collate import FairVLMedCollator, with_processor_transform
    from fairvlm_hf.data.fairvlmed import (
        FairVLMedFormatError,
        load_fairvlmed,
        read_ground_truth,
    )
    from fairvlm_hf.data.synthetic import SyntheticConfig, ensure_synthetic, generate_synthetic
    from fairvlm_hf.paths import default_cache_root

_EXPORTS: dict[str, str] = {
    "DataArguments": "fairvlm_hf.data.arguments",
    "FairVLMedCollator": "fairvlm_hf.data.collate",
    "with_processor_transform": "fairvlm_hf.data.collate",
    "FairVLMedFormatError": "fairvlm_hf.data.fairvlmed",
    "default_cache_root": "fairvlm_hf.paths",
    "load_fairvlmed": "fairvlm_hf.data.fairvlmed",
    "read_ground_truth": "fairvlm_hf.data.fairvlmed",
    "SyntheticConfig": "fairvlm_hf.data.synthetic",
    "ensure_synthetic": "fairvlm_hf.data.synthetic",
    "generate_synthetic": "fairvlm_hf.data.synthetic",
}

__all__ = [
    "DataArguments",
    "FairVLMedCollator",
    "FairVLMedFormatError",
    "SyntheticConfig",
    "default_cache_root",
    "ensure_synthetic",
    "generate_synthetic",
    "load_fairvlmed",
    "read_ground_truth",
    "with_processor_transform",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
