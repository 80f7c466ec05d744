"""Shared by the experiment recipes: run `recipes/train.py` once per variant and read its results.

Each run goes to its own folder and is skipped when that folder already holds a finished run
(`run_summary.json`), so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent
TRAIN = RECIPES / "train.py"


@dataclass
class Run:
    """One training run: a config file, extra flags, and the folder it writes."""

    name: str
    config: Path
    output_dir: Path
    flags: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return (self.output_dir / "run_summary.json").is_file()

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(TRAIN),
            "--config",
            str(self.config),
            "--output_dir",
            str(self.output_dir),
            *self.flags,
        ]


def execute(run: Run, log_dir: Path) -> float:
    """Run ``run`` unless it is done; its output goes to ``log_dir/<name>.log``. Returns seconds."""
    if run.done:
        return 0.0
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{run.name}.log"
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(run.command(), stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-30:])
        raise RuntimeError(f"run {run.name} failed (exit {result.returncode}); see {log}:\n{tail}")
    return time.perf_counter() - started


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a finished run; a clear error names the file when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; did the run finish?")
    return json.loads(path.read_text(encoding="utf-8"))
