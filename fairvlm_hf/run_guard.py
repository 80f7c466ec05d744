"""Guards of a training run's output folder: one run at a time, no silent mixing, whole checkpoints.

- `OutputDirGuard` holds a lock file in ``output_dir`` for the whole run, so that a second run
  pointed at the same folder fails at once with `OutputDirInUseError` instead of overwriting the
  first run's checkpoints. It also refuses a fresh (non-resuming) run into a folder that already
  holds ``checkpoint-*`` folders (`ExistingCheckpointsError`), unless the run opts in to
  overwriting, and removes the staging folders that an earlier, killed run left behind.
- `staging_dir` and `publish_checkpoint` make a checkpoint appear at once: it is written into a
  staging folder whose name ``get_last_checkpoint`` never matches, and renamed to
  ``checkpoint-<step>`` only when every file is written. An interruption at any moment leaves the
  previous checkpoints whole and the newest one either complete or absent.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

#: Lock file held in ``output_dir`` by the process that writes the run's checkpoints.
LOCK_NAME = ".fairvlm_hf_run.lock"
#: Prefix of the staging folders in which checkpoints are assembled before they are renamed.
STAGING_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class OutputDirInUseError(RuntimeError):
    """Another run holds the lock of the output folder."""


class ExistingCheckpointsError(FileExistsError):
    """A fresh run was pointed at a folder that already holds checkpoints of another run."""


def staging_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The staging folder of the checkpoint of ``step`` in ``run_dir`` (``.tmp-checkpoint-<step>``).

    The Trainer writes the checkpoint into ``<staging>/checkpoint-<step>``; its name starts with a
    dot, so neither ``get_last_checkpoint`` nor the checkpoint rotation ever sees it.
    """
    return Path(run_dir) / f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{int(step)}"


def publish_checkpoint(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move the complete checkpoint folder ``staged`` to ``final`` by renaming it.

    The rename is atomic on one file system: ``final`` either does not exist yet or is the whole
    checkpoint. A folder already at ``final`` (the same step saved twice) is moved aside first and
    deleted after the new one is in place. The staging parent is removed when empty.
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        raise FileNotFoundError(f"{staged}: staged checkpoint folder is missing")
    old = None
    if final.exists():
        old = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        staged.parent.rmdir()
    except OSError:
        logger.debug("staging folder %s is not empty; left in place", staged.parent)
    return final


def stale_staging_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Staging folders left in ``output_dir`` by a run that was killed while saving."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    pattern = f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"
    return sorted(p for p in folder.glob(pattern) if p.is_dir())


def existing_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    steps = {}
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            steps[path] = int(match.group(1))
    return sorted(steps, key=steps.__getitem__)


class OutputDirGuard:
    """Context manager that owns ``output_dir`` for one run.

    On entry: creates the folder, takes its lock without waiting (`OutputDirInUseError` naming
    the folder if another run holds it), refuses a fresh run into a folder with checkpoints
    (`ExistingCheckpointsError`, unless ``overwrite``: then they are deleted, with a warning),
    and removes stale staging folders. On exit the lock is released, whatever happened.

    Args:
        output_dir: the run's output folder.
        resuming: whether the run continues from a checkpoint (existing checkpoints are expected).
        overwrite: let a fresh run delete the folder's existing checkpoints.
    """

    def __init__(
        self, output_dir: str | os.PathLike[str], resuming: bool, overwrite: bool = False
    ) -> None:
        self.output_dir = Path(output_dir)
        self.resuming = bool(resuming)
        self.overwrite = bool(overwrite)
        self._lock: FileLock | None = None

    @property
    def lock_path(self) -> Path:
        return self.output_dir / LOCK_NAME

    def __enter__(self) -> OutputDirGuard:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise OutputDirInUseError(
                f"output_dir {self.output_dir} is in use by another training run (it holds "
                f"{self.lock_path}); wait for it to finish or choose another --output_dir"
            ) from None
        self._lock = lock
        try:
            self._check_checkpoints()
            self._remove_stale_staging()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_checkpoints(self) -> None:
        if self.resuming:
            return
        found = existing_checkpoints(self.output_dir)
        if not found:
            return
        names = ", ".join(p.name for p in found)
        if not self.overwrite:
            raise ExistingCheckpointsError(
                f"output_dir {self.output_dir} already holds checkpoints of an earlier run "
                f"({names}); a fresh run would mix its checkpoints with them. Resume it with "
                "--resume_from_checkpoint true (or a checkpoint path), choose another "
                "--output_dir, or set overwrite_output_dir=True to delete them and start over."
            )
        logger.warning(
            "overwrite_output_dir=True: deleting the checkpoints of an earlier run in %s: %s",
            self.output_dir,
            names,
        )
        for path in found:
            shutil.rmtree(path)

    def _remove_stale_staging(self) -> None:
        for path in stale_staging_dirs(self.output_dir):
            logger.warning(
                "removing %s: an incomplete checkpoint of a run that was stopped while saving",
                path,
            )
            shutil.rmtree(path)
