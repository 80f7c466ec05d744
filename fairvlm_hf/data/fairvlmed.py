"""Reader of the Harvard-FairVLMed on-disk layout into a ``datasets.DatasetDict``.

The folder holds ``Training/``, ``Validation/`` and ``Test/`` (or ``Testing/``) with one npz file
per patient, and a notes CSV whose third column is the summary used as text. Every file is
checked before anything is written, and all problems are reported in one
:class:`FairVLMedFormatError`, so that a user can fix a folder in one go. The decoded result is
cached as Arrow under a fingerprint of the folder (file names, sizes, modification times) and the
reader options: a second call memory-maps the cache instead of decoding the npz files again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from filelock import FileLock
from tqdm.auto import tqdm

from fairvlm_hf.data import schema
from fairvlm_hf.paths import default_cache_root

logger = logging.getLogger(__name__)

#: Bump when the reader's output changes for an unchanged folder (invalidates caches).
READER_VERSION = "1"

#: Arrow features of every split, in the order of ``schema.COLUMNS``.
FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("int64"),
        "filename": datasets.Value("string"),
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        schema.LABEL_COLUMN: datasets.Value("int64"),
        **{attribute: datasets.Value("int64") for attribute in schema.CATEGORICAL_ATTRIBUTES},
        "age": datasets.Value("float32"),
    }
)
assert tuple(FEATURES) == schema.COLUMNS

IMAGE_KEY = "slo_fundus"
REQUIRED_KEYS: tuple[str, ...] = (
    IMAGE_KEY,
    schema.LABEL_COLUMN,
    *schema.CATEGORICAL_ATTRIBUTES,
    "age",
)
_FILE_NAME = re.compile(r"^data_(\d+)\.npz$")
_SHOWN_PROBLEMS = 20


class FairVLMedFormatError(ValueError):
    """A folder, file or value does not follow the Harvard-FairVLMed layout.

    ``problems`` lists every problem found (the message shows the first few).
    """

    def __init__(self, message: str, problems: Iterable[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (``key`` is the npz key or CSV column, if any)."""

    path: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: key {self.key!r}" if self.key else self.path
        return f"{where}: {self.message}"


def _raise_problems(problems: list[Problem], data_dir: Path) -> None:
    files = len({p.path for p in problems})
    lines = [f"  - {p}" for p in problems[:_SHOWN_PROBLEMS]]
    if len(problems) > _SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - _SHOWN_PROBLEMS} more problem(s)")
    raise FairVLMedFormatError(
        f"{len(problems)} problem(s) in {files} file(s) under {data_dir}:\n" + "\n".join(lines),
        problems,
    )


def sample_id_from_filename(filename: str) -> int:
    """The stable sample id of a file: ``data_00123.npz`` -> ``123``."""
    match = _FILE_NAME.match(filename)
    if match is None:
        raise ValueError(f"file name {filename!r} is not of the form data_<number>.npz")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# Locating the folders and the notes.


def _split_folders(data_dir: Path) -> dict[str, Path]:
    """Existing split folders by split name; two candidate folders for one split is an error."""
    found = {}
    for split, names in schema.SPLIT_FOLDERS.items():
        present = [data_dir / name for name in names if (data_dir / name).is_dir()]
        if len(present) > 1:
            raise FairVLMedFormatError(
                f"{data_dir}: both {' and '.join(p.name + '/' for p in present)} exist; "
                f"keep one folder for the {split} split"
            )
        if present:
            found[split] = present[0]
    return found


def _notes_file(data_dir: Path) -> Path:
    present = [data_dir / name for name in schema.NOTES_FILES if (data_dir / name).is_file()]
    if not present:
        raise FairVLMedFormatError(
            f"{data_dir}: notes CSV missing (expected {' or '.join(schema.NOTES_FILES)})"
        )
    if len(present) > 1:
        logger.warning("%s: using %s and ignoring %s", data_dir, present[0].name, present[1].name)
    return present[0]


def _read_notes(path: Path) -> dict[str, str]:
    """File name -> summary (column 0 -> column 2) of the notes CSV."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise FairVLMedFormatError(f"{path}: cannot be read as CSV: {error}") from error
    if frame.shape[1] < 3:
        raise FairVLMedFormatError(
            f"{path}: expected at least 3 columns (file name, original note, summarized note), "
            f"got {list(frame.columns)}"
        )
    names = frame.iloc[:, 0].str.strip()
    summaries = frame.iloc[:, 2].str.strip()
    notes: dict[str, str] = {}
    conflicts = []
    for name, summary in zip(names, summaries, strict=True):
        if name in notes and notes[name] != summary:
            conflicts.append(name)
        notes[name] = summary
    if conflicts:
        raise FairVLMedFormatError(
            f"{path}: {len(conflicts)} file name(s) with different notes in several rows, "
            f"e.g. {conflicts[:5]}"
        )
    return notes


def _list_files(folders: dict[str, Path]) -> tuple[dict[str, list[Path]], list[Problem]]:
    """The npz files of each split folder, with folder-level problems (empty folder, bad name,
    a file name or sample id that occurs in two splits)."""
    files, problems = {}, []
    owner: dict[str, str] = {}
    ids: dict[int, str] = {}
    for split, folder in folders.items():
        files[split] = sorted(folder.glob("*.npz"))
        others = sorted(p.name for p in folder.iterdir() if p.suffix != ".npz")
        if others:
            logger.warning(
                "%s/: ignoring %d entries that are not .npz: %s",
                folder.name,
                len(others),
                others[:5],
            )
        if not files[split]:
            problems.append(Problem(f"{folder.name}/", None, "split folder holds no .npz file"))
        for path in files[split]:
            where = f"{folder.name}/{path.name}"
            if path.name in owner:
                problems.append(
                    Problem(where, None, f"file name also present in {owner[path.name]}")
                )
                continue
            owner[path.name] = where
            try:
                sample_id = sample_id_from_filename(path.name)
            except ValueError as error:
                problems.append(Problem(where, None, str(error)))
                continue
            if sample_id in ids:
                problems.append(
                    Problem(where, None, f"sample id {sample_id} also in {ids[sample_id]}")
                )
            ids[sample_id] = where
    return files, problems


# ---------------------------------------------------------------------------------------------
# Reading one npz file.


def _image_to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 images are kept; any other numeric image is min-max scaled to 0..255."""
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    low, high = float(image.min()), float(image.max())
    if high == low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


def _read_arrays(path: Path, where: str, keys: Iterable[str]) -> tuple[dict, list[Problem]]:
    """Read ``keys`` of an npz file (no pickles), turning every failure into a Problem."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:
        message = f"cannot be opened as an npz archive (corrupt or truncated?): {error}"
        return {}, [Problem(where, None, message)]
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return {}, [Problem(where, None, "is a single .npy array, not an npz archive")]
    arrays, problems = {}, []
    with archive:
        for key in keys:
            if key not in archive.files:
                problems.append(Problem(where, key, "missing"))
                continue
            try:
                arrays[key] = archive[key]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    message = "holds pickled Python objects, which are not loaded for safety"
                else:
                    message = f"cannot be read: {error}"
                problems.append(Problem(where, key, message))
            except Exception as error:
                message = f"cannot be read (corrupt or truncated?): {type(error).__name__}: {error}"
                problems.append(Problem(where, key, message))
    return arrays, problems


def _scalar(value: np.ndarray, where: str, key: str) -> tuple[float | None, Problem | None]:
    if value.size != 1 or value.dtype.kind not in "biuf":
        return None, Problem(
            where, key, f"expected a numeric scalar, got shape {value.shape} dtype {value.dtype}"
        )
    number = float(value.reshape(()))
    if not np.isfinite(number):
        return None, Problem(where, key, f"value {number} is not finite")
    return number, None


def _check_image(image: np.ndarray, where: str) -> Problem | None:
    if image.ndim != 2:
        return Problem(where, IMAGE_KEY, f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.size == 0 or image.dtype.kind not in "biuf":
        return Problem(where, IMAGE_KEY, f"empty or non-numeric image (dtype {image.dtype})")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        return Problem(where, IMAGE_KEY, "image contains NaN or infinite values")
    return None


def _inspect_file(job: tuple[Path, str, str | None, int | None]) -> tuple[dict | None, list]:
    """Check one npz file and build its row without the image (the image is read when written)."""
    path, where, note, max_text_length = job
    arrays, problems = _read_arrays(path, where, REQUIRED_KEYS)
    row: dict[str, Any] = {"filename": path.name}
    if IMAGE_KEY in arrays:
        problem = _check_image(arrays[IMAGE_KEY], where)
        problems += [problem] if problem else []
    if schema.LABEL_COLUMN in arrays:
        label, problem = _scalar(arrays[schema.LABEL_COLUMN], where, schema.LABEL_COLUMN)
        if problem is None and label not in (0.0, 1.0):
            problem = Problem(where, schema.LABEL_COLUMN, f"label {label:g} is not 0 or 1")
        problems += [problem] if problem else []
        row[schema.LABEL_COLUMN] = int(label) if problem is None else None
    for attribute in schema.CATEGORICAL_ATTRIBUTES:
        if attribute not in arrays:
            continue
        code, problem = _scalar(arrays[attribute], where, attribute)
        coding = schema.CODINGS[attribute]
        if problem is None and (code != int(code) or int(code) not in coding):
            problem = Problem(where, attribute, f"code {code:g} is not one of {coding}")
        problems += [problem] if problem else []
        row[attribute] = int(code) if problem is None else None
    if "age" in arrays:
        age, problem = _scalar(arrays["age"], where, "age")
        if problem is None and not 0 <= age <= 130:
            problem = Problem(where, "age", f"age {age:g} is outside 0..130")
        problems += [problem] if problem else []
        row["age"] = age
    if note is None:
        problems.append(Problem(where, "note", "no row in the notes CSV"))
    elif not note:
        problems.append(Problem(where, "note", "empty summary in the notes CSV"))
    else:
        row["text"] = note if max_text_length is None else note[:max_text_length]
    return (None if problems else row), problems


def _generate_rows(rows: list[dict]) -> Iterator[dict]:
    """Rows of one split with their images (the generator of ``Dataset.from_generator``)."""
    for row in rows:
        path = Path(row["path"])
        with np.load(path, allow_pickle=False) as archive:
            image = _image_to_uint8(archive[IMAGE_KEY])
        yield {key: value for key, value in row.items() if key != "path"} | {"image": image}


# ---------------------------------------------------------------------------------------------
# The public reader.


def _fingerprint(data_dir: Path, notes: Path, files: dict[str, list[Path]], options: dict) -> str:
    def stat(path: Path) -> list:
        info = path.stat()
        return [f"{path.parent.name}/{path.name}", info.st_size, info.st_mtime_ns]

    payload = {
        "version": READER_VERSION,
        "data_dir": str(data_dir.resolve()),
        "options": options,
        "notes": stat(notes),
        "splits": {split: [stat(path) for path in paths] for split, paths in files.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _inspect_all(jobs: list, num_proc: int | None, desc: str) -> list[tuple[dict | None, list]]:
    if num_proc and num_proc > 1 and len(jobs) > 1:
        with multiprocessing.get_context().Pool(min(num_proc, len(jobs))) as pool:
            results = pool.imap(_inspect_file, jobs, chunksize=64)
            return list(tqdm(results, total=len(jobs), desc=desc, unit="file"))
    return [_inspect_file(job) for job in tqdm(jobs, desc=desc, unit="file")]


def load_fairvlmed(
    data_dir: str | os.PathLike,
    *,
    max_text_length: int | None = 180,
    cache_dir: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Read a Harvard-FairVLMed folder into a ``DatasetDict`` ("train", "validation", "test").

    Columns are ``schema.COLUMNS``: ``sample_id`` (from the file name), ``filename``, ``image``
    (grayscale PIL), ``text`` (the summary, cut to ``max_text_length`` characters unless None),
    ``glaucoma``, the categorical attributes (-1 unknown) and ``age``. ``splits`` selects some
    splits; ``num_proc`` processes decode the files. The result is cached under ``cache_dir``
    (default ``<cache root>/datasets``). Raises :class:`FairVLMedFormatError` listing every
    problem found in the folder.
    """
    data_dir = Path(data_dir)
    if isinstance(splits, str):
        splits = [splits]
    wanted = list(schema.SPLIT_FOLDERS) if splits is None else list(splits)
    unknown = [s for s in wanted if s not in schema.SPLIT_FOLDERS]
    if unknown or not wanted:
        raise ValueError(f"splits: expected names among {list(schema.SPLIT_FOLDERS)}, got {wanted}")
    if max_text_length is not None and (
        not isinstance(max_text_length, int) or max_text_length < 1
    ):
        raise ValueError(f"max_text_length must be a positive int or None, got {max_text_length!r}")
    if not data_dir.is_dir():
        raise FairVLMedFormatError(f"data_dir {data_dir} is not a folder")

    folders = _split_folders(data_dir)
    missing = [s for s in wanted if s not in folders]
    if missing:
        expected = ", ".join(
            f"{s}: {' or '.join(n + '/' for n in schema.SPLIT_FOLDERS[s])}" for s in missing
        )
        raise FairVLMedFormatError(f"{data_dir}: split folder(s) missing ({expected})")
    notes_path = _notes_file(data_dir)
    files, problems = _list_files(folders)
    if problems:
        _raise_problems(problems, data_dir)
    files = {split: files[split] for split in wanted}

    options = {"max_text_length": max_text_length, "splits": wanted}
    fingerprint = _fingerprint(data_dir, notes_path, files, options)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "datasets"
    target = cache_root / f"fairvlmed-{fingerprint}"
    if (target / "dataset_dict.json").is_file():
        logger.info("loading %s from the cache %s", data_dir, target)
        return datasets.load_from_disk(str(target))
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "dataset_dict.json").is_file():
            _build(data_dir, notes_path, files, max_text_length, num_proc, target)
    return datasets.load_from_disk(str(target))


def _build(
    data_dir: Path,
    notes_path: Path,
    files: dict[str, list[Path]],
    max_text_length: int | None,
    num_proc: int | None,
    target: Path,
) -> None:
    """Check every file, then write the splits as Arrow into ``target`` (atomically)."""
    notes = _read_notes(notes_path)
    rows: dict[str, list[dict]] = {}
    problems: list[Problem] = []
    for split, paths in files.items():
        jobs = [
            (path, f"{path.parent.name}/{path.name}", notes.get(path.name), max_text_length)
            for path in paths
        ]
        rows[split] = []
        for path, (row, found) in zip(
            paths, _inspect_all(jobs, num_proc, f"checking {split}"), strict=True
        ):
            problems.extend(found)
            if row is not None:
                row["sample_id"] = sample_id_from_filename(path.name)
                row["path"] = str(path)
                rows[split].append(row)
    if problems:
        _raise_problems(problems, data_dir)

    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        result = datasets.DatasetDict()
        for split, split_rows in rows.items():
            split_rows.sort(key=lambda row: row["sample_id"])
            logger.info("writing %d %s samples of %s", len(split_rows), split, data_dir)
            result[split] = datasets.Dataset.from_generator(
                _generate_rows,
                features=FEATURES,
                cache_dir=str(build_dir),
                gen_kwargs={"rows": split_rows},
                num_proc=num_proc if num_proc and num_proc > 1 else None,
                split=datasets.NamedSplit(split),
                fingerprint=f"{target.name}-{split}",
            )
        result.save_to_disk(str(staging))
        del result
        staging.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(build_dir, ignore_errors=True)


def read_ground_truth(data_dir: str | os.PathLike) -> pd.DataFrame | None:
    """The planted bad pairs of a synthetic folder (``bad_pairs.csv``), or None if absent.

    Columns ``filename`` (str), ``sample_id`` (int64, as the reader derives it) and ``kind``.
    Training never calls this; reports use it to score the bad-pair flags.
    """
    path = Path(data_dir) / schema.GROUND_TRUTH_FILE
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"filename": str, "kind": str}, keep_default_na=False)
    missing = [c for c in ("filename", "sample_id", "kind") if c not in frame.columns]
    if missing:
        raise FairVLMedFormatError(
            f"{path}: column(s) {missing} missing, got {list(frame.columns)}"
        )
    try:
        expected = frame["filename"].map(sample_id_from_filename)
        frame["sample_id"] = frame["sample_id"].astype("int64")
    except (ValueError, TypeError) as error:
        raise FairVLMedFormatError(f"{path}: column 'filename' or 'sample_id': {error}") from error
    wrong = frame.loc[expected != frame["sample_id"], "filename"].tolist()
    if wrong:
        raise FairVLMedFormatError(
            f"{path}: column 'sample_id' does not match the file name for {wrong[:5]}"
        )
    return frame
