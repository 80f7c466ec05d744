"""From dataset rows to model batches, keeping what the objective needs beside the pixels.

The robust objective remembers every pair by ``sample_id`` and the fairness term groups pairs by
their attributes, so both must travel with ``pixel_values`` and ``input_ids`` through the
DataLoader. :func:`with_processor_transform` turns rows into model inputs lazily (on access, no
copy of the data set); :class:`FairVLMedCollator` pads and stacks them into tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from fairvlm_hf.data import schema

logger = logging.getLogger(__name__)

#: Per-sample integer columns carried into every batch, as ``LongTensor [B]``.
META_COLUMNS: tuple[str, ...] = ("sample_id", schema.LABEL_COLUMN, *schema.CATEGORICAL_ATTRIBUTES)


def _parts(processor: Any) -> tuple[Any | None, Any]:
    """(image processor or None, tokenizer) of a processor, or (None, tokenizer) of a tokenizer."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not callable(tokenizer) or not hasattr(tokenizer, "pad"):
        raise TypeError(
            f"expected a processor with a tokenizer, or a tokenizer; got {type(processor).__name__}"
        )
    return getattr(processor, "image_processor", None), tokenizer


def _column(batch: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in batch:
        raise KeyError(f"{where}: column {name!r} missing (got {sorted(batch)})")
    return batch[name]


class ProcessorTransform:
    """Batch transform: grayscale PIL images -> RGB ``pixel_values``; text -> ``input_ids``.

    Token ids are left unpadded (the collator pads each batch to its longest text).
    """

    def __init__(self, processor: Any, max_length: int = 77) -> None:
        self.image_processor, self.tokenizer = _parts(processor)
        if self.image_processor is None:
            raise TypeError("with_processor_transform needs a processor with an image_processor")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length

    def __call__(self, batch: Mapping[str, list]) -> dict[str, Any]:
        where = "with_processor_transform"
        images = [image.convert("RGB") for image in _column(batch, "image", where)]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(
            list(_column(batch, "text", where)), truncation=True, max_length=self.max_length
        )
        out: dict[str, Any] = {
            "pixel_values": pixels,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }
        out.update({name: _column(batch, name, where) for name in META_COLUMNS})
        return out


def with_processor_transform(
    dataset: datasets.Dataset | datasets.DatasetDict, processor: Any, *, max_length: int = 77
) -> datasets.Dataset | datasets.DatasetDict:
    """A view of ``dataset`` whose rows are model inputs, computed lazily on access.

    Rows become ``pixel_values`` (float, ``[3, H, W]``), ``input_ids`` and ``attention_mask``
    (unpadded, at most ``max_length`` tokens), ``sample_id``, ``glaucoma`` and the categorical
    attributes. This is ``set_transform`` on a new view: ``dataset`` itself is left unchanged.
    """
    return dataset.with_transform(ProcessorTransform(processor, max_length))


class FairVLMedCollator:
    """``data_collator`` for a DataLoader or ``Trainer``: stack, pad and keep the metadata.

    Takes rows from :func:`with_processor_transform` (or raw ``image`` / ``text`` rows when
    given a processor) and returns ``pixel_values`` float32 ``[B, 3, H, W]``, ``input_ids`` and
    ``attention_mask`` LongTensor ``[B, T]`` (padded to the longest), ``return_loss=True``, and
    ``sample_id``, ``glaucoma`` and each categorical attribute as LongTensor ``[B]``.
    """

    def __init__(self, processor: Any, *, max_length: int = 77) -> None:
        self.image_processor, self.tokenizer = _parts(processor)
        self.max_length = max_length

    def _pixels(self, features: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        if all("pixel_values" in f for f in features):
            return torch.stack(
                [torch.as_tensor(f["pixel_values"], dtype=torch.float32) for f in features]
            )
        if self.image_processor is None or not all("image" in f for f in features):
            raise KeyError(
                "FairVLMedCollator: every row needs 'pixel_values' (see with_processor_transform), "
                "or 'image' with a processor that has an image_processor"
            )
        images = [f["image"].convert("RGB") for f in features]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(torch.float32)

    def _tokens(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if all("input_ids" in f for f in features):
            ids = [torch.as_tensor(f["input_ids"]).tolist() for f in features]
            masks = [
                torch.as_tensor(f["attention_mask"]).tolist()
                if "attention_mask" in f
                else [1] * len(i)
                for f, i in zip(features, ids, strict=True)
            ]
            batch = self.tokenizer.pad(
                {"input_ids": ids, "attention_mask": masks}, padding=True, return_tensors="pt"
            )
        elif all("text" in f for f in features):
            batch = self.tokenizer(
                [f["text"] for f in features],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        else:
            raise KeyError("FairVLMedCollator: every row needs 'input_ids' or 'text'")
        return {key: batch[key].to(torch.long) for key in ("input_ids", "attention_mask")}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("FairVLMedCollator: empty batch")
        batch: dict[str, Any] = {"pixel_values": self._pixels(features), **self._tokens(features)}
        for name in META_COLUMNS:
            missing = [i for i, f in enumerate(features) if name not in f]
            if missing:
                raise KeyError(
                    f"FairVLMedCollator: column {name!r} missing in row(s) {missing[:5]}; with a "
                    "Trainer, set remove_unused_columns=False so that it reaches the collator"
                )
            batch[name] = torch.as_tensor([int(f[name]) for f in features], dtype=torch.long)
        batch["return_loss"] = True
        return batch
