"""Fine-tune a CLIP-style model with the robust and fair objective, then evaluate and release it.

    accelerate launch recipes/train.py                                   # embedded default
    accelerate launch recipes/train.py --config recipes/configs/fair_robust.yaml
    accelerate launch recipes/train.py --config recipes/configs/fairvlmed_vitb16.yaml \\
        --data_dir /path/to/FairVLMed
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py --use_cpu   # 2 CPU processes

With no --config it reads recipes/configs/fair_robust.yaml: it generates the synthetic FairVLMed data set into the cache (once), builds the
small default CLIP, trains with the full objective, selects the checkpoint on the validation split,
evaluates it on the test split and writes the model, card, reports and plots to --output_dir.
Every field of the model, data, recipe and training arguments is a flag (see --help) and a key
of the YAML file given with --config; flags override the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import datasets
import transformers

from fairvlm_hf.callbacks import TrainingInterrupted
from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.arguments import DataArguments
from fairvlm_hf.modeling import ModelArguments
from fairvlm_hf.parser import FairVLMParser
from fairvlm_hf.reporting import format_summary_table
from fairvlm_hf.workflow import RecipeArguments, run_recipe

#: Read when no --config is given: the full objective on the embedded default.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "fair_robust.yaml"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's examples as written and shows every default."""


def main(argv: list[str] | None = None) -> int:
    parser = FairVLMParser(
        (ModelArguments, DataArguments, RecipeArguments, FairRobustConfig),
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    model_args, data_args, recipe_args, config = parser.parse_args_and_config(
        argv, default_config=DEFAULT_CONFIG
    )

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if config.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    logging.getLogger("fairvlm_hf").setLevel(logging.INFO)

    try:
        summary = run_recipe(model_args, data_args, config, recipe_args)
    except TrainingInterrupted as stop:
        logging.getLogger("recipes.train").warning(
            "%s; resume with --resume_from_checkpoint true (no release was written)", stop
        )
        return 130 if stop.signal_name == "SIGINT" else 143
    if "report" in summary:
        print(f"\nTest split (best checkpoint on validation: {summary['best_checkpoint']})")
        print(format_summary_table(summary["report"]))
        print(f"\nWrote the model, card, reports and plots to {summary['output_dir']}")
        print(f"Total time: {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
