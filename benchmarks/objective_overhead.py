"""What the robust and fair objective costs per optimizer step, next to CLIP's own loss.

One ``CLIPModel`` of a CPU-sized shape (random weights, built from its config), one batch, one
AdamW optimizer; each variant is one optimizer step (forward, backward, AdamW update):

  (a)  ``CLIPModel``'s own loss (``return_loss=True``);
  (b)  the full FairRobust objective, through ``FairRobustTrainer.compute_loss``: per-pair loss,
       bad-pair miner active (its memory filled by a simulated warm-up epoch and
       ``start_epoch(1)``, so that about a fifth of the batch is flagged and weighted; every
       step also observes), and the Sinkhorn group term over race, gender, ethnicity and
       language (``fairness_ot="sinkhorn"``);
  (b') the same with ``fairness_ot="exact_1d"``;
  (c)  a FairCLIP-style objective: CLIP's loss plus, for each race group, one extra batch of that
       group through a no-grad forward pass and a Sinkhorn term between the batch's and the
       group batch's similarities ``diag(logits_per_image @ logits_per_text.T)`` (the group side
       divided by its sum, blur 1e-4, lambda 1e-7), as FairCLIP's training code does.

The variants run in rounds (one step of each per round, in rotating order) and the table shows
medians over rounds and the median of the per-round ratios to (a). Because the difference
between (a) and (b) is small next to the noise of a shared machine, the loss heads are also
timed alone (forward and backward on fixed embeddings, through the same trainer code), which
gives the objective's extra milliseconds directly. With ``--profile``, or when (b)/(a) exceeds
the 1.05 target, ``torch.profiler`` shows where a (b) step spends its time.

    python benchmarks/objective_overhead.py            # batches 32 and 128, 4 rounds
    python benchmarks/objective_overhead.py --quick    # tiny model, batch 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import torch
from geomloss import SamplesLoss
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, default_data_collator
from transformers.models.clip.modeling_clip import (
    CLIPOutput,
    _get_vector_norm,
    image_text_contrastive_loss,
)

from fairvlm_hf.config import FairRobustConfig
from fairvlm_hf.data.schema import PROTECTED_ATTRIBUTES
from fairvlm_hf.data.synthetic import GROUP_PROPORTIONS
from fairvlm_hf.objective.bad_pairs import BadPairMiner
from fairvlm_hf.objective.contrastive import pairwise_clip_loss
from fairvlm_hf.trainer import FairRobustTrainer

logger = logging.getLogger(__name__)

SECTION = "objective_overhead"
TARGET_RATIO = 1.05
#: FairCLIP's Sinkhorn settings (its training script's defaults) and the seed's lambda.
FAIRCLIP_BLUR = 1e-4
FAIRCLIP_LAMBDA = 1e-7
#: Size of the data set the miner has seen (the Harvard-FairVLMed training split).
DEFAULT_DATASET_SIZE = 7000
BAD_PAIR_RATE = 0.2


@dataclass(frozen=True)
class ClipShape:
    """The shape of a CLIP built from its config (random weights, no download)."""

    name: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_length: int
    vocab_size: int
    projection_dim: int

    def describe(self) -> str:
        return (
            f"vision {self.vision_layers} layers x {self.vision_hidden} "
            f"({self.vision_heads} heads), image {self.image_size} px, patch {self.patch_size}; "
            f"text {self.text_layers} layers x {self.text_hidden} ({self.text_heads} heads), "
            f"{self.text_length} tokens, vocabulary {self.vocab_size:,}; projection "
            f"{self.projection_dim}"
        )


SHAPES: dict[str, ClipShape] = {
    "tiny": ClipShape("tiny", 64, 2, 2, 32, 8, 64, 2, 2, 16, 512, 64),
    "cpu": ClipShape("cpu", 256, 6, 4, 112, 16, 256, 6, 4, 77, 49408, 256),
    "vit-b16": ClipShape("vit-b16", 768, 12, 12, 224, 16, 512, 12, 8, 77, 49408, 512),
}


def build_clip(shape: ClipShape, seed: int = 0) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` of ``shape`` (MLP width 4x), in training mode."""
    eos = shape.vocab_size - 1
    config = CLIPConfig(
        text_config={
            "hidden_size": shape.text_hidden,
            "intermediate_size": 4 * shape.text_hidden,
            "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads,
            "max_position_embeddings": shape.text_length,
            "vocab_size": shape.vocab_size,
            "bos_token_id": eos - 1,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "projection_dim": shape.projection_dim,
        },
        vision_config={
            "hidden_size": shape.vision_hidden,
            "intermediate_size": 4 * shape.vision_hidden,
            "num_hidden_layers": shape.vision_layers,
            "num_attention_heads": shape.vision_heads,
            "image_size": shape.image_size,
            "patch_size": shape.patch_size,
            "projection_dim": shape.projection_dim,
        },
        projection_dim=shape.projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.train()


def draw_attributes(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Codes of the four protected attributes for ``n`` pairs, with Harvard-FairVLMed's shares."""
    out = {}
    for name in PROTECTED_ATTRIBUTES:
        proportions = GROUP_PROPORTIONS[name]
        codes = torch.tensor(list(proportions), dtype=torch.long)
        shares = torch.tensor(list(proportions.values()), dtype=torch.float64)
        out[name] = codes[torch.multinomial(shares, n, replacement=True, generator=generator)]
    return out


def model_inputs(shape: ClipShape, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random ``pixel_values`` and full-length token ids (start token first, end token last)."""
    size = shape.image_size
    ids = torch.randint(0, shape.vocab_size - 2, (batch, shape.text_length), generator=generator)
    ids[:, 0] = shape.vocab_size - 2
    ids[:, -1] = shape.vocab_size - 1
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones(batch, shape.text_length, dtype=torch.long),
    }


def make_batch(
    shape: ClipShape, batch: int, dataset_size: int, seed: int = 0
) -> dict[str, Tensor | bool]:
    """A batch as ``FairVLMedCollator`` makes it: model inputs, ids, label and attributes."""
    if batch > dataset_size:
        raise ValueError(f"batch size {batch} exceeds the data set size {dataset_size}")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor | bool] = dict(model_inputs(shape, batch, generator))
    out["sample_id"] = torch.randperm(dataset_size, generator=generator)[:batch]
    out["glaucoma"] = torch.randint(0, 2, (batch,), generator=generator)
    out.update(draw_attributes(batch, generator))
    out["return_loss"] = True
    return out


def spread_embeddings(n: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Unit image and text embeddings whose pair cosines spread over [0, 0.6].

    With CLIP's logit scale (1 / 0.07) this gives per-pair losses from a few hundredths to
    about ``log(n)``, the spread of a model part-way through fine-tuning; a fifth of the pairs
    (cosine below 0.1) play mismatched pairs. A randomly initialised model gives every pair
    nearly the same loss instead, which makes the Sinkhorn term look cheaper than it is (its
    iterations grow with the log of the spread over the blur).
    """
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    other = other - (other * image).sum(-1, keepdim=True) * image
    other = torch.nn.functional.normalize(other, dim=-1)
    cosine = 0.6 * torch.rand(n, 1, generator=generator)
    bad = torch.rand(n, 1, generator=generator) < BAD_PAIR_RATE
    cosine = torch.where(bad, cosine / 6, cosine)
    text = cosine * image + (1 - cosine**2).sqrt() * other
    return image, text


def warm_miner(miner: BadPairMiner, dataset_size: int, seed: int = 0) -> dict[str, Any]:
    """Simulate the warm-up epoch: observe a loss for every pair, then ``start_epoch(1)``.

    A fifth of the pairs (``BAD_PAIR_RATE``) get high losses, as mismatched pairs do, so that
    the threshold rule flags them and the miner's weights are in force in the timed steps.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(dataset_size)
    losses = 1.0 + 0.25 * torch.randn(dataset_size, generator=generator)
    bad = torch.rand(dataset_size, generator=generator) < BAD_PAIR_RATE
    losses[bad] = 3.0 + 0.4 * torch.randn(int(bad.sum()), generator=generator)
    miner.observe(ids, losses.clamp(min=0.01))
    summary = miner.start_epoch(1)
    if not summary["active"] or summary["n_flagged"] == 0:
        raise RuntimeError(f"the simulated warm-up epoch left the miner inactive: {summary}")
    return summary


def make_trainer(
    model: CLIPModel, method: str, output_dir: str, dataset_size: int, *, use_cpu: bool = True
) -> FairRobustTrainer:
    """A `FairRobustTrainer` (no training loop) whose ``compute_loss`` is the objective (b).

    Its miner has seen a simulated warm-up epoch over ``dataset_size`` pairs, so flags are in
    force; the group term uses ``method`` ("sinkhorn" or "exact_1d") and the config's defaults.
    """
    args = FairRobustConfig(
        output_dir=output_dir,
        use_cpu=use_cpu,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        disable_tqdm=True,
        fairness_ot=method,
    )
    trainer = FairRobustTrainer(model=model, args=args, data_collator=default_data_collator)
    if trainer.miner is None or trainer.group_ot is None:
        raise RuntimeError(
            "the default FairRobustConfig no longer enables mining and the group term"
        )
    warm_miner(trainer.miner, dataset_size)
    return trainer


def clip_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of ``CLIPModel.forward`` for CLIP's own loss."""
    keys = ("pixel_values", "input_ids", "attention_mask")
    return {key: batch[key] for key in keys} | {"return_loss": True}


class FairCLIPStyle:
    """FairCLIP's training objective: CLIP loss + lambda * sum over groups of Sinkhorn terms.

    Each step draws one batch per group of one attribute and runs it through the model without
    gradient; the term compares the 1-D distributions of ``diag(L_img @ L_txt^T)`` of the batch
    (raw, with gradient) and of the group batch (divided by its sum), as FairCLIP's code does.
    """

    def __init__(self, group_batches: list[dict[str, Tensor]], blur: float = FAIRCLIP_BLUR):
        self.group_batches = group_batches
        self.sinkhorn = SamplesLoss("sinkhorn", p=2, blur=blur, backend="tensorized")

    def __call__(self, model: CLIPModel, batch: Mapping[str, Any]) -> Tensor:
        outputs = model(**clip_inputs(batch))
        similarity = outputs.logits_per_image @ outputs.logits_per_text.T
        with_batch = similarity.diag().float()
        loss = outputs.loss
        for group in self.group_batches:
            with torch.no_grad():
                group_out = model(**group)
            group_similarity = group_out.logits_per_image @ group_out.logits_per_text.T
            with_group = group_similarity.diag().float()
            with_group = with_group / with_group.sum()
            loss = loss + FAIRCLIP_LAMBDA * self.sinkhorn(with_batch[:, None], with_group[:, None])
        return loss


def race_group_batches(shape: ClipShape, batch: int, seed: int = 1) -> list[dict[str, Tensor]]:
    """One batch of model inputs per race group (FairCLIP draws them from per-group loaders)."""
    generator = torch.Generator().manual_seed(seed)
    return [model_inputs(shape, batch, generator) for _ in GROUP_PROPORTIONS["race"]]


def optimizer_step(
    loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer
) -> Callable[[], float]:
    """One optimizer step: zero the gradients, forward, backward, AdamW update."""

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


class FixedEmbeddingsCLIP(CLIPModel):
    """A ``CLIPModel`` whose towers are replaced by fixed embeddings: times the loss head alone.

    ``forward`` normalises the embeddings and computes the logits and CLIP's loss exactly as
    ``CLIPModel.forward`` does after its towers; gradients flow to the embeddings.
    """

    def set_embeddings(self, image: Tensor, text: Tensor) -> None:
        self.fixed_image = image.detach().clone().requires_grad_(True)
        self.fixed_text = text.detach().clone().requires_grad_(True)

    def forward(self, return_loss: bool | None = None, **_: Any) -> CLIPOutput:  # type: ignore[override]
        image_embeds = self.fixed_image / _get_vector_norm(self.fixed_image)
        text_embeds = self.fixed_text / _get_vector_norm(self.fixed_text)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None
        return CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )


def head_variants(
    shape: ClipShape, batch: Mapping[str, Any], dataset_size: int, output_dir: str
) -> dict[str, Callable[[], object]]:
    """Forward and backward of each loss head on fixed embeddings (no towers, no optimizer)."""
    tiny = ClipShape("head", 32, 1, 1, 16, 8, 32, 1, 1, 4, 16, shape.projection_dim)
    model = build_clip(tiny)
    fixed = FixedEmbeddingsCLIP(model.config)
    fixed.load_state_dict(model.state_dict())
    fixed.train()
    n = int(batch["pixel_values"].shape[0])
    fixed.set_embeddings(*spread_embeddings(n, shape.projection_dim, seed=2))
    trainers = {
        method: make_trainer(fixed, method, output_dir, dataset_size)
        for method in ("sinkhorn", "exact_1d")
    }

    def backward(loss: Tensor) -> None:
        loss.backward()
        fixed.fixed_image.grad = fixed.fixed_text.grad = None
        fixed.zero_grad(set_to_none=True)

    return {
        "(a)": lambda: backward(fixed(return_loss=True).loss),
        "(b)": lambda: backward(trainers["sinkhorn"].compute_loss(fixed, dict(batch))),
        "(b')": lambda: backward(trainers["exact_1d"].compute_loss(fixed, dict(batch))),
    }


def profile_step(step: Callable[[], object], rows: int = 12) -> str:
    """``torch.profiler`` over one step: the operators with the largest self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    table = [
        (
            f"`{e.key}`",
            e.count,
            f"{e.self_cpu_time_total / 1e3:,.1f}",
            f"{100 * e.self_cpu_time_total / total:.1f}%",
        )
        for e in events[:rows]
    ]
    return _common.markdown_table(["operator", "calls", "self CPU (ms)", "share"], table, "lrrr")


def measure_batch(
    shape: ClipShape, batch_size: int, args: argparse.Namespace, output_dir: str
) -> dict[str, Any]:
    """Step and head timings of every variant at one batch size."""
    model = build_clip(shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = make_batch(shape, batch_size, args.dataset_size)
    trainers = {
        method: make_trainer(model, method, output_dir, args.dataset_size)
        for method in ("sinkhorn", "exact_1d")
    }
    fairclip = FairCLIPStyle(race_group_batches(shape, batch_size))
    steps = {
        "(a)": optimizer_step(lambda: model(**clip_inputs(batch)).loss, optimizer),
        "(b)": optimizer_step(
            lambda: trainers["sinkhorn"].compute_loss(model, dict(batch)), optimizer
        ),
        "(b')": optimizer_step(
            lambda: trainers["exact_1d"].compute_loss(model, dict(batch)), optimizer
        ),
        "(c)": optimizer_step(lambda: fairclip(model, batch), optimizer),
    }
    logger.info("batch %d: timing %d rounds of %s", batch_size, args.repeats, list(steps))
    step_times = _common.rounds(steps, args.repeats, warmup=1)
    with torch.no_grad():
        outputs = model(**clip_inputs(batch))
        losses = pairwise_clip_loss(
            outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp()
        )
    metrics = trainers["sinkhorn"]._metrics["train"]
    n_terms = sum(1 for key in metrics if key.startswith("fair_D/"))
    flagged = metrics["dbpm/flagged_noisy"][-1] + metrics["dbpm/flagged_faulty"][-1]

    heads = head_variants(shape, batch, args.dataset_size, output_dir)
    timers = {name: _common.per_call(fn) for name, fn in heads.items()}
    head_times = _common.rounds(timers, max(5, args.repeats), warmup=1, self_timed=True)
    result: dict[str, Any] = {
        "batch": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step_times,
        "heads": {name: [float(t) for t in values] for name, values in head_times.items()},
        "n_terms": n_terms,
        "loss_range": (float(losses.min()), float(losses.max())),
        "flagged": int(flagged),
    }
    ratio = _common.ratio_of_rounds(step_times["(b)"], step_times["(a)"])
    if args.profile or ratio > TARGET_RATIO:
        result["profile"] = profile_step(steps["(b)"])
    return result


def render(shape: ClipShape, results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown section: the step table, the head table and the verdict."""
    labels = {
        "(a)": "(a) `CLIPModel` loss (`return_loss=True`)",
        "(b)": "(b) FairRobust: per-pair loss + miner + Sinkhorn (4 attributes)",
        "(b')": "(b') the same with `fairness_ot=exact_1d`",
        "(c)": "(c) FairCLIP-style: + 3 no-grad group batches (race) + Sinkhorn",
    }
    headers = ["variant"]
    for r in results:
        headers += [
            f"ms/step, batch {r['batch']}",
            f"ratio to (a) (range over rounds), batch {r['batch']}",
        ]
    rows = []
    for key, label in labels.items():
        row: list[object] = [label]
        for r in results:
            steps = r["steps"]
            ratio = _common.ratio_of_rounds(steps[key], steps["(a)"])
            per_round = [x / a for x, a in zip(steps[key], steps["(a)"], strict=True)]
            spread = f" ({min(per_round):.2f} to {max(per_round):.2f})" if key != "(a)" else ""
            row += [_common.format_ms(_common.median(steps[key])), f"{ratio:.3f}{spread}"]
        rows.append(row)
    step_table = _common.markdown_table(headers, rows, "l" + "rr" * len(results))

    head_rows = []
    verdicts = []
    for r in results:
        head = {k: _common.median(v) for k, v in r["heads"].items()}
        step_a = _common.median(r["steps"]["(a)"])
        for key in ("(b)", "(b')"):
            extra = head[key] - head["(a)"]
            head_rows.append(
                [
                    r["batch"],
                    key,
                    _common.format_ms(head["(a)"]),
                    _common.format_ms(head[key]),
                    _common.format_ms(extra),
                    f"{100 * extra / step_a:.2f}%",
                ]
            )
        measured = _common.ratio_of_rounds(r["steps"]["(b)"], r["steps"]["(a)"])
        predicted = 1 + (head["(b)"] - head["(a)"]) / step_a
        verdicts.append(
            f"batch {r['batch']}: (b)/(a) measured {measured:.3f}, from the heads "
            f"{predicted:.4f} ({'meets' if predicted <= TARGET_RATIO else 'misses'} the target "
            f"{TARGET_RATIO}); {r['n_terms']} group terms D_kg and {r['flagged']} flagged pairs "
            f"in the batch; the random model's per-pair losses span "
            f"{r['loss_range'][0]:.2f} to {r['loss_range'][1]:.2f} (the Sinkhorn iterations "
            "grow with the log of that span over the blur; the heads' spread embeddings give "
            "losses from about 0 to log B, as in training)"
        )
    head_table = _common.markdown_table(
        [
            "batch",
            "objective",
            "(a) head ms",
            "head ms",
            "extra ms over (a)",
            "extra / (a) step",
        ],
        head_rows,
        "rlrrrr",
    )
    lines = [
        "## Cost of the objective per optimizer step",
        "",
        f"Model: `CLIPModel` built from its config, {shape.describe()} "
        f"({results[0]['parameters'] / 1e6:.1f} M parameters), "
        "random weights; random images and full-length texts. One step = forward, backward and "
        f"AdamW update of the same model on the same batch; median of {args.repeats} round(s) "
        "after one warm-up round, the variants interleaved in each round; ratios are medians "
        "of the per-round ratios. The miner has seen a simulated warm-up epoch over "
        f"{args.dataset_size:,} pairs (a fifth with high losses) and its flags are in force; "
        "(b) and (b') call `FairRobustTrainer.compute_loss` with the default config "
        "(lambda 0.1, blur 0.05, mixture rule). (c) follows FairCLIP's training code "
        f"(blur {FAIRCLIP_BLUR:g}, lambda {FAIRCLIP_LAMBDA:g}); its group batches are "
        "prepared in advance, so their loading is not counted.",
        "",
        step_table,
        "",
        "The loss heads alone (forward and backward on fixed embeddings of the same batch, "
        "through the same `compute_loss`; median over rounds of a timed loop): the objective's "
        "own extra milliseconds, free of the noise of the towers.",
        "",
        head_table,
        "",
        *[f"- {v}" for v in verdicts],
    ]
    for r in results:
        if "profile" in r:
            lines += [
                "",
                f"Profile of one (b) step at batch {r['batch']} (`torch.profiler`, operators "
                "by self CPU time):",
                "",
                r["profile"],
            ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of this benchmark."""
    parser = _common.new_parser(__doc__, repeats=4)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 32 128; 8 with --quick)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model shape (default: cpu; tiny with --quick)",
    )
    parser.add_argument(
        "--dataset-size",
        type=int,
        default=DEFAULT_DATASET_SIZE,
        help="pairs the miner has seen in the simulated warm-up epoch (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one (b) step per batch size even when the target is met",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its section and write it into ``--output``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _common.check_common_arguments(parser, args)
    args.batch_sizes = args.batch_sizes or ([8] if args.quick else [32, 128])
    shape = SHAPES[args.shape or ("tiny" if args.quick else "cpu")]
    if min(args.batch_sizes) < 2:
        parser.error(f"--batch-sizes must be >= 2, got {args.batch_sizes}")
    if args.dataset_size < max(args.batch_sizes):
        parser.error(
            f"--dataset-size ({args.dataset_size}) must be at least the largest batch size"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    threads = _common.set_threads(args.threads)
    info = _common.RunInfo("objective_overhead.py", argv, threads)
    with tempfile.TemporaryDirectory(prefix="objective_overhead_") as output_dir:
        results = [measure_batch(shape, b, args, output_dir) for b in args.batch_sizes]
    section = render(shape, results, args) + "\n\n" + "\n".join(info.footer())
    _common.publish(SECTION, section, Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
