"""Shared test fixtures.

- Every test session gets its own cache root: ``$FAIRVLM_HF_CACHE`` points into pytest's temporary
  folder, so nothing is written to ``~/.cache/fairvlm_hf``.
- ``tiny_fairvlmed``: a synthetic Harvard-FairVLMed folder (Training/ 60, Validation/ 20, Test/ 30
  samples, 32x32 images, seed 0, bad pairs planted in the training split at the default 20%) in the
  real layout, with ``bad_pairs.csv``. Generated once per session; treat it as read-only (copy it
  with ``shutil.copytree`` before changing anything). Its config is ``tiny_fairvlmed_config``.
- ``tiny_fairvlmed_dataset``: that folder read by ``load_fairvlmed`` (a ``DatasetDict``).
- ``tiny_clip_processor``: a ``CLIPProcessor`` built locally (no download): a character-level
  ``CLIPTokenizer`` (byte-level alphabet, 514 tokens, pad = eos = 1) and a 32x32
  ``CLIPImageProcessor``. Pair it with a ``CLIPConfig`` whose text ``vocab_size`` is at least
  ``len(tokenizer)`` and whose vision ``image_size`` is 32.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fairvlm_hf.paths import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_root(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("fairvlm_hf_cache")))
        yield


@pytest.fixture(scope="session")
def tiny_fairvlmed_config():
    from fairvlm_hf.data.synthetic import SyntheticConfig

    return SyntheticConfig(num_train=60, num_validation=20, num_test=30, image_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_fairvlmed(tmp_path_factory: pytest.TempPathFactory, tiny_fairvlmed_config) -> Path:
    from fairvlm_hf.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("tiny") / "FairVLMed"
    return generate_synthetic(out, tiny_fairvlmed_config, num_workers=1)


@pytest.fixture(scope="session")
def tiny_fairvlmed_dataset(tiny_fairvlmed: Path, tmp_path_factory: pytest.TempPathFactory):
    from fairvlm_hf.data.fairvlmed import load_fairvlmed

    return load_fairvlmed(tiny_fairvlmed, cache_dir=tmp_path_factory.mktemp("tiny_arrow"))


@pytest.fixture(scope="session")
def tiny_clip_processor():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
