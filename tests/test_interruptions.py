"""Interruptions with real signals. A training subprocess with two DataLoader workers gets SIGINT
on its whole process group (as Ctrl-C in a terminal sends it) and stops after saving; a resumed
run gets SIGTERM twice while it saves a checkpoint and dies at once; a third run resumes and must
end exactly as an uninterrupted run (weights, per-step losses, bad-pair flags). Also: a second run
into a busy output folder is refused, SIGTERM stops an in-process run cleanly, and the signal
handlers are scoped to ``train``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from fairvlm_hf.callbacks import StopOnSignalCallback, TrainingInterrupted
from fairvlm_hf.run_guard import LOCK_NAME, OutputDirInUseError
from fairvlm_hf.trainer import MINING_STATE_NAME, FairRobustTrainer

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "interruptible_train.py"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
CHECKPOINT_FILES = {
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    MINING_STATE_NAME,
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


it = _load("interruptible_train")
tt = it.tt


def _start(out: Path, *flags: str, group: bool = False) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"log{len(list(out.glob('log*.txt')))}.txt", "w")  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output_dir", str(out), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=group,
    )
    process.log_path = log.name
    log.close()
    return process


def _log(process: subprocess.Popen) -> str:
    return Path(process.log_path).read_text()


def _wait_for(path: Path, process: subprocess.Popen, content: str | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (path.exists() and (content is None or path.read_text() == content)):
        if process.poll() is not None:
            pytest.fail(f"training ended (rc {process.returncode}) before {path}:\n{_log(process)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {path} after {TIMEOUT_S} s:\n{_log(process)}")
        time.sleep(0.05)


def _finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"training did not end within {TIMEOUT_S} s:\n{_log(process)}")


def _listing(folder: Path) -> dict[str, set[str]]:
    return {p.name: {f.name for f in p.iterdir()} for p in folder.iterdir() if p.is_dir()}


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_process_trainer(output_dir: Path, **overrides) -> FairRobustTrainer:
    dataset, truth = tt.tiny_dataset(n=it.N_SAMPLES, bad_ids=(3, 10, 17, 29))
    return FairRobustTrainer(
        model=tt.tiny_clip(),
        args=it.run_config(output_dir, **overrides),
        data_collator=tt.TinyCollator(),
        train_dataset=dataset,
        processing_class=tt.TinyTokenizer(),
        ground_truth=truth,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference run beside: Ctrl-C at step 7, resume killed by 2 SIGTERMs in save 9, resume."""
    root = tmp_path_factory.mktemp("interrupt")
    run, ref = root / "run", root / "reference"
    result = {"run": run, "reference": ref}
    reference = _start(ref)

    first = _start(run, "--pause_at", "6", "--num_workers", "2", group=True)
    _wait_for(run / "paused.json", first)
    with pytest.raises(OutputDirInUseError) as busy:
        _in_process_trainer(run).train()
    result["busy"] = str(busy.value)
    os.killpg(first.pid, signal.SIGINT)
    result["first"] = (_finish(first), _log(first))
    result["after_first"] = _listing(run)
    result["interrupted"] = json.loads((run / "interrupted.json").read_text())

    (run / "paused.json").unlink()
    second = _start(run, "--resume", "--pause_at", "9", "--pause_in", "save", "--wait_signals", "2")
    _wait_for(run / "paused.json", second)
    second.send_signal(signal.SIGTERM)
    _wait_for(run / "signals_seen", second, content="1")
    second.send_signal(signal.SIGTERM)
    result["second"] = (_finish(second), _log(second))
    result["after_second"] = _listing(run)
    result["partial"] = _listing(run / ".tmp-checkpoint-9")
    result["last_after_second"] = get_last_checkpoint(str(run))

    third = _start(run, "--resume")
    result["third"] = (_finish(third), _log(third))
    result["after_third"] = _listing(run)
    result["reference_rc"] = (_finish(reference), _log(reference))
    return result


def test_ctrl_c_saves_a_whole_checkpoint_and_stops(runs):
    rc, log = runs["first"]
    assert rc == it.EXIT_INTERRUPTED, log
    assert log.count("SIGINT received") == 1, log  # the DataLoader workers ignore it
    assert "stopping at step 7 on SIGINT" in log
    info = runs["interrupted"]
    assert info["signal"] == "SIGINT" and info["step"] == 7
    assert info["checkpoint"] == str(runs["run"] / "checkpoint-7")
    assert "resume_from_checkpoint" in info["message"]
    folders = runs["after_first"]
    assert {"checkpoint-3", "checkpoint-6", "checkpoint-7"} == {
        name for name in folders if name.startswith("checkpoint-")
    }
    assert not [name for name in folders if name.startswith(".tmp-")]
    assert folders["checkpoint-7"] >= CHECKPOINT_FILES
    state = json.loads((runs["run"] / "checkpoint-7" / "trainer_state.json").read_text())
    assert state["global_step"] == 7
    miner = torch.load(runs["run"] / "checkpoint-7" / MINING_STATE_NAME, weights_only=True)
    assert miner["epoch"] == 1  # step 7 lies in the second epoch (steps 5-8)


def test_concurrent_run_into_the_same_folder_is_refused(runs):
    message = runs["busy"]
    assert str(runs["run"]) in message and "in use by another training run" in message
    assert LOCK_NAME in message


def test_second_signal_aborts_at_once_without_a_partial_checkpoint(runs):
    rc, log = runs["second"]
    assert rc == -signal.SIGTERM, log
    assert "SIGTERM received: a checkpoint will be saved" in log
    assert "SIGTERM received a second time: aborting at once" in log
    folders = runs["after_second"]
    assert "checkpoint-9" not in folders
    assert folders[".tmp-checkpoint-9"] == {"checkpoint-9"}
    partial = runs["partial"]["checkpoint-9"]
    assert {"model.safetensors", "optimizer.pt", MINING_STATE_NAME} <= partial
    assert "rng_state.pth" not in partial and "trainer_state.json" not in partial
    assert runs["last_after_second"] == str(runs["run"] / "checkpoint-7")


def test_resumed_run_equals_the_uninterrupted_run(runs):
    rc, log = runs["third"]
    assert rc == 0, log
    assert runs["reference_rc"][0] == 0, runs["reference_rc"][1]
    assert "removing" in log and ".tmp-checkpoint-9" in log
    assert not [name for name in runs["after_third"] if name.startswith(".tmp-")]
    assert {"checkpoint-9", "checkpoint-12"} <= set(runs["after_third"])

    run, ref = runs["run"], runs["reference"]
    got = load_file(run / "final_weights.safetensors")
    want = load_file(ref / "final_weights.safetensors")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)

    got_steps = {row["step"]: row for row in json.loads((run / "steps.json").read_text())}
    want_steps = {row["step"]: row for row in json.loads((ref / "steps.json").read_text())}
    assert sorted(got_steps) == sorted(want_steps) == list(range(1, 13))
    for step, row in want_steps.items():
        for key in ("loss", "loss_clip", "loss_rob", "fair_reg", "dbpm/mean_weight"):
            assert got_steps[step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-7), (step, key)
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "bad_pairs.csv"), pd.read_csv(ref / "bad_pairs.csv"), rtol=1e-6
    )


class _SendSignal(TrainerCallback):
    """Sends ``signum`` to this very process at the beginning of step ``step + 1``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_in_process_stops_after_the_step_and_handlers_are_restored(tmp_path, one_thread):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer = _in_process_trainer(tmp_path / "run", save_strategy="no")
    trainer.add_callback(_SendSignal(1, signal.SIGTERM))
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 2 of 12") as info:
        trainer.train()
    assert info.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")
    assert {f.name for f in (tmp_path / "run" / "checkpoint-2").iterdir()} >= CHECKPOINT_FILES
    assert {sig: signal.getsignal(sig) for sig in before} == before
    again = _in_process_trainer(tmp_path / "run", save_strategy="no")
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 12


def test_ignored_signals_stay_ignored_and_threads_install_nothing():
    callback = StopOnSignalCallback()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with callback.handling_signals():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == callback._handle
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def in_thread():
        with callback.handling_signals():
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen == [signal.getsignal(signal.SIGINT)]
    assert seen[0] != callback._handle


def test_second_sigint_raises_keyboard_interrupt_and_restores_handlers():
    callback = StopOnSignalCallback()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), callback.handling_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert callback.received == "SIGINT" and callback.count == 1
        assert signal.getsignal(signal.SIGINT) == callback._handle
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert callback.count == 2
    assert signal.getsignal(signal.SIGINT) == before
