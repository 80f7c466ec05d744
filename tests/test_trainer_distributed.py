"""Two CPU processes with batch B each train exactly as one process with batch 2B.

Both runs use the same seed and the same seeded shuffle: accelerate hands consecutive batches of
the shuffled order to the ranks in turn, so the global batch of a step (rank 0's rows, then
rank 1's) is the single process's batch of 2B. Per-step losses, the bad-pair flags, the final
weights and the evaluation metrics must agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "tiny_train.py"
REPO = Path(__file__).resolve().parents[1]
# Exact 1-D transport keeps the group term a continuous function of the losses; the Sinkhorn
# loop's length follows the batch's spread, so rounding-level input changes can move its value
# by ~1e-5 and this comparison is about the processes, not the transport solver.
COMMON = ("--use_cpu", "--fairness_ot", "exact_1d")
STEP_KEYS = ("loss", "loss_clip", "loss_rob", "fair_reg", "dbpm/flagged_faulty", "dbpm/mean_weight")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-5000:]}"
        )


@pytest.mark.distributed
def test_two_processes_match_one_process(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), "--output_dir", str(single), "--per_device_batch", "8",
          *COMMON])  # fmt: skip
    _run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()),
            str(SCRIPT), "--output_dir", str(double), "--per_device_batch", "4", *COMMON,
        ]
    )  # fmt: skip
    one = json.loads((single / "result.json").read_text())
    two = json.loads((double / "result.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)

    assert [r["step"] for r in one["steps"]] == [r["step"] for r in two["steps"]]
    assert len(one["steps"]) == 18
    max_diff = dict.fromkeys(STEP_KEYS, 0.0)
    for a, b in zip(one["steps"], two["steps"], strict=True):
        for key in STEP_KEYS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
            max_diff[key] = max(max_diff[key], abs(a[key] - b[key]))
        assert {k for k in a if k.startswith("fair_D/")} == {
            k for k in b if k.startswith("fair_D/")
        }
    print("largest per-step difference, 1 vs 2 processes:", max_diff)

    flags_one, flags_two = pd.DataFrame(one["flags"]), pd.DataFrame(two["flags"])
    assert len(flags_one) > 0
    pd.testing.assert_frame_equal(flags_one, flags_two, rtol=1e-5)
    assert one["report"]["epochs"][1]["n_faulty"] == two["report"]["epochs"][1]["n_faulty"]

    # Attention key biases are left out: softmax ignores a shift shared by a row, so their exact
    # gradient is zero, and Adam turns the rounding noise in it (which differs with the order of
    # the cross-process sum) into steps of up to the learning rate that change no output.
    weights_one = load_file(str(single / "final_weights.safetensors"))
    weights_two = load_file(str(double / "final_weights.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    compared = [name for name in weights_one if not name.endswith("k_proj.bias")]
    assert len(compared) > 0.9 * len(weights_one)
    for name in compared:
        torch.testing.assert_close(weights_two[name], weights_one[name], atol=1e-5, rtol=1e-4)

    for key in ("eval_loss", "eval_auc", "eval_es_auc_race", "eval_mean_es_auc"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], abs=1e-5), key
