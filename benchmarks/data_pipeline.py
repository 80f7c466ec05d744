"""Whether the training data loader keeps up with a training step of the default model.

Writes a synthetic Harvard-FairVLMed folder (2,000 training samples at 128 px by default) into
a temporary folder and measures samples per second over one shuffled epoch, batch 64, of:

  (i)  a small Dataset that decodes the npz files directly every epoch (``np.load``, image
       scaling, CLIP's image processor and tokenizer per sample), and
  (ii) the project's path: the Arrow cache of ``load_fairvlmed`` viewed through
       ``with_processor_transform``, batched by ``FairVLMedCollator``,

each with ``num_workers`` 0 and 2 (worker start-up included: the Trainer builds a new iterator
every epoch). The processor is that of ``build_default_model`` (images resized to 64 px). The
consumer is a training step of that default model at batch 64: forward + backward of CLIP's
loss, and of the full objective through ``FairRobustTrainer.compute_loss``. The loader starves
training when it delivers fewer samples per second than the step consumes; with ``--profile``,
or when it does, cProfile shows where a loader epoch spends its time.

    python benchmarks/data_pipeline.py            # 2,000 samples, 3 rounds
    python benchmarks/data_pipeline.py --quick    # 200 samples, 1 round
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import _common
import datasets
import numpy as np
import pandas as pd
import torch
from objective_overhead import make_trainer
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fairvlm_hf.data.collate import FairVLMedCollator, with_processor_transform
from fairvlm_hf.data.fairvlmed import IMAGE_KEY, load_fairvlmed, sample_id_from_filename
from fairvlm_hf.data.schema import CATEGORICAL_ATTRIBUTES, LABEL_COLUMN, NOTES_FILES
from fairvlm_hf.data.synthetic import SyntheticConfig, generate_synthetic
from fairvlm_hf.modeling import build_default_model

logger = logging.getLogger(__name__)

SECTION = "data_pipeline"
BATCH = 64
MAX_TEXT_LENGTH = 180
WORKERS = (0, 2)


class NpzPairs(Dataset):
    """One training row per npz file of ``folder/Training``, decoded on every access.

    Rows carry what ``FairVLMedCollator`` expects: ``pixel_values`` from the processor's image
    processor, unpadded ``input_ids`` and ``attention_mask`` of the summary note (cut to 180
    characters, as the reader does), ``sample_id``, the label and the categorical attributes.
    """

    def __init__(self, folder: Path, processor: Any) -> None:
        self.files = sorted((folder / "Training").glob("*.npz"))
        if not self.files:
            raise FileNotFoundError(f"{folder / 'Training'}: no npz files")
        notes_path = next((folder / n for n in NOTES_FILES if (folder / n).is_file()), None)
        if notes_path is None:
            raise FileNotFoundError(f"{folder}: no notes CSV ({' or '.join(NOTES_FILES)})")
        notes = pd.read_csv(notes_path, dtype=str, keep_default_na=False)
        self.notes = dict(
            zip(notes.iloc[:, 0].str.strip(), notes.iloc[:, 2].str.strip(), strict=True)
        )
        missing = [p.name for p in self.files if p.name not in self.notes]
        if missing:
            raise KeyError(f"{notes_path}: no note for {missing[:5]}")
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        with np.load(path, allow_pickle=False) as archive:
            image = archive[IMAGE_KEY]
            row: dict[str, Any] = {
                name: int(archive[name]) for name in (LABEL_COLUMN, *CATEGORICAL_ATTRIBUTES)
            }
        if image.dtype != np.uint8:
            low, high = float(image.min()), float(image.max())
            scale = 255.0 / (high - low) if high > low else 0.0
            image = np.round((image - low) * scale).astype(np.uint8)
        picture = Image.fromarray(image).convert("RGB")
        row["pixel_values"] = self.image_processor(images=[picture], return_tensors="pt")[
            "pixel_values"
        ][0]
        tokens = self.tokenizer(
            self.notes[path.name][:MAX_TEXT_LENGTH], truncation=True, max_length=77
        )
        row["input_ids"] = tokens["input_ids"]
        row["attention_mask"] = tokens["attention_mask"]
        row["sample_id"] = sample_id_from_filename(path.name)
        return row


def epoch_reader(
    dataset: Any, collator: FairVLMedCollator, workers: int, seed: int = 0
) -> Callable[[], int]:
    """A callable that runs one shuffled epoch of a fresh DataLoader and returns the samples."""

    def run() -> int:
        loader = DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            collate_fn=collator,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )
        seen = 0
        for batch in loader:
            seen += int(batch["pixel_values"].shape[0])
        if seen != len(dataset):
            raise RuntimeError(f"the loader gave {seen} samples of {len(dataset)}")
        return seen

    return run


def training_consumers(
    model: torch.nn.Module, batch: Mapping[str, Any], dataset_size: int, output_dir: str
) -> dict[str, Callable[[], object]]:
    """Forward + backward of the default model on one batch: CLIP's loss, and the objective."""
    model.train()
    trainer = make_trainer(model, "sinkhorn", output_dir, dataset_size)
    clip_inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}

    def clip_step() -> None:
        model.zero_grad(set_to_none=True)
        model(**clip_inputs, return_loss=True).loss.backward()

    def objective_step() -> None:
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, dict(batch)).backward()

    return {"clip": clip_step, "objective": objective_step}


def profile_epoch(run: Callable[[], object], rows: int = 12) -> str:
    """cProfile of one loader epoch (``num_workers=0``): functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(rows)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    return "```\n" + "\n".join(lines[-(rows + 1) :]) + "\n```"


def render(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The markdown section of this benchmark (without the footer)."""
    n = results["n"]
    loader_rows = []
    speeds = {}
    for key, times in results["loaders"].items():
        source, workers = key
        speed = n / _common.median(times)
        speeds[key] = speed
        label = "(i) npz decoded every epoch" if source == "npz" else "(ii) Arrow cache + transform"
        loader_rows.append(
            [label, workers, f"{_common.median(times):.2f}", f"{speed:,.0f}", f"{min(times):.2f}"]
        )
    train_rows = []
    consumers = {}
    for key, label in (
        ("clip", "forward + backward, CLIP loss"),
        ("objective", "forward + backward, FairRobust objective (`compute_loss`)"),
    ):
        seconds = _common.median(results["train"][key])
        consumers[key] = BATCH / seconds
        train_rows.append([label, _common.format_ms(seconds), f"{BATCH / seconds:,.0f}"])
    fastest_consumer = max(consumers.values())
    verdicts = []
    for key, speed in speeds.items():
        source, workers = key
        ok = speed > fastest_consumer
        serial = 1 / (1 / speed + 1 / fastest_consumer)
        verdict = (
            f"- {source}, {workers} workers: {speed:,.0f} samples/s, "
            f"{speed / fastest_consumer:.1f}x the fastest step ({fastest_consumer:,.0f} "
            f"samples/s): {'keeps up' if ok else 'STARVES training'}"
        )
        if workers == 0:
            verdict += (
                f"; in-process loading adds to each step: {serial:,.0f} samples/s end to end, "
                f"{100 * fastest_consumer / (speed + fastest_consumer):.0f}% of the time loading"
            )
        verdicts.append(verdict)
    lines = [
        "## Data pipeline against a training step",
        "",
        f"Synthetic Harvard-FairVLMed training split of {n:,} samples, {args.image_size} px "
        f"grayscale (written in {results['generate_s']:.1f} s; the Arrow cache was built once in "
        f"{results['cache_s']:.1f} s, not counted). One shuffled epoch at batch {BATCH} per "
        f"measurement, a fresh DataLoader each time (worker start-up included); the processor "
        "of `build_default_model` (CLIP image processor to "
        f"{results['model_image_size']} px, BPE tokenizer of the notes). Median of "
        f"{args.repeats} round(s), the four loaders interleaved in each round.",
        "",
        _common.markdown_table(
            ["loader", "num_workers", "epoch (s)", "samples/s", "fastest epoch (s)"],
            loader_rows,
            "lrrrr",
        ),
        "",
        f"What training consumes: `build_default_model` ({results['model_shape']}), one batch of "
        f"{BATCH} from the loader, median of {args.train_repeats} round(s) after a warm-up:",
        "",
        _common.markdown_table(["training step", "ms/step", "samples/s"], train_rows, "lrr"),
        "",
        *verdicts,
        "",
        "With `num_workers=2` on a 2-CPU machine the workers share the cores with the training "
        "threads, so the rates above (measured with the loader alone) are upper bounds of what "
        "they deliver during training.",
    ]
    if "profile" in results:
        lines += [
            "",
            "cProfile of one epoch of (ii) with `num_workers=0` (cumulative time):",
            "",
            results["profile"],
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this benchmark."""
    parser = _common.new_parser(__doc__, repeats=3)
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="training samples to generate (default: 2000; 200 with --quick)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="side of the generated images in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one Arrow-loader epoch even when the loader keeps up",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its section and write it into ``--output``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _common.check_common_arguments(parser, args)
    args.samples = args.samples or (200 if args.quick else 2000)
    args.train_repeats = args.repeats if args.quick else max(5, args.repeats)
    if args.samples < BATCH:
        parser.error(f"--samples must be >= {BATCH}, got {args.samples}")
    if args.image_size < 16:
        parser.error(f"--image-size must be >= 16, got {args.image_size}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    threads = _common.set_threads(args.threads)
    info = _common.RunInfo("data_pipeline.py", argv, threads)
    results: dict[str, Any] = {"n": args.samples}
    with tempfile.TemporaryDirectory(prefix="data_pipeline_") as tmp:
        root = Path(tmp)
        config = SyntheticConfig(
            num_train=args.samples, num_validation=8, num_test=8, image_size=args.image_size
        )
        start = time.perf_counter()
        folder = generate_synthetic(root / "FairVLMed", config, num_workers=1)
        results["generate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        train = load_fairvlmed(folder, cache_dir=root / "arrow", splits=["train"])["train"]
        results["cache_s"] = time.perf_counter() - start
        torch.set_num_threads(threads)

        model, processor = build_default_model(train["text"])
        vision = model.config.vision_config
        results["model_image_size"] = vision.image_size
        results["model_shape"] = (
            f"{vision.num_hidden_layers} layers x {vision.hidden_size} per tower, image "
            f"{vision.image_size} px, patch {vision.patch_size}"
        )
        collator = FairVLMedCollator(processor)
        arrow = with_processor_transform(train, processor)
        npz = NpzPairs(folder, processor)
        if len(npz) != len(arrow):
            raise RuntimeError(f"npz rows {len(npz)} != Arrow rows {len(arrow)}")
        readers = {
            (source, workers): epoch_reader(dataset, collator, workers)
            for source, dataset in (("npz", npz), ("arrow", arrow))
            for workers in WORKERS
        }
        results["loaders"] = _common.rounds(readers, args.repeats, warmup=1)

        batch = next(iter(DataLoader(arrow, batch_size=BATCH, collate_fn=collator)))
        consumers = training_consumers(model, batch, len(arrow) + 64, tmp)
        results["train"] = _common.rounds(consumers, args.train_repeats, warmup=1)

        slowest_loader = min(
            args.samples / _common.median(t)
            for (source, _), t in results["loaders"].items()
            if source == "arrow"
        )
        fastest_step = max(BATCH / _common.median(t) for t in results["train"].values())
        if args.profile or slowest_loader < fastest_step:
            results["profile"] = profile_epoch(readers[("arrow", 0)])
    section = render(args, results) + "\n\n" + "\n".join(info.footer())
    _common.publish(SECTION, section, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
