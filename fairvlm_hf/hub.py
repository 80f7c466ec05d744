"""Publish to the Hugging Face Hub: a model folder with its card, and the ES-AUC metric as a Space.

Both go through ``HfApi.create_repo`` + ``HfApi.upload_folder`` (``ModelCard.push_to_hub``
validates against a fixed Hub address). The file list is computed here with the Hub's own filter,
so a dry run reports exactly what a real push would send.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, is_offline_mode
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from fairvlm_hf.paths import METRIC_DIR

logger = logging.getLogger(__name__)

#: Training leftovers and caches that never belong in a released model repository.
MODEL_IGNORE_PATTERNS: list[str] = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".tmp-checkpoint-*/**",
    "checkpoints/**",
    "runs/**",
    "wandb/**",
    ".cache/**",
    "*/.cache/**",
    "**/__pycache__/**",
    "__pycache__/**",
    "*.pyc",
    ".ipynb_checkpoints/**",
    ".building-*/**",
    "*.lock",
    "*.tmp",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    ".DS_Store",
]
#: Caches that never belong in the metric Space.
SPACE_IGNORE_PATTERNS: list[str] = [
    "**/__pycache__/**",
    "__pycache__/**",
    "*.pyc",
    ".pytest_cache/**",
    ".cache/**",
    ".ipynb_checkpoints/**",
    ".DS_Store",
]
#: Files that make a folder a loadable model: full weights or a peft adapter.
MODEL_MARKERS = (
    ("config.json", "model.safetensors"),
    ("adapter_config.json", "adapter_model.safetensors"),
)
DEFAULT_METRIC_DIR = METRIC_DIR
#: Text files scanned for a leaked token before anything is uploaded.
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".csv", ".yaml", ".yml", ".py", ".cfg", ".toml"}
_TEXT_SCAN_LIMIT = 10 * 2**20


def list_upload_files(folder: str | os.PathLike[str], ignore_patterns: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the files under ``folder`` that ``upload_folder`` would send."""
    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    patterns = [*ignore_patterns, *DEFAULT_IGNORE_PATTERNS]
    return list(filter_repo_objects(files, ignore_patterns=patterns))


def _check_no_token(root: Path, files: Sequence[str], token: str | None) -> None:
    """Refuse to upload a text file that contains ``token``."""
    if not token:
        return
    for name in files:
        path = root / name
        scanned = path.suffix.lower() in _TEXT_SUFFIXES and path.stat().st_size <= _TEXT_SCAN_LIMIT
        if scanned and token in path.read_text(encoding="utf-8", errors="ignore"):
            raise ValueError(f"{path}: contains the Hub token; refusing to upload it")


def _api(api: Any, token: str | None, repo_id: str) -> Any:
    if api is not None:
        return api
    if is_offline_mode():
        raise ConnectionError(
            f"cannot publish {repo_id!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set); "
            "use dry_run to list the files that would be uploaded"
        )
    return HfApi(token=token)


def _publish(
    api: Any,
    folder: Path,
    repo_id: str,
    *,
    repo_type: str,
    ignore_patterns: list[str],
    token: str | None,
    private: bool,
    commit_message: str,
    space_sdk: str | None = None,
) -> None:
    create: dict[str, Any] = {"repo_type": repo_type, "private": private, "exist_ok": True}
    if space_sdk is not None:
        create["space_sdk"] = space_sdk
    try:
        url = api.create_repo(repo_id=repo_id, token=token, **create)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type=repo_type,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
            token=token,
        )
    except OfflineModeIsEnabled as error:
        raise ConnectionError(
            f"cannot publish {repo_id!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)"
        ) from error
    logger.info("published %s to %s (%s)", folder, repo_id, url)


def push_model_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload fairvlm-hf model",
    api: Any = None,
    dry_run: bool = False,
) -> list[str]:
    """Create the model repository ``repo_id`` and upload ``folder``; return the uploaded files.

    The folder must hold a model (``config.json`` + ``model.safetensors``) or a peft adapter;
    everything else in it (processor, ``README.md``, evaluation files, plots) goes too, except
    checkpoints, caches and pickled weights. ``dry_run`` only lists the files. ``api`` replaces
    ``HfApi(token=token)``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder: {root} is not a folder")
    if not any(all((root / name).is_file() for name in marker) for marker in MODEL_MARKERS):
        wanted = " or ".join(" + ".join(marker) for marker in MODEL_MARKERS)
        raise FileNotFoundError(f"folder: {root} holds no model ({wanted})")
    files = list_upload_files(root, MODEL_IGNORE_PATTERNS)
    if "README.md" not in files:
        logger.warning("%s has no README.md: the repository will have no model card", root)
    _check_no_token(root, files, token)
    if dry_run:
        logger.info("dry run: would upload %d files to model %s", len(files), repo_id)
        return files
    _publish(
        _api(api, token, repo_id),
        root,
        repo_id,
        repo_type="model",
        ignore_patterns=MODEL_IGNORE_PATTERNS,
        token=token,
        private=private,
        commit_message=commit_message,
    )
    return files


def _check_metric_dir(metric_dir: Path) -> None:
    if not metric_dir.is_dir():
        raise FileNotFoundError(f"metric_dir: {metric_dir} is not a folder")
    required = [f"{metric_dir.name}.py", "app.py", "README.md"]
    missing = [name for name in required if not (metric_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"metric_dir: {metric_dir} lacks {', '.join(missing)}")
    readme = (metric_dir / "README.md").read_text(encoding="utf-8")
    if not readme.startswith("---") or "sdk: gradio" not in readme.split("---", 2)[1]:
        raise ValueError(
            f"{metric_dir / 'README.md'}: a Space needs YAML front matter with 'sdk: gradio'"
        )


def push_metric_space(
    space_id: str,
    *,
    metric_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    private: bool = False,
    api: Any = None,
    dry_run: bool = False,
) -> list[str]:
    """Publish the ES-AUC ``evaluate`` module as a Gradio Space ``space_id``; return its files.

    ``metric_dir`` defaults to ``metrics/es_auc`` at the repository root and must hold the module
    (``<folder name>.py``), ``app.py`` and a ``README.md`` whose front matter sets ``sdk: gradio``.
    """
    folder = Path(metric_dir) if metric_dir is not None else DEFAULT_METRIC_DIR
    _check_metric_dir(folder)
    files = list_upload_files(folder, SPACE_IGNORE_PATTERNS)
    _check_no_token(folder, files, token)
    if dry_run:
        logger.info("dry run: would upload %d files to Space %s", len(files), space_id)
        return files
    _publish(
        _api(api, token, space_id),
        folder,
        space_id,
        repo_type="space",
        ignore_patterns=SPACE_IGNORE_PATTERNS,
        token=token,
        private=private,
        commit_message=f"Upload the {folder.name} metric",
        space_sdk="gradio",
    )
    return files


def push_metric_cli_main(argv: Sequence[str] | None = None) -> int:
    """``fairvlm-hf push-metric``: publish the ES-AUC metric as a Space and list its files."""
    parser = argparse.ArgumentParser(
        prog="fairvlm-hf push-metric",
        description="Publish the ES-AUC evaluate metric as a Hugging Face Space (Gradio).",
    )
    parser.add_argument("--space", required=True, help="Space id, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create a private Space")
    parser.add_argument(
        "--dry_run", action="store_true", help="list the files that would be uploaded, send nothing"
    )
    parser.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)"
    )
    parser.add_argument(
        "--metric_dir",
        default=None,
        help=f"the metric folder (default: {DEFAULT_METRIC_DIR.parent.name}/{DEFAULT_METRIC_DIR.name})",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        files = push_metric_space(
            args.space,
            metric_dir=args.metric_dir,
            token=args.token,
            private=args.private,
            dry_run=args.dry_run,
        )
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        sys.stderr.write(f"fairvlm-hf push-metric: error: {error}\n")
        return 1
    verb = "would upload" if args.dry_run else "uploaded"
    sys.stdout.write(f"{verb} {len(files)} files to Space {args.space}:\n")
    sys.stdout.writelines(f"  {name}\n" for name in files)
    return 0
