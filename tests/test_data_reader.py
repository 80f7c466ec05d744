"""The Harvard-FairVLMed reader: content, alternative names, caching and every malformed input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from transformers import HfArgumentParser

from fairvlm_hf.data import schema
from fairvlm_hf.data.arguments import DataArguments
from fairvlm_hf.data.fairvlmed import FairVLMedFormatError, load_fairvlmed, read_ground_truth

ATTRIBUTES = schema.CATEGORICAL_ATTRIBUTES


def _summaries(folder: Path, name: str = "gpt-4_summarized_notes.csv") -> dict[str, str]:
    frame = pd.read_csv(folder / name, keep_default_na=False)
    return dict(zip(frame.iloc[:, 0], frame.iloc[:, 2], strict=True))


# ---------------------------------------------------------------------------------------------
# A hand-made folder: numpy's own np.savez, 2 files per split, every value known.

SPLIT_DIRS = ("Training", "Validation", "Test")


def _arrays(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {
        "slo_fundus": rng.integers(0, 256, (6, 9), dtype=np.uint8),
        "glaucoma": np.array(index % 2),
        "race": np.array(index % 3),
        "gender": np.array(index % 2),
        "ethnicity": np.array(-1),
        "language": np.array(index % 3),
        "maritalstatus": np.array(4),
        "age": np.array(50.5 + index),
        "note": np.array(f"original note {index}"),
    }


def _write(path: Path, arrays: dict) -> None:
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def make_folder(root: Path, per_split: int = 2) -> Path:
    rows = []
    for s, split in enumerate(SPLIT_DIRS):
        (root / split).mkdir(parents=True)
        for j in range(per_split):
            index = 1 + s * per_split + j
            name = f"data_{index:05d}.npz"
            _write(root / split / name, _arrays(index))
            rows.append((name, f"original {index}", f"summary of patient {index}"))
    pd.DataFrame(rows, columns=["File Name", "Original Note", "Summarized Note"]).to_csv(
        root / "gpt-4_summarized_notes.csv", index=False
    )
    return root


def _error(folder: Path, tmp_path: Path) -> FairVLMedFormatError:
    with pytest.raises(FairVLMedFormatError) as info:
        load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    return info.value


# ---------------------------------------------------------------------------------------------
# Content


def test_columns_dtypes_and_values_match_the_files(tiny_fairvlmed, tiny_fairvlmed_dataset):
    data = tiny_fairvlmed_dataset
    assert list(data) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in data.items()} == {"train": 60, "validation": 20, "test": 30}
    features = data["train"].features
    assert tuple(features) == schema.COLUMNS
    assert isinstance(features["image"], datasets.Image)
    assert {k: features[k].dtype for k in schema.COLUMNS if k != "image"} == {
        "sample_id": "int64", "filename": "string", "text": "string", "glaucoma": "int64",
        **dict.fromkeys(ATTRIBUTES, "int64"), "age": "float32",
    }  # fmt: skip
    summaries = _summaries(tiny_fairvlmed)
    folders = {"train": "Training", "validation": "Validation", "test": "Test"}
    all_ids = []
    for split, folder in folders.items():
        ds = data[split]
        ids = ds["sample_id"]
        assert ids == sorted(ids)
        assert ids == [int(f[5:10]) for f in ds["filename"]]
        all_ids += ids
        for row in ds.select(range(0, len(ds), 4)):
            with np.load(tiny_fairvlmed / folder / row["filename"]) as npz:
                assert row["image"].mode == "L"
                np.testing.assert_array_equal(np.asarray(row["image"]), npz["slo_fundus"])
                for key in ("glaucoma", *ATTRIBUTES):
                    assert row[key] == int(npz[key])
                assert row["age"] == pytest.approx(float(npz["age"]), abs=1e-4)
            assert row["text"] == summaries[row["filename"]][:180]
        for attribute, coding in schema.CODINGS.items():
            assert set(ds[attribute]) <= set(coding)
    assert len(set(all_ids)) == len(all_ids) == 110


def test_text_truncation(tiny_fairvlmed, tmp_path):
    summaries = _summaries(tiny_fairvlmed)
    short = load_fairvlmed(tiny_fairvlmed, max_text_length=25, cache_dir=tmp_path, splits="test")
    assert list(short) == ["test"]
    assert short["test"]["text"] == [summaries[f][:25] for f in short["test"]["filename"]]
    assert max(map(len, short["test"]["text"])) == 25
    full = load_fairvlmed(tiny_fairvlmed, max_text_length=None, cache_dir=tmp_path, splits=["test"])
    assert full["test"]["text"] == [summaries[f] for f in full["test"]["filename"]]


def test_alternative_folder_and_notes_names(tiny_fairvlmed, tiny_fairvlmed_dataset, tmp_path):
    copy = Path(shutil.copytree(tiny_fairvlmed, tmp_path / "copy"))
    (copy / "Test").rename(copy / "Testing")
    (copy / "gpt-4_summarized_notes.csv").rename(copy / "gpt4_summarized_notes.csv")
    data = load_fairvlmed(copy, cache_dir=tmp_path / "cache")
    for split in ("train", "test"):
        expected = tiny_fairvlmed_dataset[split]
        assert data[split]["sample_id"] == expected["sample_id"]
        assert data[split]["text"] == expected["text"]


def test_float_images_are_min_max_scaled_and_optional_keys_may_be_absent(tmp_path):
    folder = make_folder(tmp_path / "d")
    image = np.linspace(-3.0, 7.0, 54).reshape(6, 9)
    arrays = _arrays(1) | {"slo_fundus": image, "note": None}
    _write(folder / "Training" / "data_00001.npz", arrays)
    _write(
        folder / "Training" / "data_00002.npz", _arrays(2) | {"slo_fundus": np.full((6, 9), 0.5)}
    )
    extra = {"note_extra": np.array("more"), "md": np.zeros(52), "tds": np.zeros(52)}
    _write(folder / "Test" / "data_00005.npz", _arrays(5) | extra)
    data = load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    first, constant = data["train"][0], data["train"][1]
    expected = np.round((image + 3.0) / 10.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(first["image"]), expected)
    assert np.asarray(first["image"]).min() == 0 and np.asarray(first["image"]).max() == 255
    np.testing.assert_array_equal(np.asarray(constant["image"]), np.zeros((6, 9), np.uint8))
    np.testing.assert_array_equal(np.asarray(data["test"][0]["image"]), _arrays(5)["slo_fundus"])
    assert data["train"]["ethnicity"] == [-1, -1]
    assert data["train"]["text"] == ["summary of patient 1", "summary of patient 2"]


def test_second_call_reads_the_cache_not_the_npz_files(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "d")
    calls: list[str] = []
    real_load = np.load

    def counting_load(file, *args, **kwargs):
        calls.append(str(file))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", counting_load)
    first = load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    assert len(calls) >= 6
    calls.clear()
    second = load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    assert calls == []
    assert second["train"]["text"] == first["train"]["text"]
    assert second["train"].cache_files[0]["filename"].startswith(str(tmp_path / "cache"))

    stat = (folder / "Test" / "data_00006.npz").stat()
    os.utime(folder / "Test" / "data_00006.npz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_fairvlmed(folder, cache_dir=tmp_path / "cache")
    assert calls, "a changed file invalidates the cache"
    calls.clear()
    load_fairvlmed(folder, cache_dir=tmp_path / "cache", max_text_length=5)
    assert calls, "other reader options are another cache entry"
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_parallel_decoding_gives_the_same_rows(tiny_fairvlmed, tiny_fairvlmed_dataset, tmp_path):
    data = load_fairvlmed(tiny_fairvlmed, cache_dir=tmp_path, num_proc=2, splits=["validation"])
    expected = tiny_fairvlmed_dataset["validation"]
    assert data["validation"]["sample_id"] == expected["sample_id"]
    assert data["validation"]["race"] == expected["race"]


def test_argument_errors(tiny_fairvlmed, tmp_path):
    with pytest.raises(ValueError, match="splits"):
        load_fairvlmed(tiny_fairvlmed, splits=["dev"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_text_length"):
        load_fairvlmed(tiny_fairvlmed, max_text_length=0, cache_dir=tmp_path)
    with pytest.raises(FairVLMedFormatError, match="not a folder"):
        load_fairvlmed(tmp_path / "nowhere", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Malformed folders: the error names the file and the key.


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"slo_fundus": None}),
         ["Training/data_00001.npz", "'slo_fundus'", "missing"]),
        (lambda d: _write(d / "Validation/data_00003.npz", _arrays(3) | {"glaucoma": None}),
         ["Validation/data_00003.npz", "'glaucoma'", "missing"]),
        (lambda d: _write(d / "Test/data_00005.npz", _arrays(5) | {"glaucoma": np.array(2)}),
         ["Test/data_00005.npz", "'glaucoma'", "not 0 or 1"]),
        (lambda d: _write(d / "Training/data_00002.npz", _arrays(2) | {"slo_fundus": np.zeros((2, 6, 9))}),
         ["Training/data_00002.npz", "'slo_fundus'", "2-D", "(2, 6, 9)"]),
        (lambda d: _write(d / "Training/data_00002.npz", _arrays(2) | {"slo_fundus": np.full((6, 9), np.nan)}),
         ["Training/data_00002.npz", "'slo_fundus'", "NaN"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"slo_fundus": np.array([{"a": 1}], dtype=object)}),
         ["Training/data_00001.npz", "'slo_fundus'", "pickled"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"race": np.array(5)}),
         ["Training/data_00001.npz", "'race'", "code 5"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"race": np.array(-1)}),
         ["Training/data_00001.npz", "'race'", "code -1"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"language": np.array(7)}),
         ["Training/data_00001.npz", "'language'", "code 7"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"maritalstatus": np.array(1.5)}),
         ["Training/data_00001.npz", "'maritalstatus'", "code 1.5"]),
        (lambda d: _write(d / "Training/data_00001.npz", _arrays(1) | {"age": np.array(np.nan)}),
         ["Training/data_00001.npz", "'age'", "not finite"]),
        (lambda d: (d / "Test/data_00006.npz").write_bytes((d / "Test/data_00006.npz").read_bytes()[:300]),
         ["Test/data_00006.npz", "corrupt or truncated"]),
        (lambda d: (d / "Test/data_00006.npz").write_bytes(b"not a zip file at all" * 10),
         ["Test/data_00006.npz", "corrupt or truncated"]),
    ],
)  # fmt: skip
def test_bad_file_is_named_with_its_key(tmp_path, change, fragments):
    folder = make_folder(tmp_path / "d")
    change(folder)
    error = _error(folder, tmp_path)
    for fragment in fragments:
        assert fragment in str(error)
    assert len(error.problems) == 1


def test_corrupt_member_of_a_valid_zip_names_the_key(tmp_path):
    folder = make_folder(tmp_path / "d")
    path = folder / "Training" / "data_00001.npz"
    raw = bytearray(path.read_bytes())
    start = raw.index(b"glaucoma.npy") + len("glaucoma.npy")
    raw[start + 40 : start + 60] = b"\xff" * 20  # inside the stored member: CRC no longer matches
    path.write_bytes(bytes(raw))
    error = _error(folder, tmp_path)
    assert "Training/data_00001.npz: key 'glaucoma'" in str(error)


def test_missing_or_empty_notes(tmp_path):
    folder = make_folder(tmp_path / "d")
    notes = pd.read_csv(folder / "gpt-4_summarized_notes.csv", keep_default_na=False)
    notes.loc[notes["File Name"] == "data_00004.npz", "Summarized Note"] = "   "
    notes[notes["File Name"] != "data_00002.npz"].to_csv(
        folder / "gpt-4_summarized_notes.csv", index=False
    )
    error = _error(folder, tmp_path)
    assert "Training/data_00002.npz: key 'note': no row in the notes CSV" in str(error)
    assert "Validation/data_00004.npz: key 'note': empty summary" in str(error)
    (folder / "gpt-4_summarized_notes.csv").unlink()
    error = _error(folder, tmp_path)
    assert "gpt-4_summarized_notes.csv" in str(error) and "gpt4_summarized_notes.csv" in str(error)


def test_missing_empty_and_duplicate_split_content(tmp_path):
    folder = make_folder(tmp_path / "d")
    shutil.rmtree(folder / "Validation")
    assert "Validation/" in str(_error(folder, tmp_path))
    (folder / "Validation").mkdir()
    error = _error(folder, tmp_path)
    assert "Validation/" in str(error) and "no .npz file" in str(error)
    shutil.copy(folder / "Training" / "data_00001.npz", folder / "Validation" / "data_00001.npz")
    error = _error(folder, tmp_path)
    assert "Validation/data_00001.npz" in str(error) and "Training/data_00001.npz" in str(error)
    (folder / "Validation" / "data_00001.npz").rename(folder / "Validation" / "data_001.npz")
    assert "sample id 1" in str(_error(folder, tmp_path))
    (folder / "Validation" / "data_001.npz").rename(folder / "Validation" / "scan.npz")
    assert "Validation/scan.npz" in str(_error(folder, tmp_path))
    shutil.copytree(folder / "Test", folder / "Testing")
    assert "Test/ and Testing/" in str(_error(folder, tmp_path))


def test_all_problems_are_reported_at_once(tmp_path):
    folder = make_folder(tmp_path / "d", per_split=10)
    for index in range(1, 31):
        split = SPLIT_DIRS[(index - 1) // 10]
        _write(folder / split / f"data_{index:05d}.npz", _arrays(index) | {"glaucoma": np.array(3)})
    _write(folder / "Training/data_00001.npz", _arrays(1) | {"glaucoma": None, "race": np.array(9)})
    error = _error(folder, tmp_path)
    assert len(error.problems) == 31
    assert {p.path for p in error.problems} == {
        f"{SPLIT_DIRS[(i - 1) // 10]}/data_{i:05d}.npz" for i in range(1, 31)
    }
    assert "31 problem(s) in 30 file(s)" in str(error)
    assert "and 11 more" in str(error)
    assert not (tmp_path / "cache").exists() or not any(
        p.name.startswith("fairvlmed-") and p.is_dir() for p in (tmp_path / "cache").iterdir()
    )


# ---------------------------------------------------------------------------------------------
# Ground truth and DataArguments


def test_ground_truth_matches_the_reader_ids(tiny_fairvlmed, tiny_fairvlmed_dataset, tmp_path):
    truth = read_ground_truth(tiny_fairvlmed)
    assert list(truth.columns) == ["filename", "sample_id", "kind"]
    assert truth["sample_id"].dtype == np.int64
    train = tiny_fairvlmed_dataset["train"]
    by_name = dict(zip(train["filename"], train["sample_id"], strict=True))
    assert all(by_name[f] == s for f, s in zip(truth["filename"], truth["sample_id"], strict=True))
    assert read_ground_truth(tmp_path) is None
    pd.DataFrame({"filename": ["data_00007.npz"], "sample_id": [8], "kind": ["x"]}).to_csv(
        tmp_path / "bad_pairs.csv", index=False
    )
    with pytest.raises(FairVLMedFormatError, match="sample_id"):
        read_ground_truth(tmp_path)
    pd.DataFrame({"filename": ["data_00007.npz"]}).to_csv(tmp_path / "bad_pairs.csv", index=False)
    with pytest.raises(FairVLMedFormatError, match="kind"):
        read_ground_truth(tmp_path)


def test_data_arguments(tiny_fairvlmed, tmp_path):
    (given,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_dir", str(tiny_fairvlmed), "--max_text_length", "40"]
    )
    assert given.resolve_data_dir() == tiny_fairvlmed
    assert given.max_text_length == 40
    (default,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        [
            *("--cache_dir", str(tmp_path), "--synthetic_num_train", "10"),
            *("--synthetic_num_val", "4", "--synthetic_num_test", "4"),
            *("--synthetic_image_size", "16"),
        ]
    )
    folder = default.resolve_data_dir()
    assert folder.parent == tmp_path / "synthetic"
    data = default.load()
    assert {k: len(v) for k, v in data.items()} == {"train": 10, "validation": 4, "test": 4}
    assert len(default.ground_truth()) == round(0.2 * 10)
    assert default.synthetic_config().seed == 0
