"""Train a tiny CLIP that can wait for signals at a chosen point (for the interruption tests).

    python tests/scripts/interruptible_train.py --output_dir OUT [--resume]
        [--pause_at STEP --pause_in {step,save} --wait_signals N]

12 optimizer steps (32 pairs, batch 8, 3 epochs), a checkpoint every 3 steps, bad-pair mining
and the group term on. With ``--pause_at``, the run stops to wait for ``N`` signals: at the
beginning of the step after ``STEP`` optimizer steps (``step``), or inside the checkpoint save of
step ``STEP``, after the weights and the optimizer are written (``save``). It writes
``OUT/paused.json`` (pid, step) when it starts waiting and ``OUT/signals_seen`` (a count) after
each signal, so that a test can send the signals one at a time. A run that completes writes
``OUT/final_weights.safetensors`` and ``OUT/steps.json`` (the per-step log rows); a run stopped
by a signal writes ``OUT/interrupted.json`` (signal, step, checkpoint) and exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_train as tt

from fairvlm_hf.callbacks import TrainingInterrupted
from fairvlm_hf.trainer import FairRobustTrainer

N_SAMPLES = 32
SAVE_STEPS = 3
EXIT_INTERRUPTED = 3
PAUSE_TIMEOUT_S = 120.0


def run_config(output_dir: str | Path, **overrides):
    """The training arguments shared by every run of the interruption tests."""
    values = {
        "fairness_ot": "exact_1d",
        "dbpm_threshold": "sigma",
        "dbpm_beta_faulty": 1.0,
        "dbpm_beta_noisy": 1.0,
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "log_level": "warning",
    }
    values.update(overrides)
    return tt.tiny_config(output_dir, **values)


class Pause:
    """Waits, at one point of training, until the trainer's signal handler has seen N signals."""

    def __init__(self, trainer: FairRobustTrainer, out: Path, step: int, signals: int) -> None:
        self.trainer, self.out, self.step, self.signals = trainer, out, step, signals
        self.done = False

    def __call__(self) -> None:
        if self.done or self.trainer.state.global_step != self.step:
            return
        self.done = True
        handler = self.trainer.stop_on_signal
        (self.out / "paused.json").write_text(json.dumps({"pid": os.getpid(), "step": self.step}))
        seen = 0
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while handler.count < self.signals:
            if handler.count != seen:
                seen = handler.count
                (self.out / "signals_seen").write_text(str(seen))
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {PAUSE_TIMEOUT_S} s for {self.signals} signal(s)")
            time.sleep(0.02)


class PauseAtStepBegin(TrainerCallback):
    def __init__(self, pause: Pause) -> None:
        self.pause = pause

    def on_step_begin(self, args, state, control, **kwargs):
        self.pause()


class PausingTrainer(FairRobustTrainer):
    """Waits inside the checkpoint save (after weights and optimizer, before the RNG state)."""

    pause: Pause | None = None

    def _save_rng_state(self, output_dir: str) -> None:
        if self.pause is not None:
            self.pause()
        super()._save_rng_state(output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause_at", type=int, default=None)
    parser.add_argument("--pause_in", choices=["step", "save"], default="step")
    parser.add_argument("--wait_signals", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    out = Path(args.output_dir)
    dataset, truth = tt.tiny_dataset(n=N_SAMPLES, bad_ids=(3, 10, 17, 29))
    trainer = PausingTrainer(
        model=tt.tiny_clip(),
        args=run_config(out, dataloader_num_workers=args.num_workers),
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        processing_class=tt.TinyTokenizer(),
        ground_truth=truth,
    )
    if args.pause_at is not None:
        pause = Pause(trainer, out, args.pause_at, args.wait_signals)
        if args.pause_in == "save":
            trainer.pause = pause
        else:
            trainer.add_callback(PauseAtStepBegin(pause))
    try:
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    except TrainingInterrupted as stopped:
        record = {
            "signal": stopped.signal_name,
            "step": stopped.global_step,
            "checkpoint": stopped.checkpoint,
            "message": str(stopped),
        }
        (out / "interrupted.json").write_text(json.dumps(record))
        return EXIT_INTERRUPTED
    weights = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(weights, str(out / "final_weights.safetensors"))
    (out / "steps.json").write_text(json.dumps(tt.step_rows(trainer.state.log_history)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
