"""Zero-shot scoring, the fairness report through the ES-AUC metric, output files and the CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from PIL import Image as PILImage
from sklearn.metrics import roc_auc_score
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer, EvalPrediction
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fairvlm_hf import evaluation
from fairvlm_hf.data import schema
from fairvlm_hf.evaluation import (
    EvaluationArguments,
    FairnessMetrics,
    encode_prompts,
    evaluate_zero_shot,
    fairclip_filter,
    fairness_report,
    flatten_report,
    score_dataset,
    zero_shot_scores,
)


def tiny_processor() -> CLIPProcessor:
    """A CLIP processor with a character-level byte BPE vocabulary (no merges) and 32px images."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_clip(vocab_size: int) -> CLIPModel:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": vocab_size,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**small, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def processor() -> CLIPProcessor:
    return tiny_processor()


@pytest.fixture(scope="module")
def model(processor: CLIPProcessor) -> CLIPModel:
    return tiny_clip(len(processor.tokenizer))


def make_split(n: int = 24, seed: int = 0) -> Dataset:
    """A raw split with the reader's columns: grayscale PIL images of varied sizes, some unknowns.

    Language "Other" (2) holds only glaucoma cases, so that one group has a single class.
    """
    rng = np.random.default_rng(seed)
    glaucoma = np.tile([0, 1], n // 2)
    race = rng.integers(0, 3, n)
    gender = rng.integers(0, 2, n)
    ethnicity = rng.choice([0, 1, -1], n, p=[0.6, 0.25, 0.15])
    language = rng.choice([0, 1, -1], n, p=[0.6, 0.25, 0.15])
    language[[1, 3, 5]] = 2
    images = [
        PILImage.fromarray(
            rng.integers(0, 256, (30 + int(rng.integers(0, 20)), 40)).astype(np.uint8), "L"
        )
        for _ in range(n)
    ]
    features = Features(
        {
            "sample_id": Value("int64"),
            "filename": Value("string"),
            "image": Image(),
            "text": Value("string"),
            "glaucoma": Value("int64"),
            **{a: Value("int64") for a in schema.CATEGORICAL_ATTRIBUTES},
            "age": Value("float32"),
        }
    )
    return Dataset.from_dict(
        {
            "sample_id": list(range(100, 100 + n)),
            "filename": [f"data_{i:05d}.npz" for i in range(n)],
            "image": images,
            "text": ["a fundus photograph"] * n,
            "glaucoma": glaucoma.tolist(),
            "race": race.tolist(),
            "gender": gender.tolist(),
            "ethnicity": ethnicity.tolist(),
            "language": language.tolist(),
            "maritalstatus": rng.choice([0, 1, 2, -1], n).tolist(),
            "age": rng.uniform(30, 90, n).tolist(),
        },
        features=features,
    )


def hand_es_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """ES-AUC from sklearn AUCs over the known samples, single-class groups left out."""
    known = groups != schema.UNKNOWN
    auc = roc_auc_score(labels[known], scores[known])
    gaps = [
        abs(auc - roc_auc_score(labels[groups == g], scores[groups == g]))
        for g in np.unique(groups[known])
        if len(np.unique(labels[groups == g])) == 2
    ]
    return auc / (1 + sum(gaps))


def test_zero_shot_scores_is_softmax_of_scaled_cosines() -> None:
    rng = np.random.default_rng(1)
    images = rng.normal(size=(5, 8))
    prompts = rng.normal(size=(2, 8))
    tau = 37.5
    got = zero_shot_scores(torch.tensor(images), torch.tensor(prompts), tau).numpy()
    for i in range(5):
        cos = [
            images[i] @ prompts[j] / (np.linalg.norm(images[i]) * np.linalg.norm(prompts[j]))
            for j in range(2)
        ]
        expected = math.exp(tau * cos[1]) / (math.exp(tau * cos[0]) + math.exp(tau * cos[1]))
        assert got[i] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_zero_shot_scores_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="prompt_embeds"):
        zero_shot_scores(torch.ones(3, 4), torch.ones(3, 4), 1.0)
    with pytest.raises(ValueError, match="image_embeds"):
        zero_shot_scores(torch.ones(3, 5), torch.ones(2, 4), 1.0)


def test_encode_prompts_normalised_model_embeddings(model, processor) -> None:
    prompts = ["A photo of non-glaucoma", "A photo of glaucoma", "cup"]
    got = encode_prompts(model, processor, prompts)
    inputs = processor(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        raw = model.get_text_features(**inputs).pooler_output
    assert got.shape == (3, 16)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(got, raw / raw.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(model, processor, [])


def test_encode_prompts_through_peft_wrapper(model, processor) -> None:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    prompts = ["A photo of non-glaucoma", "A photo of glaucoma"]
    through_peft = encode_prompts(wrapped, processor, prompts)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    torch.testing.assert_close(
        through_peft, encode_prompts(merged, processor, prompts), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(through_peft, encode_prompts(model, processor, prompts), atol=1e-4)


def test_score_dataset_order_length_and_values(model, processor) -> None:
    split = make_split(10)
    args = EvaluationArguments(batch_size=3)
    model.train()
    scores = score_dataset(model, processor, split, args)
    assert model.training, "score_dataset must restore the model's mode"
    model.eval()
    assert scores.shape == (10,)
    assert np.all((scores > 0) & (scores < 1))
    prompt_embeds = encode_prompts(model, processor, [args.negative_prompt, args.positive_prompt])
    for i in (0, 4, 9):
        rgb = split[i]["image"].convert("RGB")
        with torch.no_grad():
            pixel_values = processor(images=[rgb], return_tensors="pt")["pixel_values"]
            image_embed = model.get_image_features(pixel_values=pixel_values).pooler_output
        expected = zero_shot_scores(image_embed, prompt_embeds, model.logit_scale.exp()).item()
        assert scores[i] == pytest.approx(expected, rel=1e-5)
    reversed_scores = score_dataset(
        model, processor, split.select(range(9, -1, -1)), EvaluationArguments(batch_size=4)
    )
    np.testing.assert_allclose(reversed_scores[::-1], scores, rtol=1e-5)


def _eval_arrays(
    n: int = 60, seed: int = 2
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.3 * labels + rng.uniform(0, 0.7, n), 0, 1)
    attributes = {
        "race": rng.integers(0, 3, n),
        "gender": rng.integers(0, 2, n),
        "language": rng.choice([0, 1, 2, -1], n, p=[0.6, 0.2, 0.1, 0.1]),
    }
    other = np.flatnonzero(attributes["language"] == 2)
    labels[other] = 1
    return scores, labels, attributes


def test_fairness_metrics_equals_metric_called_directly() -> None:
    scores, labels, attributes = _eval_arrays()
    names = list(attributes)
    label_ids = np.column_stack([labels, *(attributes[a] for a in names)])
    got = FairnessMetrics(names)(EvalPrediction(predictions=scores, label_ids=label_ids))
    direct = evaluation.load_metric().compute(
        prediction_scores=scores.tolist(),
        references=labels.tolist(),
        groups=np.column_stack([attributes[a] for a in names]).tolist(),
        attribute_names=names,
        threshold=0.5,
    )
    assert got == pytest.approx(flatten_report(direct))
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores))
    for name in names:
        codes = attributes[name]
        known = codes != schema.UNKNOWN
        assert got[f"es_auc_{name}"] == pytest.approx(hand_es_auc(scores, labels, codes))
        predictions = (scores >= 0.5).astype(int)
        assert got[f"dpd_{name}"] == pytest.approx(
            demographic_parity_difference(
                labels[known], predictions[known], sensitive_features=codes[known]
            )
        )
        assert got[f"deodds_{name}"] == pytest.approx(
            equalized_odds_difference(
                labels[known], predictions[known], sensitive_features=codes[known]
            )
        )


def test_fairness_metrics_rejects_wrong_label_width() -> None:
    scores, labels, attributes = _eval_arrays()
    prediction = EvalPrediction(
        predictions=scores, label_ids=np.column_stack([labels, attributes["race"]])
    )
    with pytest.raises(ValueError, match=r"label_ids: expected shape \[N, 3\]"):
        FairnessMetrics(["race", "gender"])(prediction)


def test_flatten_report_keys_and_no_nan() -> None:
    scores, labels, attributes = _eval_arrays()
    report = fairness_report(scores, labels, attributes)
    flat = flatten_report(report)
    expected = {"auc", "accuracy", "mean_es_auc"}
    for name, codes in attributes.items():
        expected |= {f"{m}_{name}" for m in ("auc", "es_auc", "es_acc", "dpd", "deodds")}
        for code in np.unique(codes[codes != schema.UNKNOWN]):
            if len(np.unique(labels[codes == code])) == 2:
                group = "_".join(schema.group_name(name, code).split())
                expected.add(f"group_auc_{name}_{group}")
    assert set(flat) == expected
    assert "group_auc_language_Other" not in flat
    assert "2" in report["attributes"]["language"]["skipped_groups"]
    assert all(math.isfinite(v) for v in flat.values())
    assert flat["mean_es_auc"] == pytest.approx(
        np.mean([hand_es_auc(scores, labels, codes) for codes in attributes.values()])
    )


def test_fairness_report_rejects_bad_input() -> None:
    scores, labels, attributes = _eval_arrays()
    with pytest.raises(ValueError, match="labels"):
        fairness_report(scores, labels[:-1], attributes)
    with pytest.raises(ValueError, match="0/1"):
        fairness_report(scores, labels * 2, attributes)
    with pytest.raises(ValueError, match="not finite"):
        fairness_report(np.where(labels == 1, np.nan, scores), labels, attributes)
    with pytest.raises(ValueError, match=r"attributes\['race'\]"):
        fairness_report(scores, labels, {"race": attributes["race"][:5]})


def test_arguments_and_metric_path_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown attribute"):
        EvaluationArguments(attributes=["race", "eye_colour"])
    with pytest.raises(ValueError, match="split"):
        EvaluationArguments(split="dev")
    with pytest.raises(FileNotFoundError, match=r"es_auc\.py"):
        evaluation.load_metric(tmp_path / "es_auc")


def test_fairclip_filter_drops_exactly_rows_with_an_unknown() -> None:
    split = make_split(40, seed=5)
    frame = split.select_columns(["sample_id", *schema.PROTECTED_ATTRIBUTES]).to_pandas()
    known = (frame[list(schema.PROTECTED_ATTRIBUTES)] != schema.UNKNOWN).all(axis=1)
    assert 0 < (~known).sum() < len(frame)
    kept, dropped = fairclip_filter(split)
    assert dropped == int((~known).sum())
    assert kept["sample_id"][:] == frame.loc[known, "sample_id"].tolist()


def _png_is_nontrivial(path) -> None:
    with PILImage.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 150
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 10


def test_evaluate_zero_shot_writes_files(model, processor, tmp_path) -> None:
    split = make_split(24)
    args = EvaluationArguments(batch_size=8, attributes=["race", "language"])
    report = evaluate_zero_shot(model, processor, split, args, output_dir=tmp_path)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns[:5]) == [
        "sample_id",
        "filename",
        "score",
        "prediction",
        "label",
    ]
    assert set(schema.CATEGORICAL_ATTRIBUTES) <= set(predictions.columns)
    assert predictions["sample_id"].tolist() == split["sample_id"][:]
    assert predictions["label"].tolist() == split["glaucoma"][:]
    np.testing.assert_allclose(
        predictions["score"], score_dataset(model, processor, split, args), rtol=1e-6
    )
    assert (predictions["prediction"] == (predictions["score"] >= 0.5)).all()
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["num_samples"] == 24 and results["num_dropped"] == 0
    assert results["protocol"] == "all_samples" and results["split"] == "test"
    assert results["prompts"] == {
        "negative": args.negative_prompt,
        "positive": args.positive_prompt,
    }
    assert results["metrics"] == pytest.approx(flatten_report(report))
    assert results["attributes"] == report["attributes"]
    assert results["auc"] == pytest.approx(
        roc_auc_score(predictions["label"], predictions["score"])
    )
    for name in ("fairness_report.png", "score_distributions.png"):
        _png_is_nontrivial(tmp_path / name)


def test_evaluate_zero_shot_fairclip_protocol(model, processor, tmp_path) -> None:
    split = make_split(24)
    frame = split.select_columns(["sample_id", *schema.PROTECTED_ATTRIBUTES]).to_pandas()
    known = (frame[list(schema.PROTECTED_ATTRIBUTES)] != schema.UNKNOWN).all(axis=1)
    args = EvaluationArguments(batch_size=8, fairclip_protocol=True, output_dir=str(tmp_path))
    report = evaluate_zero_shot(model, processor, split, args)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["sample_id"].tolist() == frame.loc[known, "sample_id"].tolist()
    assert report["num_samples"] == int(known.sum())
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["num_dropped"] == int((~known).sum()) and results["protocol"] == "fairclip"
    for attribute in schema.PROTECTED_ATTRIBUTES:
        assert report["attributes"][attribute]["num_unknown"] == 0


def test_cli_evaluates_a_fairvlmed_folder(model, processor, tmp_path, capsys) -> None:
    from fairvlm_hf.cli import main
    from fairvlm_hf.data import load_fairvlmed
    from fairvlm_hf.data.synthetic import SyntheticConfig, generate_synthetic

    data_dir = generate_synthetic(
        tmp_path / "FairVLMed",
        SyntheticConfig(num_train=4, num_validation=4, num_test=24, image_size=32),
        num_workers=0,
    )
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--data_dir", str(data_dir)]
    argv += ["--output_dir", str(out), "--batch_size", "8", "--fairclip_protocol"]
    argv += ["--cache_dir", str(tmp_path / "cache")]
    code = main(argv)
    assert code == 0
    stdout = capsys.readouterr().out
    test = load_fairvlmed(data_dir, cache_dir=tmp_path / "cache", splits=["test"])["test"]
    frame = test.select_columns(["sample_id", *schema.PROTECTED_ATTRIBUTES]).to_pandas()
    known = (frame[list(schema.PROTECTED_ATTRIBUTES)] != schema.UNKNOWN).all(axis=1)
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["sample_id"]) == sorted(frame.loc[known, "sample_id"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_dropped"] == int((~known).sum())
    assert results["metrics"]["auc"] == pytest.approx(
        roc_auc_score(predictions["label"], predictions["score"])
    )
    for attribute in schema.PROTECTED_ATTRIBUTES:
        assert f"| {attribute} | {results['metrics'][f'auc_{attribute}']:.4f} |" in stdout
    for name in ("predictions.csv", "eval_results.json", "fairness_report.png"):
        assert str(out / name) in stdout
