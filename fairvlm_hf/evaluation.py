"""Zero-shot glaucoma evaluation with the per-group fairness report.

A CLIP-style model scores each image against two prompts (negative, positive); the score is the
softmax probability of the positive prompt. AUC, ES-AUC and the group metrics come from the
``evaluate`` module in ``metrics/es_auc`` -- the one implementation of that arithmetic -- so that
training-time evaluation, this command and the published metric always agree.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

from fairvlm_hf.data import schema
from fairvlm_hf.paths import METRIC_DIR

logger = logging.getLogger(__name__)

#: The ES-AUC ``evaluate`` module shipped with the package.

PREDICTIONS_FILE = "predictions.csv"
RESULTS_FILE = "eval_results.json"
FAIRNESS_PLOT_FILE = "fairness_report.png"
DISTRIBUTIONS_PLOT_FILE = "score_distributions.png"


@dataclass
class EvaluationArguments:
    """How the zero-shot evaluation scores and reports (METHOD.md, section 5)."""

    negative_prompt: str = field(
        default="A photo of non-glaucoma",
        metadata={"help": "Text prompt of the negative class (non-glaucoma)."},
    )
    positive_prompt: str = field(
        default="A photo of glaucoma",
        metadata={"help": "Text prompt of the positive class (glaucoma)."},
    )
    attributes: list[str] = field(
        default_factory=lambda: list(schema.PROTECTED_ATTRIBUTES),
        metadata={
            "help": "Attributes to report per group, among "
            f"{', '.join(schema.CATEGORICAL_ATTRIBUTES)}."
        },
    )
    fairclip_protocol: bool = field(
        default=False,
        metadata={
            "help": "Drop every sample whose race, gender, ethnicity or language is unknown "
            "before scoring, as FairCLIP's evaluation does, so that numbers compare with the "
            "papers. By default every sample is kept and unknowns belong to no group."
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    threshold: float = field(
        default=0.5,
        metadata={"help": "Score at or above which a sample is predicted glaucoma."},
    )
    split: str = field(
        default="test",
        metadata={"help": "Split to evaluate (train, validation or test)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for predictions.csv, eval_results.json and the plots."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.attributes, str):
            self.attributes = [self.attributes]
        self.attributes = list(self.attributes)
        if not self.attributes:
            raise ValueError("attributes: give at least one attribute")
        unknown = [a for a in self.attributes if a not in schema.CODINGS]
        if unknown:
            raise ValueError(
                f"attributes: unknown attribute(s) {unknown}; "
                f"choose among {list(schema.CATEGORICAL_ATTRIBUTES)}"
            )
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes: duplicates in {self.attributes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.split not in schema.SPLIT_FOLDERS:
            raise ValueError(
                f"split: expected one of {list(schema.SPLIT_FOLDERS)}, got {self.split!r}"
            )


def load_metric(path: str | Path | None = None) -> Any:
    """The ES-AUC ``evaluate`` module (default :data:`METRIC_DIR`), loaded once per process."""
    return _load_metric(Path(METRIC_DIR if path is None else path).resolve())


@functools.lru_cache(maxsize=4)
def _load_metric(path: Path) -> Any:
    script = path / f"{path.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"ES-AUC metric not found: expected the evaluate module {script}")
    import evaluate

    return evaluate.load(str(path), keep_in_memory=True)


def _text_or_image_embedding(output: Any) -> torch.Tensor:
    """The embedding from ``get_text_features`` / ``get_image_features`` (tensor or output object)."""
    if isinstance(output, torch.Tensor):
        return output
    embedding = getattr(output, "pooler_output", None)
    if embedding is None:
        raise TypeError(
            f"expected a tensor or an output with .pooler_output, got {type(output).__name__}"
        )
    return embedding


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the model and dtype of its first floating-point parameter."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    raise ValueError("model has no floating-point parameters")


def _logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """The multiplier tau = exp(logit_scale) of a CLIP-style model (or a PeftModel around one)."""
    log_scale = getattr(model, "logit_scale", None)
    if not isinstance(log_scale, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no logit_scale tensor: not a CLIP-style model")
    return log_scale.detach().float().exp()


@torch.no_grad()
def encode_prompts(model: torch.nn.Module, processor: Any, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings ``[P, D]`` of ``prompts`` (float32, on the model's device)."""
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompts: expected non-empty strings, got {prompts!r}")
    device, _ = _model_device_dtype(model)
    inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
    output = model.get_text_features(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
    )
    embeds = _text_or_image_embedding(output).float()
    return torch.nn.functional.normalize(embeds, dim=-1)


def zero_shot_scores(
    image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """Probability of the positive prompt: ``softmax(tau * [cos_neg, cos_pos])[1]`` per image.

    ``prompt_embeds`` holds the negative then the positive prompt (``[2, D]``); ``logit_scale`` is
    the multiplier tau itself (``model.logit_scale.exp()``). Both sides are L2-normalised here, so
    the products are cosines.
    """
    if prompt_embeds.ndim != 2 or prompt_embeds.shape[0] != 2:
        raise ValueError(
            f"prompt_embeds: expected shape [2, D] (negative, positive), got {list(prompt_embeds.shape)}"
        )
    if image_embeds.ndim != 2 or image_embeds.shape[1] != prompt_embeds.shape[1]:
        raise ValueError(
            f"image_embeds: expected shape [B, {prompt_embeds.shape[1]}], "
            f"got {list(image_embeds.shape)}"
        )
    images = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    prompts = torch.nn.functional.normalize(prompt_embeds.float().to(images.device), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=images.device)
    logits = scale * images @ prompts.T
    return logits.softmax(dim=-1)[:, 1]


def _require_columns(dataset: Dataset, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(
            f"dataset is missing column(s) {missing}; it has {dataset.column_names} "
            "(expected the columns of fairvlm_hf.data.load_fairvlmed)"
        )


@torch.no_grad()
def score_dataset(
    model: torch.nn.Module, processor: Any, dataset: Dataset, args: EvaluationArguments
) -> np.ndarray:
    """Zero-shot glaucoma scores ``[N]`` for every row of ``dataset``, in row order.

    ``dataset`` is a raw split (PIL images in column ``image``); grayscale images are repeated to
    RGB before the processor. Runs without gradients on the model's device, in eval mode (the
    previous mode is restored).
    """
    _require_columns(dataset, ["image"])
    was_training = model.training
    model.eval()
    try:
        device, dtype = _model_device_dtype(model)
        prompt_embeds = encode_prompts(
            model, processor, [args.negative_prompt, args.positive_prompt]
        )
        scale = _logit_scale(model)
        images = dataset.select_columns(["image"])
        scores: list[np.ndarray] = []
        starts = range(0, len(images), args.batch_size)
        for start in tqdm(starts, desc="zero-shot scoring", unit="batch", leave=False):
            batch = images[start : start + args.batch_size]["image"]
            rgb = [image.convert("RGB") for image in batch]
            pixel_values = processor(images=rgb, return_tensors="pt")["pixel_values"]
            output = model.get_image_features(pixel_values=pixel_values.to(device, dtype))
            batch_scores = zero_shot_scores(_text_or_image_embedding(output), prompt_embeds, scale)
            scores.append(batch_scores.cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    result = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float64)
    if not np.all(np.isfinite(result)):
        raise FloatingPointError(
            f"{int((~np.isfinite(result)).sum())} zero-shot scores are not finite"
        )
    return result


def fairness_report(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    attributes: Mapping[str, Sequence[int] | np.ndarray],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """AUC, accuracy and, per attribute, ES-AUC and the group metrics, from the ES-AUC metric.

    ``attributes`` maps each attribute name to its integer codes per sample (-1 = unknown).
    Returns the metric's multi-attribute report (see ``metrics/es_auc/README.md``).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels_array = np.asarray(labels).reshape(-1)
    n = scores.shape[0]
    if n == 0:
        raise ValueError("scores: no samples to evaluate")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores: {int((~np.isfinite(scores)).sum())} values are not finite")
    if labels_array.shape[0] != n:
        raise ValueError(f"labels: {labels_array.shape[0]} values for {n} scores")
    if not np.isin(labels_array, (0, 1)).all():
        raise ValueError(f"labels: expected 0/1, got values {sorted(set(labels_array.tolist()))}")
    if not attributes:
        raise ValueError("attributes: give at least one attribute")
    names = list(attributes)
    columns = []
    for name in names:
        codes = np.asarray(attributes[name]).reshape(-1)
        if codes.shape[0] != n:
            raise ValueError(f"attributes[{name!r}]: {codes.shape[0]} values for {n} scores")
        if not np.all(np.equal(np.mod(codes, 1), 0)):
            raise ValueError(f"attributes[{name!r}]: expected integer codes")
        columns.append(codes.astype(np.int64))
    groups = np.stack(columns, axis=1)
    return load_metric().compute(
        prediction_scores=scores.tolist(),
        references=labels_array.astype(np.int64).tolist(),
        groups=groups.tolist(),
        attribute_names=names,
        threshold=float(threshold),
    )


def _key_part(name: str) -> str:
    """Group names as metric-key parts: spaces become underscores (``Married_or_Partnered``)."""
    return "_".join(str(name).split())


def _put_finite(flat: dict[str, float], key: str, value: Any) -> None:
    """Store ``value`` under ``key`` if it is a finite number; say so when it is not."""
    if value is None or not math.isfinite(float(value)):
        logger.warning("metric %s is undefined (%r): left out of the flat metrics", key, value)
        return
    flat[key] = float(value)


def flatten_report(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``{name: float}`` metrics from a fairness report, for Trainer logs and model cards.

    Keys: ``auc``, ``accuracy``, per attribute ``auc_<a>``, ``es_auc_<a>``, ``es_acc_<a>``,
    ``dpd_<a>``, ``deodds_<a>``, ``group_auc_<a>_<group name>``, and ``mean_es_auc`` (mean over
    attributes). A skipped group has no key (the report gives its reason); no value is NaN.
    """
    if "attributes" not in report:
        raise KeyError("report: no 'attributes' entry (expected the multi-attribute report)")
    flat: dict[str, float] = {}
    _put_finite(flat, "auc", report.get("auc"))
    _put_finite(flat, "accuracy", report.get("accuracy"))
    es_aucs = []
    for attribute, result in report["attributes"].items():
        for metric in ("auc", "es_auc", "es_acc", "dpd", "deodds"):
            _put_finite(flat, f"{metric}_{attribute}", result.get(metric))
        if f"es_auc_{attribute}" in flat:
            es_aucs.append(flat[f"es_auc_{attribute}"])
        for code, auc in sorted(result.get("group_auc", {}).items(), key=lambda kv: int(kv[0])):
            name = _key_part(schema.group_name(attribute, int(code)))
            _put_finite(flat, f"group_auc_{attribute}_{name}", auc)
    if es_aucs:
        flat["mean_es_auc"] = float(np.mean(es_aucs))
    return flat


class FairnessMetrics:
    """``compute_metrics`` for ``Trainer``: fairness metrics of zero-shot scores.

    Expects ``EvalPrediction.predictions`` = scores ``[N]`` and ``label_ids`` = ``[N, 1 + K]``
    (glaucoma, then the codes of the K ``attributes`` in this order). Returns ``flatten_report``.
    """

    def __init__(self, attributes: Sequence[str], threshold: float = 0.5) -> None:
        self.attributes = list(attributes)
        if not self.attributes:
            raise ValueError("attributes: give at least one attribute")
        self.threshold = float(threshold)

    def report(self, eval_prediction: Any) -> dict[str, Any]:
        """The full fairness report of an ``EvalPrediction``."""
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1:
            raise ValueError(f"predictions: expected scores of shape [N], got {list(scores.shape)}")
        label_ids = np.asarray(eval_prediction.label_ids)
        expected = 1 + len(self.attributes)
        if label_ids.ndim != 2 or label_ids.shape[1] != expected:
            raise ValueError(
                f"label_ids: expected shape [N, {expected}] (glaucoma, {', '.join(self.attributes)}),"
                f" got {list(label_ids.shape)}"
            )
        attributes = {name: label_ids[:, 1 + k] for k, name in enumerate(self.attributes)}
        return fairness_report(scores, label_ids[:, 0], attributes, self.threshold)

    def __call__(self, eval_prediction: Any) -> dict[str, float]:
        return flatten_report(self.report(eval_prediction))


def fairclip_filter(dataset: Dataset) -> tuple[Dataset, int]:
    """Keep only rows whose four protected attributes are all known; return them and the count dropped."""
    _require_columns(dataset, schema.PROTECTED_ATTRIBUTES)
    codes = np.stack([np.asarray(dataset[a]) for a in schema.PROTECTED_ATTRIBUTES], axis=1)
    keep = np.flatnonzero((codes != schema.UNKNOWN).all(axis=1))
    dropped = len(dataset) - len(keep)
    logger.info(
        "FairCLIP protocol: dropped %d of %d samples with an unknown %s",
        dropped,
        len(dataset),
        "/".join(schema.PROTECTED_ATTRIBUTES),
    )
    return dataset.select(keep), dropped


def _json_safe(value: Any, key: str = "") -> Any:
    """Report values as JSON: numpy scalars to Python, non-finite floats to null (with a warning)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, key) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        logger.warning("%s is %r: written as null", key, value)
        return None
    return value


def _select_split(dataset: Dataset | DatasetDict, split: str) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise KeyError(f"split {split!r} not found; the data has {list(dataset)}")
        return dataset[split]
    return dataset


def evaluate_zero_shot(
    model: torch.nn.Module,
    processor: Any,
    dataset: Dataset | DatasetDict,
    args: EvaluationArguments,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a split zero-shot, build the fairness report and, with an output folder, write files.

    ``dataset`` is a raw split or a ``DatasetDict`` (then ``args.split`` is taken). With
    ``output_dir`` (or ``args.output_dir``) writes ``predictions.csv``, ``eval_results.json``,
    ``fairness_report.png`` and ``score_distributions.png``. Returns the metric's report.
    """
    split = _select_split(dataset, args.split)
    _require_columns(
        split, ["sample_id", "filename", "image", schema.LABEL_COLUMN, *args.attributes]
    )
    num_dropped = 0
    if args.fairclip_protocol:
        split, num_dropped = fairclip_filter(split)
    if len(split) == 0:
        raise ValueError(f"split {args.split!r}: no samples left to evaluate")
    scores = score_dataset(model, processor, split, args)
    columns = split.select_columns(
        [c for c in split.column_names if c not in ("image", "text")]
    ).to_pandas()
    labels = columns[schema.LABEL_COLUMN].to_numpy()
    attributes = {a: columns[a].to_numpy() for a in args.attributes}
    report = fairness_report(scores, labels, attributes, args.threshold)
    flat = flatten_report(report)
    logger.info(
        "zero-shot %s: AUC %.4f, mean ES-AUC %.4f over %d samples",
        args.split,
        flat.get("auc", float("nan")),
        flat.get("mean_es_auc", float("nan")),
        len(split),
    )
    output_dir = output_dir if output_dir is not None else args.output_dir
    if output_dir is not None:
        frame = predictions_frame(columns, scores, args.threshold)
        write_evaluation_outputs(
            Path(output_dir), report, flat, frame, args, num_dropped=num_dropped
        )
    return report


def predictions_frame(columns: pd.DataFrame, scores: np.ndarray, threshold: float) -> pd.DataFrame:
    """The ``predictions.csv`` table: ids, score, thresholded prediction, label, attribute codes."""
    frame = pd.DataFrame(
        {
            "sample_id": columns["sample_id"].to_numpy(),
            "filename": columns["filename"].to_numpy(),
            "score": scores,
            "prediction": (scores >= threshold).astype(np.int64),
            "label": columns[schema.LABEL_COLUMN].to_numpy().astype(np.int64),
        }
    )
    for attribute in schema.CATEGORICAL_ATTRIBUTES:
        if attribute in columns:
            frame[attribute] = columns[attribute].to_numpy().astype(np.int64)
    if "age" in columns:
        frame["age"] = columns["age"].to_numpy()
    return frame


def write_evaluation_outputs(
    output_dir: Path,
    report: Mapping[str, Any],
    flat: Mapping[str, float],
    frame: pd.DataFrame,
    args: EvaluationArguments,
    num_dropped: int = 0,
) -> dict[str, Path]:
    """Write predictions, results JSON and plots into ``output_dir``; return the paths by kind.

    ``eval_results.json`` holds the report's own keys at the top level (so that it reads as a
    report, e.g. for the model card), plus ``metrics`` (flat), ``split``, ``protocol``,
    ``num_dropped``, ``prompts``, ``threshold`` and ``arguments``.
    """
    from fairvlm_hf import reporting

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": output_dir / PREDICTIONS_FILE,
        "results": output_dir / RESULTS_FILE,
    }
    frame.to_csv(paths["predictions"], index=False)
    results = {
        **report,
        "metrics": dict(flat),
        "split": args.split,
        "protocol": "fairclip" if args.fairclip_protocol else "all_samples",
        "num_dropped": int(num_dropped),
        "prompts": {"negative": args.negative_prompt, "positive": args.positive_prompt},
        "threshold": args.threshold,
        "arguments": asdict(args),
    }
    paths["results"].write_text(
        json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    paths["fairness_plot"] = reporting.plot_fairness_report(report, output_dir / FAIRNESS_PLOT_FILE)
    paths["distributions_plot"] = reporting.plot_score_distributions(
        frame, args.attributes, output_dir / DISTRIBUTIONS_PLOT_FILE
    )
    for kind, path in paths.items():
        logger.info("wrote %s: %s", kind, path)
    return paths


@dataclass
class EvaluationCommandArguments:
    """What to evaluate: a model folder (or Hub id) and a FairVLMed data folder."""

    model: str = field(
        metadata={"help": "Model folder or Hub id that AutoModel and AutoProcessor load."}
    )
    data_dir: str = field(metadata={"help": "Folder in the Harvard-FairVLMed layout."})
    device: str | None = field(
        default=None, metadata={"help": "torch device; default cuda when available, else cpu."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache folder for the dataset built from data_dir."}
    )


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``fairvlm-hf evaluate``: zero-shot evaluation of a model on a FairVLMed folder."""
    from transformers import HfArgumentParser

    from fairvlm_hf import reporting
    from fairvlm_hf.data import load_fairvlmed
    from fairvlm_hf.modeling import ModelArguments, load_model_and_processor

    parser = HfArgumentParser(
        (EvaluationCommandArguments, EvaluationArguments),
        prog="fairvlm-hf evaluate",
        description="Zero-shot glaucoma evaluation with the per-group fairness report.",
    )
    command, args = parser.parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv), look_for_args_file=False
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = command.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model_and_processor(ModelArguments(model_name_or_path=command.model))
    model.to(device)
    data = load_fairvlmed(command.data_dir, cache_dir=command.cache_dir, splits=[args.split])
    report = evaluate_zero_shot(model, processor, data, args)
    sys.stdout.write(reporting.format_summary_table(report) + "\n")
    if args.output_dir is not None:
        sys.stdout.write("\nwritten:\n")
        for name in (PREDICTIONS_FILE, RESULTS_FILE, FAIRNESS_PLOT_FILE, DISTRIBUTIONS_PLOT_FILE):
            sys.stdout.write(f"  {Path(args.output_dir) / name}\n")
    return 0
