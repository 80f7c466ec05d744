"""``DataArguments``: where the data comes from, as options of ``HfArgumentParser``.

Without ``data_dir`` the synthetic Harvard-FairVLMed of the ``synthetic_*`` options is generated
once into the cache and used, so that the default run works with no download. The bad-pair ground
truth (``bad_pairs.csv``) is read automatically when the folder has one; training never uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pandas as pd

from fairvlm_hf.data.fairvlmed import load_fairvlmed, read_ground_truth
from fairvlm_hf.data.synthetic import SyntheticConfig, ensure_synthetic

_SYNTHETIC_DEFAULTS = SyntheticConfig()


@dataclass
class DataArguments:
    """Data options of the training recipe and the evaluation command."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder in the Harvard-FairVLMed layout (Training/, Validation/, Test/, the "
            "notes CSV). Unset: a synthetic data set made from the synthetic_* options, "
            "generated once into the cache."
        },
    )
    max_text_length: int | None = field(
        default=180,
        metadata={"help": "Characters of the summary note kept as text (FairCLIP: 180)."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Root of the caches (decoded Arrow data and generated synthetic data). "
            "Unset: $FAIRVLM_HF_CACHE or ~/.cache/fairvlm_hf."
        },
    )
    synthetic_num_train: int = field(
        default=_SYNTHETIC_DEFAULTS.num_train, metadata={"help": "Synthetic training samples."}
    )
    synthetic_num_val: int = field(
        default=_SYNTHETIC_DEFAULTS.num_validation,
        metadata={"help": "Synthetic validation samples."},
    )
    synthetic_num_test: int = field(
        default=_SYNTHETIC_DEFAULTS.num_test, metadata={"help": "Synthetic test samples."}
    )
    synthetic_image_size: int = field(
        default=_SYNTHETIC_DEFAULTS.image_size,
        metadata={"help": "Side of the synthetic images, in pixels."},
    )
    synthetic_bad_pair_rate: float = field(
        default=_SYNTHETIC_DEFAULTS.bad_pair_rate,
        metadata={"help": "Fraction of synthetic training pairs whose note is bad."},
    )
    synthetic_seed: int = field(
        default=_SYNTHETIC_DEFAULTS.seed, metadata={"help": "Seed of the synthetic data set."}
    )

    def synthetic_config(self) -> SyntheticConfig:
        """The generator config of the synthetic default (other fields keep their defaults)."""
        return dataclasses.replace(
            _SYNTHETIC_DEFAULTS,
            num_train=self.synthetic_num_train,
            num_validation=self.synthetic_num_val,
            num_test=self.synthetic_num_test,
            image_size=self.synthetic_image_size,
            bad_pair_rate=self.synthetic_bad_pair_rate,
            seed=self.synthetic_seed,
        )

    def resolve_data_dir(self) -> Path:
        """``data_dir`` if set, else the synthetic data set (generated on first use)."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        return ensure_synthetic(self.synthetic_config(), cache_root=self.cache_dir)

    def load(self) -> datasets.DatasetDict:
        """The splits of :meth:`resolve_data_dir`, read by :func:`load_fairvlmed`."""
        cache = None if self.cache_dir is None else Path(self.cache_dir) / "datasets"
        return load_fairvlmed(
            self.resolve_data_dir(), max_text_length=self.max_text_length, cache_dir=cache
        )

    def ground_truth(self) -> pd.DataFrame | None:
        """The planted bad pairs (``bad_pairs.csv``) of the data folder, or None if it has none."""
        return read_ground_truth(self.resolve_data_dir())
