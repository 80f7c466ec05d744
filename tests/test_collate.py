"""Processor transform and collator: shapes, dtypes, padding, metadata, and a CLIP forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPModel

from fairvlm_hf.data import schema
from fairvlm_hf.data.collate import META_COLUMNS, FairVLMedCollator, with_processor_transform


@pytest.fixture(scope="module")
def train(tiny_fairvlmed_dataset):
    return tiny_fairvlmed_dataset["train"]


def test_transform_is_lazy_and_matches_the_processor(train, tiny_clip_processor):
    view = with_processor_transform(train, tiny_clip_processor, max_length=16)
    assert "image" in train[0], "the source dataset keeps its format"
    row, raw = view[3], train[3]
    assert set(row) == {"pixel_values", "input_ids", "attention_mask", *META_COLUMNS}
    expected = tiny_clip_processor.image_processor(
        images=[raw["image"].convert("RGB")], return_tensors="pt"
    )["pixel_values"][0]
    assert row["pixel_values"].shape == (3, 32, 32)
    torch.testing.assert_close(torch.as_tensor(row["pixel_values"]), expected)
    tokens = tiny_clip_processor.tokenizer(raw["text"], truncation=True, max_length=16)
    assert row["input_ids"] == tokens["input_ids"] and len(row["input_ids"]) == 16
    assert all(row[name] == raw[name] for name in META_COLUMNS)


def test_collator_shapes_dtypes_and_padding(train, tiny_clip_processor):
    view = with_processor_transform(train, tiny_clip_processor, max_length=77)
    rows = [view[i] for i in (0, 5, 9, 17, 30)]
    batch = FairVLMedCollator(tiny_clip_processor)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    pad = tiny_clip_processor.tokenizer.pad_token_id
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : lengths[i]].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, lengths[i] :] == pad).all()
        torch.testing.assert_close(batch["pixel_values"][i], torch.as_tensor(row["pixel_values"]))
    for name in META_COLUMNS:
        assert batch[name].dtype == torch.long and batch[name].shape == (5,)
        assert batch[name].tolist() == [r[name] for r in rows]
    assert set(schema.CATEGORICAL_ATTRIBUTES) <= set(batch)
    assert batch["return_loss"] is True


def test_raw_rows_give_the_same_batch_as_the_transform(train, tiny_clip_processor):
    collate = FairVLMedCollator(tiny_clip_processor, max_length=20)
    from_raw = collate([train[i] for i in range(4)])
    view = with_processor_transform(train, tiny_clip_processor, max_length=20)
    from_view = collate([view[i] for i in range(4)])
    for key in ("pixel_values", "input_ids", "attention_mask", *META_COLUMNS):
        torch.testing.assert_close(from_raw[key], from_view[key])


def test_dataloader_and_clip_forward(train, tiny_clip_processor):
    view = with_processor_transform(train, tiny_clip_processor)
    loader = DataLoader(
        view, batch_size=16, shuffle=False, collate_fn=FairVLMedCollator(tiny_clip_processor)
    )
    batches = list(loader)
    assert torch.cat([b["sample_id"] for b in batches]).tolist() == train["sample_id"]
    assert [len(b["sample_id"]) for b in batches] == [16, 16, 16, 12]
    config = CLIPConfig(
        text_config={"vocab_size": len(tiny_clip_processor.tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": 1, "pad_token_id": 1, "bos_token_id": 0},
        vision_config={"image_size": 32, "patch_size": 16, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    batch = batches[0]
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "return_loss")}
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (16, 16)
    assert torch.isfinite(out.loss)


def test_tokenizer_only_collator_and_errors(train, tiny_clip_processor):
    view = with_processor_transform(train, tiny_clip_processor)
    rows = [view[i] for i in range(3)]
    batch = FairVLMedCollator(tiny_clip_processor.tokenizer)(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(KeyError, match="pixel_values"):
        FairVLMedCollator(tiny_clip_processor.tokenizer)([train[0]])
    without = [{k: v for k, v in row.items() if k != "race"} for row in rows]
    with pytest.raises(KeyError, match=r"'race'.*remove_unused_columns"):
        FairVLMedCollator(tiny_clip_processor)(without)
    with pytest.raises(KeyError, match="'text'"):
        with_processor_transform(train.remove_columns("text"), tiny_clip_processor)[0]
    with pytest.raises(TypeError, match="image_processor"):
        with_processor_transform(train, tiny_clip_processor.tokenizer)
    with pytest.raises(ValueError, match="empty batch"):
        FairVLMedCollator(tiny_clip_processor)([])
    with pytest.raises(TypeError):
        FairVLMedCollator(np.zeros(3))
