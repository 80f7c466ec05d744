"""`FairRobustConfig`: every knob of the robust and fair objective, beside the Trainer's own.

A `TrainingArguments` subclass (as TRL's trainer configs are), so that one dataclass drives
`HfArgumentParser`, YAML recipes and the model card. The defaults make a CLIP Trainer work out of
the box: columns the model does not take (sample_id, attributes) are kept, evaluation and saving
happen each epoch, and the best checkpoint is chosen on the validation mean ES-AUC.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from fairvlm_hf.data.schema import PROTECTED_ATTRIBUTES

logger = logging.getLogger(__name__)

THRESHOLD_RULES: tuple[str, ...] = ("mixture", "sigma", "mad")
WEIGHTINGS: tuple[str, ...] = ("gaussian_kernel", "gaussian_pdf", "drop")
STATISTICS: tuple[str, ...] = ("mean", "epoch_weighted")
FAIRNESS_TARGETS: tuple[str, ...] = ("loss", "similarity")
OT_METHODS: tuple[str, ...] = ("sinkhorn", "exact_1d")


def _all_protected() -> list[str]:
    return list(PROTECTED_ATTRIBUTES)


@dataclass
class FairRobustConfig(TrainingArguments):
    """Training arguments of `FairRobustTrainer`: DBPM, the Sinkhorn group term and evaluation.

    Ablations: ``dbpm=False`` gives FairCLIP-like training, ``fairness_lambda=0`` gives DBPM only,
    both together give plain CLIP fine-tuning.
    """

    # Dynamic Bad Pair Mining
    dbpm: bool = field(
        default=True,
        metadata={
            "help": "Dynamic Bad Pair Mining: remember each pair's loss per epoch, flag pairs whose "
            "mean loss is an outlier, and down-weight flagged pairs. False gives FairCLIP-like training."
        },
    )
    dbpm_warmup_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs of plain training before the first flags: flags are computed at the start "
            "of every epoch e >= this value from the losses of epochs < e."
        },
    )
    dbpm_beta_noisy: float = field(
        default=2.0,
        metadata={
            "help": "Width of the low-loss cut: a pair is 'noisy' (suspiciously easy) when its "
            "statistic is <= centre - beta_noisy * spread. Must be > 0."
        },
    )
    dbpm_beta_faulty: float = field(
        default=3.0,
        metadata={
            "help": "Width of the high-loss cut: a pair is 'faulty' (mismatched image and text) when "
            "its statistic is >= centre + beta_faulty * spread. Must be > 0."
        },
    )
    dbpm_threshold: Literal["mixture", "sigma", "mad"] = field(
        default="mixture",
        metadata={
            "help": "Flagging rule. 'sigma': mean +- beta * std (the DBPM papers' rule, only reliable "
            "when bad pairs are rare); 'mad': median +- beta * 1.4826 * MAD (robust to contamination); "
            "'mixture': two-component Gaussian mixture on the statistic, faulty when the high-loss "
            "posterior exceeds 0.5. The default is provisional until the benchmark confirms it."
        },
    )
    dbpm_weighting: Literal["gaussian_kernel", "gaussian_pdf", "drop"] = field(
        default="gaussian_kernel",
        metadata={
            "help": "Weight of a flagged pair. 'gaussian_kernel': exp(-(l - mu)^2 / (2 sigma^2)), in "
            "(0, 1]; 'gaussian_pdf': the papers' unbounded density (reproduction only); 'drop': 0."
        },
    )
    dbpm_statistic: Literal["mean", "epoch_weighted"] = field(
        default="mean",
        metadata={
            "help": "Per-pair statistic over past epochs: 'mean' of its losses, or 'epoch_weighted' "
            "(linearly epoch-weighted mean, as the DBPM code)."
        },
    )

    # Sinkhorn group regulariser
    fairness_attributes: list[str] = field(
        default_factory=_all_protected,
        metadata={
            "help": "Protected attributes whose groups the regulariser aligns with the whole batch, "
            f"any subset of {list(PROTECTED_ATTRIBUTES)}."
        },
    )
    fairness_lambda: float = field(
        default=0.1,
        metadata={
            "help": "Weight lambda of the group term in L = L_rob + lambda * R (>= 0; 0 turns the term "
            "off). On per-pair losses R is of the order of the losses' variance summed over groups; "
            "choose lambda by a sweep: too large a lambda holds the model at the collapsed solution "
            "where every loss is equal (R = 0). The default is the best of the sweep in "
            "docs/results.md; the papers' 1e-7 was set for logit-scale similarities and makes the "
            "term vanish on losses."
        },
    )
    fairness_blur: float = field(
        default=0.05,
        metadata={
            "help": "Sinkhorn blur (length scale, epsilon = blur ** p, in the units of the values) "
            "of the 1-D group distances; smaller is closer to exact OT and slower. Must be > 0."
        },
    )
    fairness_target: Literal["loss", "similarity"] = field(
        default="loss",
        metadata={
            "help": "Values whose group distributions are aligned: 'loss' (the per-pair contrastive "
            "loss, as the paper describes) or 'similarity' (the pair's image-text cosine, as "
            "FairCLIP intends)."
        },
    )
    fairness_min_group_size: int = field(
        default=2,
        metadata={
            "help": "A group enters R only when it has at least this many members in the global "
            "batch (>= 1). Unknown (-1) is never a group."
        },
    )
    fairness_ot: Literal["sinkhorn", "exact_1d"] = field(
        default="exact_1d",
        metadata={
            "help": "Distance between group and batch distributions: 'exact_1d' (exact 1-D optimal "
            "transport from sorted values, the limit of Sinkhorn as blur -> 0; about 470x cheaper "
            "than Sinkhorn at batch 256, see docs/benchmarks.md) or 'sinkhorn' (geomloss's Sinkhorn "
            "divergence with fairness_blur, as the papers compute it)."
        },
    )

    # Zero-shot evaluation
    zero_shot_negative_prompt: str = field(
        default="A photo of non-glaucoma",
        metadata={"help": "Text prompt of the negative class in zero-shot glaucoma scoring."},
    )
    zero_shot_positive_prompt: str = field(
        default="A photo of glaucoma",
        metadata={"help": "Text prompt of the positive class in zero-shot glaucoma scoring."},
    )
    eval_attributes: list[str] = field(
        default_factory=_all_protected,
        metadata={
            "help": "Attributes reported (AUC, ES-AUC, group AUCs, ...) at each evaluation, any subset "
            f"of {list(PROTECTED_ATTRIBUTES)}; mean_es_auc averages their ES-AUCs."
        },
    )
    nan_guard: bool = field(
        default=True,
        metadata={
            "help": "Stop with NonFiniteLossError, before the backward pass and any checkpoint, when "
            "L_clip, L_rob, R or a group distance D_kg is NaN or infinite."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let a fresh (non-resuming) run delete the checkpoint-* folders already in "
            "output_dir. Off: such a run stops with an error, so that no checkpoint is lost "
            "silently; resume with --resume_from_checkpoint true or choose another output_dir."
        },
    )

    # Trainer defaults that suit CLIP fine-tuning with this objective
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Must stay False: the objective needs sample_id and the attribute columns, which "
            "the model's forward does not take."
        },
    )
    eval_strategy: IntervalStrategy | str = field(
        default="epoch",
        metadata={"help": "When to run evaluation. Options: 'no', 'steps', 'epoch'."},
    )
    save_strategy: SaveStrategy | str = field(
        default="epoch",
        metadata={"help": "When to save a checkpoint. Options: 'no', 'epoch', 'steps', 'best'."},
    )
    metric_for_best_model: str | None = field(
        default="mean_es_auc",
        metadata={
            "help": "Validation metric that selects the best checkpoint (the mean ES-AUC over "
            "eval_attributes by default; never computed on the test split)."
        },
    )
    greater_is_better: bool | None = field(
        default=True,
        metadata={"help": "Whether a larger metric_for_best_model is better."},
    )
    load_best_model_at_end: bool = field(
        default=True,
        metadata={
            "help": "Load the best validation checkpoint at the end of training. Turned off, with a "
            "warning, when eval_strategy is 'no'."
        },
    )
    # Same union order as TrainingArguments: HfArgumentParser resolves it to `str` only this way.
    report_to: None | str | list[str] = field(  # noqa: RUF036
        default="none",
        metadata={"help": "Integrations to report logs to ('none', 'all', 'tensorboard', ...)."},
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log the objective's terms (loss_clip, loss_rob, fair_reg, fair_D/*, dbpm/*) "
            "every this many optimizer steps (or this fraction of training if < 1)."
        },
    )
    seed: int = field(
        default=42, metadata={"help": "Random seed set at the beginning of training."}
    )

    def __post_init__(self) -> None:
        self.fairness_attributes = _as_attribute_list(
            self.fairness_attributes, "fairness_attributes"
        )
        self.eval_attributes = _as_attribute_list(self.eval_attributes, "eval_attributes")
        self._validate_objective()
        if (
            self.load_best_model_at_end
            and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no"
        ):
            logger.warning(
                "eval_strategy='no': load_best_model_at_end is turned off (there is no evaluation to "
                "choose the best checkpoint from)."
            )
            self.load_best_model_at_end = False
        super().__post_init__()

    def _validate_objective(self) -> None:
        """Reject values outside the method's domain, naming the argument."""
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop sample_id and the attribute columns that the "
                "objective needs: set remove_unused_columns=False."
            )
        if self.dbpm_warmup_epochs < 0:
            raise ValueError(f"dbpm_warmup_epochs must be >= 0, got {self.dbpm_warmup_epochs}.")
        for name in ("dbpm_beta_noisy", "dbpm_beta_faulty"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        choices = {
            "dbpm_threshold": THRESHOLD_RULES,
            "dbpm_weighting": WEIGHTINGS,
            "dbpm_statistic": STATISTICS,
            "fairness_target": FAIRNESS_TARGETS,
            "fairness_ot": OT_METHODS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}."
                )
        if not 0 <= self.fairness_lambda < math.inf:
            raise ValueError(
                f"fairness_lambda must be finite and >= 0, got {self.fairness_lambda}."
            )
        if not self.fairness_blur > 0:
            raise ValueError(f"fairness_blur must be > 0, got {self.fairness_blur}.")
        if self.fairness_min_group_size < 1:
            raise ValueError(
                f"fairness_min_group_size must be >= 1, got {self.fairness_min_group_size}."
            )
        if self.fairness_lambda > 0 and not self.fairness_attributes:
            raise ValueError("fairness_attributes is empty while fairness_lambda > 0.")
        if not self.eval_attributes:
            raise ValueError("eval_attributes must name at least one attribute.")


def _as_attribute_list(value: object, name: str) -> list[str]:
    """Normalise a list (or a comma-separated string) of attribute names and check each one."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of attribute names, got {value!r}.")
    names = [str(item) for item in value]
    unknown = [item for item in names if item not in PROTECTED_ATTRIBUTES]
    if unknown:
        raise ValueError(
            f"{name}: unknown attribute(s) {unknown}; choose from {list(PROTECTED_ATTRIBUTES)}."
        )
    duplicated = sorted({item for item in names if names.count(item) > 1})
    if duplicated:
        raise ValueError(f"{name}: attribute(s) listed more than once: {duplicated}.")
    return names
