"""The synthetic generator: layout, determinism, planted bad pairs, images, cache and CLI."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fairvlm_hf.data import schema, synthetic
from fairvlm_hf.data.synthetic import (
    SyntheticConfig,
    cli_main,
    ensure_synthetic,
    generate_synthetic,
    render_fundus,
)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _stated_diagnosis(note: str) -> int:
    """Hand-written reading of a note: 0 if it negates glaucoma or calls the nerve healthy."""
    negative = r"\bno (signs of )?glaucoma|no evidence of glaucomatous|healthy optic|normal optic|non-glaucomatous"
    if re.search(negative, note, flags=re.IGNORECASE):
        return 0
    if re.search(r"glaucoma|POAG", note):
        return 1
    raise AssertionError(f"note states no diagnosis: {note!r}")


def _summary(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "data_summary.csv", keep_default_na=False)
    frame["sample_id"] = frame["filename"].str.extract(r"(\d+)")[0].astype(int)
    return frame.set_index("filename")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """400 training samples with bad pairs, and small validation and test splits."""
    config = SyntheticConfig(num_train=400, num_validation=40, num_test=40, image_size=16, seed=3)
    return generate_synthetic(tmp_path_factory.mktemp("planted") / "d", config, num_workers=1)


def test_layout_keys_and_csvs(tiny_fairvlmed: Path, tiny_fairvlmed_config: SyntheticConfig):
    sizes = {"Training": 60, "Validation": 20, "Test": 30}
    for folder, n in sizes.items():
        assert len(list((tiny_fairvlmed / folder).glob("data_*.npz"))) == n
    with np.load(tiny_fairvlmed / "Training" / "data_00001.npz", allow_pickle=False) as data:
        assert set(data.files) == {
            "slo_fundus",
            "glaucoma",
            *schema.CATEGORICAL_ATTRIBUTES,
            "age",
            "note",
        }
        assert data["slo_fundus"].dtype == np.uint8 and data["slo_fundus"].shape == (32, 32)
        for key in ("glaucoma", *schema.CATEGORICAL_ATTRIBUTES, "age", "note"):
            assert data[key].shape == ()
    with open(tiny_fairvlmed / "gpt-4_summarized_notes.csv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["File Name", "Original Note", "Summarized Note"]
    assert [r[0] for r in rows[1:]] == [f"data_{i:05d}.npz" for i in range(1, 111)]
    assert all(0 < len(r[2]) <= 180 for r in rows[1:])
    summary = pd.read_csv(tiny_fairvlmed / "data_summary.csv", keep_default_na=False)
    assert list(summary.columns) == [
        "filename", "age", "gender", "race", "ethnicity", "language", "maritalstatus",
        "note", "gpt4_summary", "glaucoma", "use",
    ]  # fmt: skip
    assert summary["use"].value_counts().to_dict() == {"training": 60, "validation": 20, "test": 30}
    assert list(summary["gpt4_summary"]) == [r[2] for r in rows[1:]]
    for attribute, names in schema.CODINGS.items():
        assert set(summary[attribute]) <= set(names.values())
    # data_summary agrees with the npz files
    for _, row in summary.sample(15, random_state=0).iterrows():
        folder = {"training": "Training", "validation": "Validation", "test": "Test"}[row["use"]]
        with np.load(tiny_fairvlmed / folder / row["filename"]) as data:
            assert row["glaucoma"] == ("yes" if data["glaucoma"] else "no")
            assert row["race"] == schema.CODINGS["race"][int(data["race"])]
            assert str(data["note"]) == row["note"]
            assert row["age"] == pytest.approx(float(data["age"]))
    truth = pd.read_csv(tiny_fairvlmed / "bad_pairs.csv")
    assert list(truth.columns) == ["filename", "sample_id", "kind"]
    assert len(truth) == round(0.2 * 60)


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path: Path):
    config = SyntheticConfig(num_train=150, num_validation=10, num_test=10, image_size=24, seed=5)
    first = generate_synthetic(tmp_path / "a", config, num_workers=1)
    second = generate_synthetic(tmp_path / "b", config, num_workers=2)
    assert _files(first) == _files(second)
    other = generate_synthetic(
        tmp_path / "c", SyntheticConfig(**{**vars(config), "seed": 6}), num_workers=1
    )
    a, c = _files(first), _files(other)
    assert a.keys() == c.keys()
    assert a["gpt-4_summarized_notes.csv"] != c["gpt-4_summarized_notes.csv"]
    assert a["bad_pairs.csv"] != c["bad_pairs.csv"]
    npz = [k for k in a if k.endswith(".npz")]
    assert sum(a[k] != c[k] for k in npz) == len(npz)


def test_bad_pairs_follow_their_kind(planted: Path):
    summary = _summary(planted)
    truth = pd.read_csv(planted / "bad_pairs.csv").set_index("filename")
    assert (truth["sample_id"] == summary.loc[truth.index, "sample_id"]).all()
    assert set(summary.loc[truth.index, "use"]) == {"training"}
    assert truth["kind"].value_counts().to_dict() == {
        "swap_contradicting": 32,
        "swap_same_label": 24,
        "contradicting": 24,
    }
    train = summary[summary["use"] == "training"]
    label = (train["glaucoma"] == "yes").astype(int)
    clean = train.drop(index=truth.index)
    for filename, row in train.iterrows():
        stated = _stated_diagnosis(row["gpt4_summary"])
        kind = truth["kind"].get(filename)
        if kind is None:
            assert stated == label[filename]
            continue
        same_note = clean[clean["gpt4_summary"] == row["gpt4_summary"]]
        if kind == "contradicting":
            assert stated != label[filename]
            assert same_note.empty
        else:
            assert not same_note.empty, "a swapped note comes from another patient"
            donor_labels = set((same_note["glaucoma"] == "yes").astype(int))
            expected = 1 - label[filename] if kind == "swap_contradicting" else label[filename]
            assert donor_labels == {expected}
            assert stated == expected
            assert (same_note["note"] == row["note"]).all()


def test_bad_notes_share_the_wording_of_clean_notes(planted: Path):
    summary = _summary(planted)
    bad = set(pd.read_csv(planted / "bad_pairs.csv")["filename"])
    train = summary[summary["use"] == "training"]

    def words(notes) -> set[str]:
        return {w.lower() for note in notes for w in re.findall(r"[A-Za-z/-]+", note)}

    bad_words = words(train.loc[sorted(bad), "gpt4_summary"])
    clean_words = words(train.drop(index=sorted(bad))["gpt4_summary"])
    assert bad_words <= clean_words
    lengths = train["gpt4_summary"].str.len()
    assert abs(lengths[sorted(bad)].mean() - lengths.drop(index=sorted(bad)).mean()) < 15


def test_per_group_rates_and_group_names(tmp_path: Path):
    base = {"num_train": 600, "num_validation": 30, "num_test": 30, "image_size": 16}
    config = SyntheticConfig(**base, bad_pair_rate=0.1, bad_pair_group_rates={"race=Black": 0.5})
    folder = generate_synthetic(tmp_path / "a", config, num_workers=1)
    summary = _summary(folder)
    train = summary[summary["use"] == "training"]
    bad = set(pd.read_csv(folder / "bad_pairs.csv")["filename"])
    black = train["race"] == "Black"
    assert sum(f in bad for f in train.index[black]) == round(0.5 * black.sum())
    assert sum(f in bad for f in train.index[~black]) == round(0.1 * (~black).sum())
    by_code = SyntheticConfig(**base, bad_pair_rate=0.1, bad_pair_group_rates={"race=1": 0.5})
    again = generate_synthetic(tmp_path / "b", by_code, num_workers=1)
    assert (again / "bad_pairs.csv").read_bytes() == (folder / "bad_pairs.csv").read_bytes()


def test_bad_pairs_in_chosen_splits_and_rates(tmp_path: Path):
    config = SyntheticConfig(
        num_train=50, num_validation=20, num_test=40, image_size=16,
        bad_pair_rate=0.25, bad_pair_splits=("train", "test"), bad_pair_mix=(1, 0, 0),
    )  # fmt: skip
    folder = generate_synthetic(tmp_path / "d", config, num_workers=1)
    truth = pd.read_csv(folder / "bad_pairs.csv")
    uses = _summary(folder).loc[truth["filename"], "use"]
    assert uses.value_counts().to_dict() == {"training": round(0.25 * 50), "test": 10}
    assert set(truth["kind"]) == {"swap_contradicting"}
    none = generate_synthetic(
        tmp_path / "e",
        SyntheticConfig(
            num_train=20, num_validation=0, num_test=0, image_size=16, bad_pair_rate=0.0
        ),
        num_workers=1,
    )
    assert len(pd.read_csv(none / "bad_pairs.csv")) == 0
    assert not list((none / "Validation").iterdir())


def test_group_proportions_and_unknowns(planted: Path):
    summary = _summary(planted)
    n = len(summary)
    for attribute in ("race", "ethnicity", "language"):
        observed = summary[attribute].value_counts() / n
        for code, share in synthetic.GROUP_PROPORTIONS[attribute].items():
            name = schema.CODINGS[attribute][code]
            tolerance = 3 * np.sqrt(share * (1 - share) / n) + 1e-3
            assert abs(observed.get(name, 0.0) - share) < tolerance, (attribute, name)
    assert 0.4 < (summary["glaucoma"] == "yes").mean() < 0.6


def _params(cdr, severity, n=1):
    rng = np.random.default_rng(0)
    params = synthetic._draw_params(rng, np.full(n, cdr), np.full(n, severity))
    params.update(disc_x=np.full(n, 0.4), disc_y=np.zeros(n), disc_r=np.full(n, 0.17))
    params.update(cup_dx=np.zeros(n), cup_dy=np.zeros(n), cup_level=np.full(n, 0.26))
    return params


def test_glaucoma_cup_is_larger_and_shift_hides_it():
    size = 128
    axis = np.linspace(-1, 1, size)
    r = np.hypot(axis[None, :] - 0.4, axis[:, None])
    cup_core, rim = r < 0.17 * 0.3, (r > 0.17 * 0.75) & (r < 0.17 * 0.95)
    ring = (r > 0.17 * 0.4) & (r < 0.17 * 0.6)  # inside a 0.7 cup, outside a 0.3 cup

    def mean_over(cdr, severity, mask):
        images = render_fundus(_params(cdr, severity, 16), size, np.random.default_rng(1))
        return images.astype(float)[:, mask].mean()

    # a large cup brightens the ring between the small cup's edge and the disc rim
    assert mean_over(0.7, 0.0, ring) - mean_over(0.3, 0.0, ring) > 20
    # the acquisition shift lowers the contrast between cup and rim
    clean = mean_over(0.5, 0.0, cup_core) - mean_over(0.5, 0.0, rim)
    shifted = mean_over(0.5, 1.0, cup_core) - mean_over(0.5, 1.0, rim)
    assert shifted < 0.6 * clean


def _disc_crops(folder: Path, split: str, size: int):
    """Crop around the brightest blob (the disc), mirrored so that it sits the same way."""
    features, labels, race = [], [], []
    half = size // 6
    for path in sorted((folder / split).glob("*.npz")):
        with np.load(path) as data:
            image = data["slo_fundus"].astype(np.float32) / 255
            labels.append(int(data["glaucoma"]))
            race.append(int(data["race"]))
        cy, cx = np.unravel_index(gaussian_filter(image, size / 32).argmax(), image.shape)
        crop = np.pad(image, half)[cy : cy + 2 * half, cx : cx + 2 * half]
        features.append((crop[:, ::-1] if cx > size / 2 else crop).ravel())
    return np.array(features), np.array(labels), np.array(race)


def test_plain_model_sees_the_label_and_is_less_accurate_on_shifted_groups(tmp_path: Path):
    size = 64
    config = SyntheticConfig(
        num_train=1500, num_validation=0, num_test=1500, image_size=size, bad_pair_rate=0.0, seed=1
    )
    folder = generate_synthetic(tmp_path / "d", config, num_workers=2)
    x_train, y_train, _ = _disc_crops(folder, "Training", size)
    x_test, y_test, race = _disc_crops(folder, "Test", size)
    scores = (
        LogisticRegression(C=0.1, max_iter=3000).fit(x_train, y_train).decision_function(x_test)
    )
    white = roc_auc_score(y_test[race == 2], scores[race == 2])
    black = roc_auc_score(y_test[race == 1], scores[race == 1])
    assert white > 0.75, "the label is visible on unshifted images"
    assert black < white - 0.07, "race Black has a degraded acquisition by default"


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = synthetic.generate_synthetic
    monkeypatch.setattr(
        synthetic, "generate_synthetic", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    config = SyntheticConfig(num_train=12, num_validation=4, num_test=4, image_size=16)
    first = ensure_synthetic(config, cache_root=tmp_path)
    second = ensure_synthetic(config, cache_root=tmp_path)
    assert first == second and len(calls) == 1
    assert config.fingerprint() in first.name
    assert (first / "bad_pairs.csv").is_file() and len(
        list((first / "Training").glob("*.npz"))
    ) == 12
    other = ensure_synthetic(SyntheticConfig(**{**vars(config), "seed": 1}), cache_root=tmp_path)
    assert other != first and len(calls) == 2
    leftovers = [p.name for p in (tmp_path / "synthetic").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_ensure_synthetic_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRVLM_HF_CACHE", str(tmp_path))
    config = SyntheticConfig(
        num_train=4, num_validation=2, num_test=2, image_size=16, bad_pair_rate=0
    )
    assert ensure_synthetic(config).parent == tmp_path / "synthetic"


def test_generate_refuses_a_non_empty_folder(tmp_path: Path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate_synthetic(tmp_path, SyntheticConfig(num_train=2, num_validation=0, num_test=0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bad_pair_group_rates": {"race=Purple": 0.3}}, "race has no group 'Purple'"),
        ({"bad_pair_group_rates": {"height=1": 0.3}}, "bad_pair_group_rates"),
        ({"bad_pair_group_rates": {"race=1": 1.5}}, r"bad_pair_group_rates\['race=1'\]"),
        ({"bad_pair_rate": -0.1}, "bad_pair_rate"),
        ({"bad_pair_mix": (0, 0, 0)}, "bad_pair_mix"),
        ({"bad_pair_splits": ("dev",)}, "dev"),
        ({"image_size": 8}, "image_size"),
        ({"num_train": -1}, "num_train"),
    ],
)
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_cli_writes_the_layout_and_documents_every_option(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--num_train", "20", "--num_validation", "5", "--num_test", "5"]
    argv += ["--image_size", "16", "--bad_pair_group_rates", "race=Black:0.5,language=2:1"]
    argv += ["--bad_pair_mix", "0.5", "0.5", "0", "--num_workers", "1"]
    assert cli_main(argv) == 0
    assert "wrote 30 samples" in capsys.readouterr().out
    assert len(list((out / "Training").glob("*.npz"))) == 20
    truth = pd.read_csv(out / "bad_pairs.csv")
    assert set(truth["kind"]) <= {"swap_contradicting", "swap_same_label"}
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in [f.name for f in synthetic.dataclasses.fields(SyntheticConfig)] + ["num_workers"]:
        assert f"--{name}" in help_text
    assert cli_main([str(tmp_path / "bad"), "--bad_pair_rate", "2"]) == 2
    assert "bad_pair_rate" in capsys.readouterr().err


def test_swap_without_a_donor_becomes_a_contradicting_note(tmp_path, caplog):
    # seed 1: all three samples share one diagnosis, so no swap_contradicting donor exists
    config = SyntheticConfig(
        num_train=3, num_validation=0, num_test=0, image_size=16, seed=1, bad_pair_rate=0.5,
        bad_pair_mix=(1, 0, 0),
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="fairvlm_hf.data.synthetic"):
        folder = generate_synthetic(tmp_path / "d", config, num_workers=0)
    assert "written as contradicting notes" in caplog.text
    truth = pd.read_csv(folder / "bad_pairs.csv")
    summary = _summary(folder)
    assert list(truth["kind"]) == ["contradicting"] * len(truth) and len(truth) == 2
    assert len(set(summary["glaucoma"])) == 1
    for filename in truth["filename"]:
        label = int(summary.loc[filename, "glaucoma"] == "yes")
        assert _stated_diagnosis(summary.loc[filename, "gpt4_summary"]) == 1 - label


def test_sample_truth_matches_the_written_files(
    tiny_fairvlmed: Path, tiny_fairvlmed_config: SyntheticConfig
):
    from fairvlm_hf.data.fairvlmed import read_ground_truth
    from fairvlm_hf.data.synthetic import sample_truth

    for split, folder in (("train", "Training"), ("test", "Test")):
        truth = sample_truth(tiny_fairvlmed_config, split)
        files = sorted((tiny_fairvlmed / folder).glob("*.npz"))
        assert [f"data_{i:05d}.npz" for i in truth["sample_id"]] == [f.name for f in files]
        for path, label in zip(files, truth["glaucoma"], strict=True):
            with np.load(path, allow_pickle=False) as data:
                assert int(data["glaucoma"]) == label
        notes = pd.read_csv(tiny_fairvlmed / "gpt-4_summarized_notes.csv").set_index("File Name")
        for path, stated in zip(files, truth["stated_cdr"], strict=True):
            assert f"{stated:.2f}" in notes.loc[path.name, "Summarized Note"]
    truth = sample_truth(tiny_fairvlmed_config, "train")
    planted = read_ground_truth(tiny_fairvlmed).set_index("sample_id")["kind"]
    kinds = dict(zip(truth["sample_id"].tolist(), truth["kind"].tolist(), strict=True))
    assert {s: k for s, k in kinds.items() if k != "clean"} == planted.to_dict()
    contradicting = np.isin(truth["kind"], ["swap_contradicting", "contradicting"])
    assert (
        truth["claimed_glaucoma"]
        == np.where(contradicting, 1 - truth["glaucoma"], truth["glaucoma"])
    ).all()
    clean = truth["kind"] == "clean"
    assert np.abs(truth["stated_cdr"] - truth["cdr"])[clean].max() < 0.2
    assert ((truth["severity"] >= 0) & (truth["severity"] <= 1.3 + 1e-9)).all()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sample_truth(tiny_fairvlmed_config, "dev")
