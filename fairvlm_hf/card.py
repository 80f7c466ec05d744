"""The model card (``README.md``) of a fine-tuned model: metadata the Hub reads, and a readable body.

The metadata carries the zero-shot results as a ``model-index`` (AUC overall, ES-AUC per protected
attribute) so that the Hub shows them; the body says what the model is, how to load it, the
per-group results, the training configuration, the bad pairs that were found and the limits.
Local paths are reduced to their base names and secrets are dropped: a card is meant to be public.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fairvlm_hf.data.schema import group_name

logger = logging.getLogger(__name__)

TASK = "zero-shot-image-classification"
TAGS = ["clip", "fairness", "medical-imaging", "fairvlm-hf"]
#: Zero-shot prompts of the evaluation, shown in the usage example.
PROMPT_TEMPLATE = "A photo of {}"
CANDIDATE_LABELS = ("non-glaucoma", "glaucoma")
#: Licence of the real Harvard-FairVLMed data; models trained on it inherit its restrictions.
FAIRVLMED_LICENSE = "cc-by-nc-nd-4.0"
SYNTHETIC_LICENSE = "apache-2.0"

_SECRET_KEY = re.compile(
    r"(^|_)(token|secret|password|passwd|api_?key|credentials?)($|_)", re.IGNORECASE
)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~\\])~?/[\w.-][^\s'\"`()\[\]<>|,;]*")

CITATIONS = """\
- S. Bansal, M. Wu, X. Wang, S. Hu. *Robust Fairness Vision-Language Learning for Medical Image
  Analysis.* arXiv:2505.03153, 2025.
- X. Lan, H. Yan, S. Hong, M. Feng. *Towards Enhancing Time Series Contrastive Learning: A Dynamic
  Bad Pair Mining Approach.* ICLR 2024, arXiv:2302.03357 (Dynamic Bad Pair Mining).
- Y. Luo et al. *FairCLIP: Harnessing Fairness in Vision-Language Learning.* CVPR 2024
  (Harvard-FairVLMed, ES-AUC, the Sinkhorn group term).
- A. Radford et al. *Learning Transferable Visual Models From Natural Language Supervision.*
  ICML 2021 (CLIP).
"""


def scrub_text(text: str) -> str:
    """``text`` with absolute local paths reduced to their base names and Hub tokens removed."""

    def basename(match: re.Match[str]) -> str:
        path = match.group(0).rstrip("/.")
        return os.path.basename(path) or "."

    return _TOKEN_VALUE.sub("<redacted>", _ABSOLUTE_PATH.sub(basename, text))


def sanitize(value: Any) -> Any:
    """A copy of ``value`` fit for a public card: secret-named keys dropped, paths shortened.

    Mappings lose every key whose name suggests a secret (token, password, api key ...); strings
    and ``Path`` objects lose their directories when absolute; lists and tuples are walked.
    """
    if isinstance(value, Mapping):
        return {str(k): sanitize(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return scrub_text(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if isinstance(value, str) else text


def _sorted_codes(*mappings: Mapping[Any, Any]) -> list[Any]:
    codes = {code for mapping in mappings for code in mapping}

    def key(code: Any) -> tuple[int, Any]:
        try:
            return (0, int(code))
        except (TypeError, ValueError):
            return (1, str(code))

    return sorted(codes, key=key)


def _dataset_type(dataset_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", dataset_name.lower()).strip("-") or "dataset"


def _check_eval_results(eval_results: Mapping[str, Any]) -> None:
    for key in ("auc", "attributes"):
        if key not in eval_results:
            raise ValueError(f"eval_results: missing key {key!r}")
    if not isinstance(eval_results["attributes"], Mapping):
        raise ValueError("eval_results['attributes']: expected a mapping attribute -> metrics")
    for attribute, metrics in eval_results["attributes"].items():
        for key in ("auc", "es_auc"):
            if key not in metrics:
                raise ValueError(f"eval_results['attributes'][{attribute!r}]: missing key {key!r}")


def build_eval_results(eval_results: Mapping[str, Any], dataset_name: str) -> list[EvalResult]:
    """The ``model-index`` entries: AUC and accuracy overall, ES-AUC per attribute (test split).

    A value that is missing or not finite has no entry (the Hub cannot show it); it is logged and
    the body's tables show it as ``n/a``.
    """
    _check_eval_results(eval_results)
    common = {
        "task_type": TASK,
        "dataset_type": _dataset_type(dataset_name),
        "dataset_name": dataset_name,
        "dataset_split": "test",
    }
    entries: list[tuple[str, str, Any, str | None]] = [
        ("roc_auc", "AUC", eval_results.get("auc"), None),
        ("accuracy", "Accuracy", eval_results.get("accuracy"), None),
    ]
    for attribute, metrics in eval_results["attributes"].items():
        entries.append(("es_auc", f"ES-AUC ({attribute})", metrics.get("es_auc"), str(attribute)))
    results = []
    for metric_type, metric_name, value, config in entries:
        if not _is_number(value):
            if value is not None or metric_type != "accuracy":
                logger.warning("%s is %r: left out of the model-index", metric_name, value)
            continue
        results.append(
            EvalResult(
                **common,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=float(value),
                metric_config=config,
            )
        )
    return results


def _results_section(eval_results: Mapping[str, Any]) -> str:
    lines = ["## Evaluation results", ""]
    overall = [f"AUC **{_fmt(eval_results.get('auc'))}**"]
    if "accuracy" in eval_results:
        overall.append(f"accuracy {_fmt(eval_results['accuracy'])}")
    if "num_samples" in eval_results:
        overall.append(f"{eval_results['num_samples']} test samples")
    lines += [
        "Zero-shot glaucoma detection on the test split ("
        + ", ".join(overall)
        + f"). Prompts: {', '.join(repr(PROMPT_TEMPLATE.format(c)) for c in CANDIDATE_LABELS)}; "
        "scores thresholded at 0.5 for accuracy, ES-Acc, DPD and DEOdds. "
        "ES-AUC = AUC / (1 + sum over groups of |AUC - AUC_group|).",
        "",
        "| attribute | AUC | ES-AUC | ES-Acc | DPD | DEOdds |",
        "|---|---|---|---|---|---|",
    ]
    attributes = eval_results["attributes"]
    for attribute, m in attributes.items():
        lines.append(
            f"| {attribute} | {_fmt(m.get('auc'))} | {_fmt(m.get('es_auc'))} | "
            f"{_fmt(m.get('es_acc'))} | {_fmt(m.get('dpd'))} | {_fmt(m.get('deodds'))} |"
        )
    for attribute, m in attributes.items():
        group_auc = m.get("group_auc") or {}
        group_size = m.get("group_size") or {}
        skipped = m.get("skipped_groups") or {}
        lines += ["", f"### Groups of {attribute}", "", "| group | size | AUC |", "|---|---|---|"]
        for code in _sorted_codes(group_auc, group_size, skipped):
            if code in skipped:
                auc = f"not computed: {scrub_text(str(skipped[code]))}"
            else:
                auc = _fmt(group_auc.get(code))
            size = group_size.get(code, "n/a")
            lines.append(f"| {group_name(attribute, code)} ({code}) | {size} | {auc} |")
    return "\n".join(lines)


def _config_section(training_config: Mapping[str, Any]) -> str:
    clean = sanitize(training_config)
    lines = ["## Training configuration", ""]
    if not clean:
        return "\n".join([*lines, "No configuration was recorded."])
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in clean.items()]
    return "\n".join(lines)


def _bad_pair_section(summary: Mapping[str, Any] | None) -> str:
    lines = ["## Bad image-text pairs", ""]
    if summary is None:
        return "\n".join(
            [*lines, "Dynamic Bad Pair Mining was not used, or no summary was recorded."]
        )
    clean = sanitize(summary)
    counts = clean.pop("counts", None)
    if counts is not None:
        lines += ["Pairs flagged by Dynamic Bad Pair Mining, by kind:", ""]
        lines += ["| kind | pairs |", "|---|---|"]
        lines += [f"| {kind} | {n} |" for kind, n in counts.items()]
        lines.append("")
    for key in ("precision", "recall"):
        value = clean.pop(key, None)
        if isinstance(value, Mapping):
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
            lines.append(f"- {key} against the planted ground truth: {parts}")
        elif value is not None:
            lines.append(f"- {key} against the planted ground truth: {_fmt(value)}")
    lines += [f"- {key}: {_cell(value)}" for key, value in clean.items()]
    return "\n".join(lines).rstrip()


def _plot_links(output_dir: Path, plots: Sequence[str | os.PathLike[str]]) -> list[str]:
    links = []
    root = output_dir.resolve()
    for plot in plots:
        path = Path(plot)
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(root)
            except ValueError as error:
                raise ValueError(
                    f"plots: {plot} lies outside {output_dir}; copy it into the folder first"
                ) from error
        if not (root / path).is_file():
            logger.warning("plot %s does not exist (yet) in %s", path.as_posix(), output_dir)
        links.append(path.as_posix())
    return links


def _usage_section(repo_id: str, adapter: bool, base_model: str | None) -> str:
    labels = ", ".join(f'"{c}"' for c in CANDIDATE_LABELS)
    if adapter:
        base = base_model or "BASE_MODEL"
        return f"""## How to use

This repository holds a LoRA adapter (peft) and the processor; load it on its base model:

```python
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
```"""
    return f"""## How to use

```python
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")

classifier = pipeline("zero-shot-image-classification", model="{repo_id}")
classifier(image, candidate_labels=[{labels}], hypothesis_template="{PROMPT_TEMPLATE}")
```

`image` is a PIL image of an SLO fundus scan (grayscale images are converted to RGB)."""


def _limitations_section(synthetic: bool, license: str, eval_results: Mapping[str, Any]) -> str:
    lines = ["## Limitations", ""]
    if synthetic:
        lines.append(
            "- **Trained and evaluated on SYNTHETIC data** in the Harvard-FairVLMed layout. The "
            "numbers above say that the pipeline works; they say nothing about glaucoma "
            "detection on real patients."
        )
    lines += [
        "- Research model, not a medical device: not for diagnosis or clinical decisions.",
        f"- Licence: `{license}`"
        + (
            "."
            if synthetic
            else " by default, the terms of the Harvard-FairVLMed data (non-commercial, no "
            "derivatives): check them before any use beyond research."
        ),
        "- Group metrics on small groups are noisy; groups whose test labels hold one class "
        "have no AUC and are listed as not computed rather than counted.",
        "- ES-AUC summarises one attribute at a time; a model fair on one attribute may not be "
        "fair on another, or on intersections of attributes.",
    ]
    skipped = {
        attribute: m.get("skipped_groups")
        for attribute, m in eval_results["attributes"].items()
        if m.get("skipped_groups")
    }
    if skipped:
        names = "; ".join(
            f"{attribute}: " + ", ".join(group_name(attribute, c) for c in groups)
            for attribute, groups in skipped.items()
        )
        lines.append(f"- Groups left out of ES-AUC in this evaluation: {names}.")
    return "\n".join(lines)


def write_model_card(
    output_dir: str | os.PathLike[str],
    *,
    model_name: str,
    base_model: str | None,
    dataset_name: str,
    eval_results: Mapping[str, Any],
    training_config: Mapping[str, Any],
    bad_pair_summary: Mapping[str, Any] | None,
    plots: Sequence[str | os.PathLike[str]],
    extra_markdown: str = "",
    repo_id: str | None = None,
    synthetic: bool | None = None,
    license: str | None = None,
    adapter: bool | None = None,
) -> Path:
    """Write ``README.md`` into ``output_dir`` and return its path.

    ``eval_results`` has the metric's multi-attribute form (``auc``, ``accuracy``, ``num_samples``,
    ``attributes``: per attribute ``auc``, ``es_auc``, ``es_acc``, ``dpd``, ``deodds``,
    ``group_auc``, ``group_size``, ``skipped_groups``). ``bad_pair_summary`` may hold ``counts``
    (kind -> pairs), ``precision`` and ``recall`` (numbers or kind -> number) and other facts.
    ``plots`` are files inside ``output_dir``, linked relatively. ``repo_id`` is used in the
    loading examples (default ``model_name``). ``synthetic`` defaults to whether ``dataset_name``
    says so; ``license`` defaults to Apache-2.0 for synthetic data and to the data's own
    CC BY-NC-ND 4.0 otherwise; ``adapter`` defaults to whether the folder holds a peft adapter.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output_dir: {out} is not a folder")
    if synthetic is None:
        synthetic = "synthetic" in dataset_name.lower()
    if license is None:
        license = SYNTHETIC_LICENSE if synthetic else FAIRVLMED_LICENSE
    if adapter is None:
        adapter = (out / "adapter_config.json").is_file()
    hub_base = base_model if base_model and not Path(base_model).expanduser().exists() else None
    if hub_base is not None and (hub_base.startswith(("/", "~", ".")) or hub_base.count("/") > 1):
        hub_base = None
    base_text = (
        f"`{scrub_text(base_model)}`"
        if base_model
        else "the small default CLIP of fairvlm-hf (random initialisation, tokenizer trained on "
        "the training notes)"
    )
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_base,
        license=license,
        library_name="transformers",
        pipeline_tag=TASK,
        tags=list(TAGS),
        eval_results=build_eval_results(eval_results, dataset_name),
    )
    usage_id = repo_id or model_name
    sections = [
        f"# {model_name}",
        f"A CLIP-style vision-language model fine-tuned with "
        f"[fairvlm-hf](https://github.com/fairvlm-hf/fairvlm-hf) on **{dataset_name}** "
        f"(SLO fundus images with clinical notes) for zero-shot glaucoma detection. Base model: "
        f"{base_text}. The objective weights down suspicious image-text pairs found by Dynamic "
        "Bad Pair Mining and adds a Sinkhorn regulariser that pulls each patient group's loss "
        "distribution towards the whole batch's, for robust and fair fine-tuning.",
        _usage_section(usage_id, adapter, hub_base),
        _results_section(eval_results),
        _config_section(training_config),
        _bad_pair_section(bad_pair_summary),
    ]
    links = _plot_links(out, plots)
    if links:
        sections.append("\n".join(["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in links)]))
    if extra_markdown.strip():
        sections.append(scrub_text(extra_markdown.strip()))
    sections += [
        _limitations_section(synthetic, license, eval_results),
        "## Citation\n\n" + CITATIONS,
    ]
    body = "\n\n".join(s.strip() for s in sections) + "\n"
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{_TOKEN_VALUE.sub('<redacted>', body)}")
    path = out / "README.md"
    card.save(path)
    logger.info("wrote the model card %s", path)
    return path
