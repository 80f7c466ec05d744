"""CLIP models for fairvlm-hf: a Hub or local checkpoint, the small embedded default, and LoRA.

The embedded default is a small CLIP built from a ``CLIPConfig`` (random, seeded) with a CLIP-style
byte-level BPE tokenizer trained on the notes themselves, so that the whole pipeline runs on a CPU
without downloading weights. Every model this module builds or saves is a plain ``transformers``
folder (safetensors) that ``AutoModel``/``AutoProcessor`` and the zero-shot pipeline load alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, trainers
from tokenizers.models import BPE
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    PreTrainedModel,
)
from transformers.utils import is_torchvision_available

from fairvlm_hf.paths import CACHE_ENV, default_cache_root

logger = logging.getLogger(__name__)

#: Special tokens of CLIP's tokenizer: start and end of text (the end token also pads).
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: CLIP's context length; notes of ~180 characters fit comfortably.
MAX_TEXT_LENGTH = 77
#: CLIP's byte-level BPE marks the last piece of a word with this suffix.
END_OF_WORD = "</w>"
#: Bumped whenever the default model's construction changes, so that caches are rebuilt.
DEFAULT_MODEL_FORMAT = 1
#: Weight files written by :func:`save_model_for_release`; nothing else holds tensors.
SAFE_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


@dataclass
class ModelArguments:
    """Which CLIP to fine-tune and how (parsed by ``HfArgumentParser``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder or Hub id of a CLIP checkpoint (e.g. openai/clip-vit-base-patch16). "
            "Leave empty for the small embedded default CLIP, built from the training notes."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom modelling code from the checkpoint's repository."},
    )
    model_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for downloaded checkpoints and for built default models "
            f"(default: ${CACHE_ENV} or ~/.cache/fairvlm_hf)."
        },
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) instead of every weight."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Modules that get LoRA adapters (names match both towers)."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: ["visual_projection", "text_projection"],
        metadata={"help": "Modules trained in full next to the adapters."},
    )
    merge_lora_on_save: bool = field(
        default=True,
        metadata={
            "help": "Merge the adapters into the weights when saving the release folder, so that "
            "plain transformers loads it; otherwise save the adapter only."
        },
    )
    default_image_size: int = field(
        default=128, metadata={"help": "Default model: input image side in pixels."}
    )
    default_patch_size: int = field(
        default=16, metadata={"help": "Default model: ViT patch side in pixels."}
    )
    default_hidden_size: int = field(
        default=128, metadata={"help": "Default model: width of both towers and the projection."}
    )
    default_num_layers: int = field(
        default=2, metadata={"help": "Default model: transformer layers per tower."}
    )
    default_num_heads: int = field(
        default=4, metadata={"help": "Default model: attention heads per layer."}
    )
    default_vocab_size: int = field(
        default=2048,
        metadata={"help": "Default model: BPE vocabulary size (at least 514: bytes and specials)."},
    )
    default_seed: int = field(
        default=0, metadata={"help": "Default model: seed of the random initialisation."}
    )
    default_vision_init_factor: float = field(
        default=4.0,
        metadata={
            "help": "Default model: scale of the vision tower's random initialisation "
            "(CLIPVisionConfig.initializer_factor). With CLIP's 1.0, a ViT trained from scratch on "
            "fundus images starts with nearly identical image embeddings and the contrastive loss "
            "sits at log(batch) for hundreds of steps; a larger scale breaks that symmetry."
        },
    )

    def default_shape(self) -> dict[str, int | float]:
        """The keyword arguments of :func:`build_default_model` that these arguments select."""
        return {
            "image_size": self.default_image_size,
            "patch_size": self.default_patch_size,
            "hidden_size": self.default_hidden_size,
            "num_layers": self.default_num_layers,
            "num_heads": self.default_num_heads,
            "vocab_size": self.default_vocab_size,
            "seed": self.default_seed,
            "vision_init_factor": self.default_vision_init_factor,
        }


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that stand for bytes in byte-level BPE, in CLIP's order."""
    codes = list(range(ord("!"), ord("~") + 1))
    codes += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in codes]
    chars = [chr(b) for b in codes] + [chr(256 + n) for n in range(len(extra))]
    return chars


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> CLIPTokenizer:
    """Train a CLIP-style byte-level BPE on ``texts`` and wrap it as a ``CLIPTokenizer``.

    The vocabulary is laid out like CLIP's: the 256 byte characters, the same with the end-of-word
    suffix, the learned merges in order, then the start and end tokens. Normalisation (NFC, white
    space, lower case) and pre-tokenisation are CLIP's own, taken from ``CLIPTokenizer``, so the
    saved tokenizer behaves exactly like CLIP's with a smaller vocabulary.
    """
    corpus = [str(t) for t in texts]
    if not corpus:
        raise ValueError("texts: at least one note is needed to train the default tokenizer")
    alphabet = _byte_alphabet()
    num_base = 2 * len(alphabet) + 2
    if vocab_size < num_base:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {num_base} (bytes + specials)")

    reference = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    # The end-of-word forms of the bytes are declared up front so that their ids, and with them
    # the trainer's tie-breaking between equally frequent pairs, do not depend on hash order.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[c + END_OF_WORD for c in alphabet],
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]

    vocab: dict[str, int] = {}
    for token in alphabet + [c + END_OF_WORD for c in alphabet]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for left, right in learned:
        if len(vocab) >= vocab_size - 2:
            break
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    logger.info("trained a BPE tokenizer: %d tokens, %d merges", len(vocab), len(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LENGTH)


def _image_processor(image_size: int) -> Any:
    """CLIP's image processor at ``image_size`` (torchvision backend when present, else PIL)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as processor_class
    else:
        from transformers import CLIPImageProcessorPil as processor_class
    return processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )


def build_default_model(
    texts: Iterable[str],
    *,
    image_size: int = 128,
    patch_size: int = 16,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 2048,
    seed: int = 0,
    vision_init_factor: float = 4.0,
) -> tuple[CLIPModel, CLIPProcessor]:
    """A small randomly initialised CLIP and its processor, with a tokenizer trained on ``texts``.

    Both towers share ``hidden_size``/``num_layers``/``num_heads`` (MLP width 4x), the projection
    has ``hidden_size`` dimensions, and the text tower's vocabulary is the trained tokenizer's.
    Images are converted to RGB, resized and centre-cropped to ``image_size`` with CLIP's mean/std.
    ``vision_init_factor`` scales the vision tower's initialisation (see `ModelArguments`).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    tokenizer = train_clip_tokenizer(texts, vocab_size=vocab_size)
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": hidden_size,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **tower,
            "image_size": image_size,
            "patch_size": patch_size,
            "initializer_factor": vision_init_factor,
        },
        projection_dim=hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval()
    processor = CLIPProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer)
    return model, processor


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_root()


def default_model_key(texts: Iterable[str], **shape: float) -> str:
    """Hash of the shape knobs, the corpus and the library versions that name a cached build."""
    digest = hashlib.sha256()
    header = {
        "format": DEFAULT_MODEL_FORMAT,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "shape": dict(sorted(shape.items())),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    count = 0
    for text in texts:
        encoded = str(text).encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
        count += 1
    digest.update(count.to_bytes(8, "little"))
    return digest.hexdigest()[:16]


def get_default_model(
    texts: Iterable[str], cache_dir: str | os.PathLike[str] | None = None, **shape: float
) -> Path:
    """Folder holding the default model for ``texts`` and ``shape``, built on first use.

    The folder lives under ``cache_dir`` (default ``$FAIRVLM_HF_CACHE`` or ``~/.cache/fairvlm_hf``)
    and is named by :func:`default_model_key`. It is written to a temporary folder and renamed into
    place, so a reader never sees half a model and concurrent builders do not clash.
    """
    corpus = [str(t) for t in texts]
    root = _cache_root(cache_dir)
    target = root / f"default-clip-{default_model_key(corpus, **shape)}"
    if (target / "config.json").is_file():
        logger.info("default model found in cache: %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        model, processor = build_default_model(corpus, **shape)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("default model was built concurrently; using %s", target)
        else:
            logger.info("built the default model into %s", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.count("/") > 1
    )


def _from_pretrained(name: str, args: ModelArguments) -> tuple[PreTrainedModel, Any]:
    """``AutoModel``/``AutoProcessor`` from a folder or Hub id, with errors that name the argument."""
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise FileNotFoundError(f"model_name_or_path={name!r}: no such folder")
    source = str(local) if local.exists() else name
    options = {"trust_remote_code": args.trust_remote_code, "cache_dir": args.model_cache_dir}
    try:
        model = AutoModel.from_pretrained(source, **options)
        processor = AutoProcessor.from_pretrained(source, **options)
    except OSError as error:
        if local.exists():
            raise
        raise OSError(
            f"model_name_or_path={name!r} is neither a local folder nor a Hub model that can be "
            f"loaded (the Hub may be unreachable or HF_HUB_OFFLINE set): {error}"
        ) from error
    for method in ("get_image_features", "get_text_features"):
        if not hasattr(model, method):
            raise TypeError(
                f"model_name_or_path={name!r} loads as {type(model).__name__}, "
                f"which has no {method}(): a CLIP-style dual encoder is required"
            )
    return model, processor


def load_model_and_processor(
    args: ModelArguments, texts: Iterable[str] | None = None
) -> tuple[PreTrainedModel | PeftModel, Any]:
    """The model and processor that ``args`` select, wrapped with LoRA when ``args.use_lora``.

    ``args.model_name_or_path`` names a local folder or a Hub id; when it is None the embedded
    default is built (or taken from the cache) from ``texts``, the training notes.
    """
    if args.model_name_or_path is None:
        if texts is None:
            raise ValueError(
                "texts: the training notes are needed to build the default model "
                "(or set model_name_or_path)"
            )
        folder = get_default_model(texts, cache_dir=args.model_cache_dir, **args.default_shape())
        model, processor = _from_pretrained(str(folder), args)
    else:
        model, processor = _from_pretrained(args.model_name_or_path, args)
    if args.use_lora:
        model = apply_lora(model, args)
    return model, processor


def apply_lora(model: PreTrainedModel, args: ModelArguments) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on ``args.lora_target_modules`` of both towers.

    Only the adapters and ``args.lora_modules_to_save`` train; the logit scale stays frozen.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model: already a PeftModel; apply_lora wraps a plain model once")
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        modules_to_save=list(args.lora_modules_to_save) or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    logit_scale = getattr(unwrap_clip(peft_model), "logit_scale", None)
    if isinstance(logit_scale, torch.nn.Parameter):
        logit_scale.requires_grad_(False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA: %d of %d parameters train (%.2f%%)", trainable, total, 100 * trainable / total
    )
    return peft_model


def unwrap_clip(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model``: under a ``PeftModel`` or DDP wrapper, or itself."""
    inner = model
    while True:
        if isinstance(inner, PeftModel):
            inner = inner.get_base_model()
        elif isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        else:
            break
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"model: expected a transformers model, got {type(inner).__name__}")
    return inner


def _save_adapter(model: PeftModel, out: Path) -> None:
    """Save the adapter alone, keeping the folder's own card and no local base-model path.

    peft writes a template ``README.md``; the folder's card (if any) is kept instead, and a base
    model that is a local folder is not recorded, since it means nothing on another machine.
    """
    readme = out / "README.md"
    card = readme.read_bytes() if readme.is_file() else None
    model.save_pretrained(out, safe_serialization=True)
    if card is None:
        readme.unlink(missing_ok=True)
    else:
        readme.write_bytes(card)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base and Path(base).expanduser().exists():
        logger.warning(
            "the adapter's base model is the local folder %s: it is not recorded in %s, so pass "
            "the base model to PeftModel.from_pretrained yourself",
            base,
            config_path.name,
        )
        config["base_model_name_or_path"] = None
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("saved the LoRA adapter to %s", out)


def save_model_for_release(
    model: torch.nn.Module,
    processor: Any,
    output_dir: str | os.PathLike[str],
    merge_lora: bool = True,
) -> Path:
    """Write ``model`` and ``processor`` to ``output_dir`` in safetensors and return the folder.

    A LoRA model is merged on a copy (the training model keeps its adapters) so that
    ``AutoModel``/``AutoProcessor`` load the folder without peft; with ``merge_lora=False`` the
    folder holds the adapter that ``PeftModel.from_pretrained(base, output_dir)`` loads.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, PeftModel) and merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out)
        logger.info("saved the LoRA-merged model to %s", out)
    elif isinstance(model, PeftModel):
        _save_adapter(model, out)
    elif isinstance(model, PreTrainedModel):
        model.save_pretrained(out)
        logger.info("saved the model to %s", out)
    else:
        raise TypeError(f"model: cannot save a {type(model).__name__} for release")
    processor.save_pretrained(out)
    if not any((out / name).is_file() for name in SAFE_WEIGHTS):
        raise RuntimeError(f"{out}: no safetensors weights were written")
    return out
