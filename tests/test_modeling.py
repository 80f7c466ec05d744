"""The default CLIP, its tokenizer, loading, LoRA and the release folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel, HfArgumentParser, pipeline

from fairvlm_hf import modeling
from fairvlm_hf.modeling import (
    BOS_TOKEN,
    EOS_TOKEN,
    ModelArguments,
    apply_lora,
    build_default_model,
    get_default_model,
    load_model_and_processor,
    save_model_for_release,
    train_clip_tokenizer,
    unwrap_clip,
)

FINDINGS = [
    "enlarged cup-to-disc ratio of 0.8 with inferior rim thinning",
    "normal optic disc, healthy neuroretinal rim",
    "superior nerve fiber layer loss and arcuate visual field defect",
    "intraocular pressure 24 mmHg, glaucoma suspect",
    "stable visual fields, no glaucomatous damage",
]
NOTES = [
    f"{40 + i % 45} year old patient: {FINDINGS[i % 5]}; "
    f"{'glaucoma' if i % 2 else 'non-glaucoma'}, follow up in {3 + i % 9} months."
    for i in range(200)
]
TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def _images(n: int, seed: int = 0, size: tuple[int, int] = (80, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=size[::-1], dtype=np.uint8), mode="L")
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny() -> tuple[CLIPModel, object]:
    return build_default_model(NOTES, vocab_size=600, **TINY)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _clip_normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def _perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def test_tokenizer_is_clip_style_and_trained_on_the_notes():
    tokenizer = train_clip_tokenizer(NOTES, vocab_size=600)
    assert len(tokenizer) == 600
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 2) == BOS_TOKEN
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.model_max_length == 77
    ids = tokenizer("Glaucoma SUSPECT").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert ids == tokenizer("glaucoma suspect").input_ids
    assert tokenizer.tokenize("glaucoma") == ["glaucoma</w>"]
    assert tokenizer.tokenize("c/d 0.85") == [
        "c</w>",
        "/</w>",
        "d</w>",
        "0</w>",
        ".</w>",
        "8</w>",
        "5</w>",
    ]
    for text in ["Naïve  café\tnotes", "Ödem 👁 ratio", "ROUTINE exam Zzyzx"]:
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.eos_token_id not in encoded
        assert tokenizer.decode(encoded) == _clip_normalise(text)
    again = train_clip_tokenizer(NOTES, vocab_size=600)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="texts"):
        train_clip_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_tokenizer(NOTES, vocab_size=300)


def test_default_model_forward_on_a_processor_batch():
    model, processor = build_default_model(NOTES)
    config = model.config
    assert config.vision_config.image_size == 128 and config.vision_config.patch_size == 16
    assert config.vision_config.initializer_factor == 4.0
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    images = [*_images(3), _images(1, seed=1)[0].convert("RGB")]
    texts = NOTES[:4]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape == (4, 3, 128, 128)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
    assert out.logits_per_image.shape == (4, 4)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(out.logits_per_image, expected)
    assert torch.isfinite(out.loss)
    grey = processor.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
    rgb = processor.image_processor(images=[images[0].convert("RGB")], return_tensors="pt")
    torch.testing.assert_close(grey, rgb["pixel_values"])


def test_text_embedding_does_not_depend_on_padding(tiny):
    model, processor = tiny
    short, long = NOTES[1][:30], NOTES[2]
    alone = processor.tokenizer([short], return_tensors="pt")
    padded = processor.tokenizer([short, long], padding=True, return_tensors="pt")
    assert padded.input_ids.shape[1] > alone.input_ids.shape[1]
    with torch.no_grad():
        a = model.get_text_features(**alone).pooler_output[0]
        b = model.get_text_features(**padded).pooler_output[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = model.text_model(**padded)
    eos = [ids.tolist().index(processor.tokenizer.eos_token_id) for ids in padded.input_ids]
    assert eos == [int(m.sum()) - 1 for m in padded.attention_mask]
    for row, position in enumerate(eos):
        torch.testing.assert_close(out.pooler_output[row], out.last_hidden_state[row, position])


def test_default_model_is_seeded(tiny):
    model, _ = tiny
    same, _ = build_default_model(NOTES, vocab_size=600, **TINY)
    other, _ = build_default_model(NOTES, vocab_size=600, seed=1, **TINY)
    same_state, other_state = same.state_dict(), other.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, same_state[name]), name
    assert any(not torch.equal(t, other_state[n]) for n, t in model.state_dict().items())


def test_save_load_round_trip(tiny, tiny_dir):
    model, processor = tiny
    loaded = AutoModel.from_pretrained(tiny_dir)
    loaded_processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(loaded) is CLIPModel
    assert not list(tiny_dir.glob("*.bin"))
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    texts = [*NOTES[:5], "UPPER case Ödem 👁", "x" * 400]
    ours = processor.tokenizer(texts, padding=True, truncation=True).input_ids
    theirs = loaded_processor.tokenizer(texts, padding=True, truncation=True).input_ids
    assert ours == theirs
    assert max(len(ids) for ids in ours) == 77
    batch = processor(images=_images(3), text=NOTES[:3], padding=True, return_tensors="pt")
    again = loaded_processor(images=_images(3), text=NOTES[:3], padding=True, return_tensors="pt")
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits_per_image, loaded(**again).logits_per_image)


def test_zero_shot_pipeline_matches_the_model(tiny, tiny_dir):
    model, processor = tiny
    image = _images(1, seed=3)[0]
    labels = ["glaucoma", "non-glaucoma"]
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_dir))
    result = classifier(image, candidate_labels=labels, hypothesis_template="A photo of {}")
    assert {r["label"] for r in result} == set(labels)
    batch = processor(
        images=[image], text=[f"A photo of {x}" for x in labels], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = model(**batch).logits_per_image.softmax(dim=-1)[0]
    scores = {r["label"]: r["score"] for r in result}
    for label, prob in zip(labels, probs.tolist(), strict=True):
        assert scores[label] == pytest.approx(prob, abs=1e-5)


def test_default_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(modeling.CACHE_ENV, str(tmp_path / "env-cache"))
    first = get_default_model(NOTES, **TINY, vocab_size=600)
    assert first.parent == tmp_path / "env-cache"
    calls = []
    monkeypatch.setattr(
        modeling, "build_default_model", lambda *a, **k: calls.append(1) or pytest.fail("rebuilt")
    )
    assert get_default_model(NOTES, **TINY, vocab_size=600) == first
    assert calls == []
    monkeypatch.undo()
    other_corpus = get_default_model(NOTES[:50], cache_dir=tmp_path / "c", **TINY, vocab_size=600)
    other_shape = get_default_model(NOTES, cache_dir=tmp_path / "c", **{**TINY, "num_layers": 2})
    assert len({first.name, other_corpus.name, other_shape.name}) == 3
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]
    assert AutoModel.from_pretrained(other_shape).config.text_config.num_hidden_layers == 2


def test_model_arguments_parse_with_help():
    parser = HfArgumentParser(ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--use_lora",
            "--lora_target_modules",
            "q_proj",
            "k_proj",
            "--no_merge_lora_on_save",
            "--default_hidden_size",
            "64",
        ]
    )
    assert args.use_lora and not args.merge_lora_on_save
    assert args.lora_target_modules == ["q_proj", "k_proj"]
    assert args.default_shape()["hidden_size"] == 64
    assert args.model_name_or_path is None and args.trust_remote_code is False
    for field in ModelArguments.__dataclass_fields__.values():
        assert field.metadata.get("help"), field.name
    assert ModelArguments().default_shape() == build_default_model.__kwdefaults__


def test_load_model_and_processor(tmp_path, tiny_dir):
    shape = {
        "default_image_size": 32,
        "default_patch_size": 8,
        "default_hidden_size": 32,
        "default_num_layers": 1,
        "default_num_heads": 2,
        "default_vocab_size": 600,
    }
    args = ModelArguments(model_cache_dir=str(tmp_path), **shape)
    model, processor = load_model_and_processor(args, NOTES)
    assert type(model) is CLIPModel
    assert model.config.vision_config.image_size == 32
    assert len(processor.tokenizer) == 600
    with pytest.raises(ValueError, match="texts"):
        load_model_and_processor(args)
    local, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny_dir)))
    assert type(local) is CLIPModel
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path / "absent")))


def test_hub_id_offline_names_the_argument(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="model_name_or_path='someone/some-clip'"):
        load_model_and_processor(ModelArguments(model_name_or_path="someone/some-clip"))


def test_lora_merged_release_loads_without_peft(tmp_path):
    model, processor = build_default_model(NOTES, vocab_size=600, **TINY)
    peft_model = apply_lora(model, ModelArguments(lora_r=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("vision_model" in n for n in trainable) and any("text_model" in n for n in trainable)
    assert any("visual_projection" in n for n in trainable)
    assert not unwrap_clip(peft_model).logit_scale.requires_grad
    assert unwrap_clip(peft_model) is peft_model.get_base_model()
    assert unwrap_clip(model) is model
    _perturb_adapters(peft_model)
    peft_model.eval()
    batch = processor(images=_images(2), text=NOTES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = peft_model(**batch).logits_per_image
        base_only = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base_only(**batch).logits_per_image
    assert not torch.allclose(reference, plain)

    folder = save_model_for_release(peft_model, processor, tmp_path / "merged")
    assert sorted(p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".bin"}) == [
        "model.safetensors"
    ]
    assert not (folder / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits_per_image, reference)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    np.save(tmp_path / "pixels.npy", batch["pixel_values"].numpy())
    np.save(tmp_path / "ids.npy", batch["input_ids"].numpy())
    np.save(tmp_path / "mask.npy", batch["attention_mask"].numpy())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["peft"] = None
        import numpy as np, torch
        from transformers import AutoModel
        d = {str(tmp_path)!r}
        model = AutoModel.from_pretrained(d + "/merged").eval()
        assert type(model).__name__ == "CLIPModel", type(model)
        assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
        with torch.no_grad():
            out = model(
                input_ids=torch.from_numpy(np.load(d + "/ids.npy")),
                attention_mask=torch.from_numpy(np.load(d + "/mask.npy")),
                pixel_values=torch.from_numpy(np.load(d + "/pixels.npy")),
            ).logits_per_image
        np.save(d + "/merged_logits.npy", out.numpy())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    merged = torch.from_numpy(np.load(tmp_path / "merged_logits.npy"))
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)


def test_lora_adapter_only_release(tmp_path):
    model, processor = build_default_model(NOTES, vocab_size=600, **TINY)
    save_model_for_release(model, processor, tmp_path / "base")
    peft_model = apply_lora(model, ModelArguments(lora_r=4))
    _perturb_adapters(peft_model, seed=1)
    peft_model.eval()
    batch = processor(images=_images(2), text=NOTES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = peft_model(**batch).logits_per_image

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("# my card\n")
    save_model_for_release(peft_model, processor, folder, merge_lora=False)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and not list(folder.glob("*.bin"))
    assert (folder / "README.md").read_text() == "# my card\n"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] and set(config["target_modules"]) == {"q_proj", "v_proj"}

    from peft import PeftModel

    base = AutoModel.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits_per_image, reference)


def test_apply_lora_twice_is_an_error(tiny):
    model, _ = build_default_model(NOTES, vocab_size=600, **TINY)
    peft_model = apply_lora(model, ModelArguments(lora_r=2))
    with pytest.raises(ValueError, match="PeftModel"):
        apply_lora(peft_model, ModelArguments())
    with pytest.raises(TypeError, match="model"):
        unwrap_clip(torch.nn.Linear(2, 2))


def test_tokenizer_training_is_reproducible_across_processes(tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps(NOTES))
    script = textwrap.dedent(
        f"""
        import json
        from fairvlm_hf.modeling import train_clip_tokenizer
        notes = json.load(open({str(tmp_path / "notes.json")!r}))
        vocab = train_clip_tokenizer(notes, vocab_size=600).get_vocab()
        json.dump(vocab, open({str(tmp_path / "vocab.json")!r}, "w"))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab == train_clip_tokenizer(NOTES, vocab_size=600).get_vocab()
