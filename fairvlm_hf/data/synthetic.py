"""A synthetic Harvard-FairVLMed: the real on-disk layout with planted bad pairs and ground truth.

The real data set cannot be downloaded here, so this module writes a folder that the reader
(:func:`fairvlm_hf.data.load_fairvlmed`) cannot tell apart from the real one, with three things
the real one lacks: images whose label is visible by construction (glaucoma -> larger optic cup),
group-dependent acquisition shifts (so that a plain model is less accurate on some groups), and a
known set of bad image-text pairs listed in ``bad_pairs.csv`` (never read by training).

Everything is drawn from one seed; images are rendered in fixed-size chunks with their own seeds,
so the output is byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from fairvlm_hf.data import schema
from fairvlm_hf.paths import default_cache_root

logger = logging.getLogger(__name__)

#: Bump when the generator's output changes for an unchanged config (invalidates caches).
GENERATOR_VERSION = "1"

#: Kinds of planted bad pairs, in the order of ``SyntheticConfig.bad_pair_mix``.
BAD_PAIR_KINDS: tuple[str, ...] = ("swap_contradicting", "swap_same_label", "contradicting")

#: Split name -> folder written and the ``use`` value of ``data_summary.csv``.
_SPLITS: tuple[tuple[str, str, str], ...] = (
    ("train", "Training", "training"),
    ("validation", "Validation", "validation"),
    ("test", "Test", "test"),
)

#: Group proportions of Harvard-FairVLMed (all 10,000 samples; see FAIRVLMED.md). Marital
#: status is not tabulated there: plausible clinic proportions with about 5% unknown.
GROUP_PROPORTIONS: dict[str, dict[int, float]] = {
    "race": {0: 819 / 10000, 1: 1491 / 10000, 2: 7690 / 10000},
    "gender": {0: 5631 / 10000, 1: 4369 / 10000},
    "ethnicity": {0: 9062 / 10000, 1: 398 / 10000, -1: 540 / 10000},
    "language": {0: 9250 / 10000, 1: 176 / 10000, 2: 76 / 10000, -1: 498 / 10000},
    "maritalstatus": {0: 0.55, 1: 0.2, 2: 0.1, 3: 0.08, 4: 0.02, -1: 0.05},
}

_CHUNK = 128  # images rendered per task; fixed so that seeds do not depend on the worker count


@dataclass
class SyntheticConfig:
    """Everything that shapes a synthetic data set; the same config and seed give the same bytes."""

    num_train: int = field(default=7000, metadata={"help": "Samples in Training/."})
    num_validation: int = field(default=1000, metadata={"help": "Samples in Validation/."})
    num_test: int = field(default=2000, metadata={"help": "Samples in Test/."})
    image_size: int = field(
        default=128, metadata={"help": "Side of the square grayscale images, in pixels (>= 16)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random draw."})
    glaucoma_rate: float = field(
        default=0.5, metadata={"help": "Probability that a sample has glaucoma."}
    )
    cdr_normal: float = field(
        default=0.38, metadata={"help": "Mean cup-to-disc ratio of non-glaucoma eyes."}
    )
    cdr_glaucoma: float = field(
        default=0.62, metadata={"help": "Mean cup-to-disc ratio of glaucoma eyes."}
    )
    cdr_std: float = field(
        default=0.09,
        metadata={"help": "Spread of the cup-to-disc ratio in each class (sets their overlap)."},
    )
    shift_strength: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the group-dependent acquisition shift (lower contrast, more blur, "
            "more noise); 0 turns it off."
        },
    )
    shift_groups: dict[str, float] = field(
        default_factory=lambda: {
            "race=Black": 1.0,
            "ethnicity=Hispanic": 0.7,
            "language=Spanish": 0.7,
            "language=Other": 0.7,
        },
        metadata={
            "help": "Groups with a degraded acquisition, 'attribute=group' (code or name) -> "
            "severity in [0, 1]; a sample in several takes the largest."
        },
    )
    bad_pair_rate: float = field(
        default=0.2, metadata={"help": "Fraction of samples whose note is replaced (bad pairs)."}
    )
    bad_pair_group_rates: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-group bad-pair rates, 'attribute=group' (code or name) -> rate, "
            "overriding bad_pair_rate; a sample in several groups takes the largest."
        },
    )
    bad_pair_mix: tuple[float, float, float] = field(
        default=(0.4, 0.3, 0.3),
        metadata={
            "help": "Shares of the bad-pair kinds swap_contradicting, swap_same_label, "
            "contradicting (normalised to sum 1)."
        },
    )
    bad_pair_splits: tuple[str, ...] = field(
        default=("train",),
        metadata={"help": "Splits that receive bad pairs (train, validation, test)."},
    )
    max_note_length: int = field(
        default=180, metadata={"help": "Longest summary note, in characters."}
    )

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        if self.max_note_length < 60:
            raise ValueError(
                f"SyntheticConfig.max_note_length must be >= 60, got {self.max_note_length}"
            )
        for name in ("glaucoma_rate", "bad_pair_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must lie in [0, 1]")
        if self.cdr_std <= 0 or self.shift_strength < 0:
            raise ValueError("SyntheticConfig.cdr_std must be > 0 and shift_strength >= 0")
        self.shift_groups = {k: float(v) for k, v in self.shift_groups.items()}
        self.bad_pair_group_rates = {k: float(v) for k, v in self.bad_pair_group_rates.items()}
        for option in ("shift_groups", "bad_pair_group_rates"):
            for key, value in getattr(self, option).items():
                parse_group(key, option=f"SyntheticConfig.{option}")
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"SyntheticConfig.{option}[{key!r}] must lie in [0, 1]")
        self.bad_pair_mix = tuple(float(x) for x in self.bad_pair_mix)
        if len(self.bad_pair_mix) != 3 or min(self.bad_pair_mix) < 0 or sum(self.bad_pair_mix) <= 0:
            raise ValueError(
                "SyntheticConfig.bad_pair_mix needs three non-negative shares with a positive sum "
                f"(for {', '.join(BAD_PAIR_KINDS)}), got {self.bad_pair_mix}"
            )
        self.bad_pair_splits = tuple(self.bad_pair_splits)
        unknown = set(self.bad_pair_splits) - {s for s, _, _ in _SPLITS}
        if unknown:
            raise ValueError(f"SyntheticConfig.bad_pair_splits: unknown split(s) {sorted(unknown)}")

    def fingerprint(self) -> str:
        """A short hash of the config and the generator version (the cache key)."""
        payload = json.dumps(
            {"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_group(key: str, *, option: str = "group") -> tuple[str, int]:
    """Parse ``'race=1'`` or ``'race=Black'`` into ``("race", 1)``, naming ``option`` on error."""
    attribute, sep, value = key.partition("=")
    attribute, value = attribute.strip(), value.strip()
    if not sep or attribute not in schema.CODINGS:
        raise ValueError(
            f"{option}: {key!r} is not 'attribute=group' with attribute one of "
            f"{list(schema.CODINGS)}"
        )
    coding = schema.CODINGS[attribute]
    by_name = {name.lower(): code for code, name in coding.items()}
    if value.lstrip("-").isdigit() and int(value) in coding:
        return attribute, int(value)
    if value.lower() in by_name:
        return attribute, by_name[value.lower()]
    raise ValueError(f"{option}: {key!r}: {attribute} has no group {value!r}; valid: {coding}")


# ---------------------------------------------------------------------------------------------
# Notes: one set of templates for clean and bad notes alike, so that nothing but the content
# (the stated findings and diagnosis) distinguishes a bad note from a clean one.

_DIAGNOSIS = {
    1: (
        "primary open-angle glaucoma",
        "open-angle glaucoma",
        "glaucoma",
        "normal-tension glaucoma",
        "glaucomatous optic neuropathy",
        "moderate glaucoma",
        "advanced glaucoma",
        "POAG",
    ),
    0: (
        "no glaucoma",
        "no signs of glaucoma",
        "no evidence of glaucomatous damage",
        "healthy optic nerves",
        "normal optic nerve appearance",
        "non-glaucomatous optic discs",
    ),
}
_DIAGNOSIS_FRAMES = {
    1: (
        "Assessment: {dx}.",
        "Diagnosis: {dx}.",
        "Findings consistent with {dx}.",
        "Patient has {dx}.",
        "Diagnosed with {dx}.",
    ),
    0: (
        "Assessment: {dx}.",
        "Diagnosis: {dx}.",
        "Exam shows {dx}.",
        "Patient has {dx}.",
        "Impression: {dx}.",
    ),
}
_CDR_TERMS = ("cup-to-disc ratio", "C/D ratio", "c/d", "CDR", "cup/disc")
_CDR_FRAMES = ("{term} {a} OU", "{term} of {a} in both eyes", "{term} {a} OD, {b} OS")
_RIM = {
    1: ("thinning of the neuroretinal rim", "inferior rim notching", "rim thinning"),
    0: ("healthy neuroretinal rim", "intact rim", "pink healthy rim"),
}
_IOP_FRAMES = ("IOP {a}/{b} mmHg", "intraocular pressure {a} and {b}", "pressures {a}/{b}")
_FIELD = {
    1: (
        "superior arcuate defect on visual field",
        "visual field shows inferior arcuate defect",
        "nasal step on visual field",
        "paracentral scotoma on VF",
    ),
    0: ("full visual fields", "visual field within normal limits", "normal VF"),
}
_MEDICATION = {
    1: ("on latanoprost", "using timolol drops", "on dorzolamide-timolol", "started brimonidine"),
    0: ("no drops", "no treatment needed", "no medications"),
}
#: The ratio a note states: the only number with two decimals (pressures and months are whole).
_RATIO = re.compile(r"\b\d\.\d\d\b")
_PLAN = ("Follow up in {m} months.", "Return in {m} months.", "Recheck in {m} months.")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_note(rng: np.random.Generator, diagnosis: int, cdr: float, max_length: int) -> str:
    """A summary note stating ``diagnosis`` and a cup-to-disc ratio near ``cdr``.

    Clauses (diagnosis, cup-to-disc ratio, rim, pressure, visual field, medication, plan) use
    random synonyms and order; optional clauses are dropped until the note fits ``max_length``.
    """

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    a = float(np.clip(np.round((cdr + rng.normal(0, 0.03)) * 20) / 20, 0.1, 0.95))
    b = float(np.clip(a + rng.choice([-0.05, 0.0, 0.0, 0.05]), 0.1, 0.95))
    cdr_clause = pick(_CDR_FRAMES).format(term=pick(_CDR_TERMS), a=f"{a:.2f}", b=f"{b:.2f}")
    iop = rng.normal(21 if diagnosis else 16, 4 if diagnosis else 3, size=2).clip(8, 40)
    findings = [
        cdr_clause,
        pick(_RIM[diagnosis]),
        pick(_IOP_FRAMES).format(a=round(iop[0]), b=round(iop[1])),
        pick(_FIELD[diagnosis]),
        pick(_MEDICATION[diagnosis]),
    ]
    keep = [True, *(rng.random(4) < 0.6)]
    order = [int(i) for i in rng.permutation(len(findings))]
    diagnosis_sentence = pick(_DIAGNOSIS_FRAMES[diagnosis]).format(dx=pick(_DIAGNOSIS[diagnosis]))
    diagnosis_first = bool(rng.random() < 0.5)
    plan = pick(_PLAN).format(m=int(rng.choice([3, 4, 6, 12]))) if rng.random() < 0.5 else ""

    def compose() -> str:
        clauses = [findings[i] for i in order if keep[i]]
        body = _capitalise(", ".join(clauses)) + "." if clauses else ""
        parts = [diagnosis_sentence, body] if diagnosis_first else [body, diagnosis_sentence]
        return " ".join(p for p in [*parts, plan] if p)

    note = compose()
    optional = [i for i in order if i != 0]
    while len(note) > max_length:
        if plan:
            plan = ""
        elif any(keep[i] for i in optional):
            keep[next(i for i in reversed(optional) if keep[i])] = False
        else:
            break
        note = compose()
    if len(note) > max_length:
        raise ValueError(f"max_note_length={max_length} is too short for the note {note!r}")
    return note


def _original_note(rng: np.random.Generator, summary: str) -> str:
    """The longer clinic note that the summary stands for (npz key ``note``)."""
    opening = ("Glaucoma evaluation visit.", "Eye exam for glaucoma workup.", "Annual eye exam.")
    closing = (
        "Discussed findings with patient.",
        "Questions answered.",
        "Patient agrees with plan.",
    )
    return f"{opening[int(rng.integers(3))]} {summary} {closing[int(rng.integers(3))]}"


# ---------------------------------------------------------------------------------------------
# Images: a fundus-like picture drawn for a whole chunk at once with numpy.


def _draw_params(rng: np.random.Generator, cdr: np.ndarray, severity: np.ndarray) -> dict:
    """Per-sample geometry and acquisition parameters of the images (a dict of arrays)."""
    n = len(cdr)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    disc_r = 0.17 * rng.uniform(0.9, 1.1, n)
    return {
        "cdr": cdr,
        "severity": severity,
        "disc_x": side * 0.4 + rng.normal(0, 0.04, n),
        "disc_y": rng.normal(0, 0.05, n),
        "disc_r": disc_r,
        "cup_dx": side * rng.normal(0.05, 0.05, n) * disc_r,
        "cup_dy": rng.normal(0, 0.05, n) * disc_r,
        "disc_level": rng.uniform(0.22, 0.3, n),
        # Media opacity: a degraded acquisition fades the cup's pallor by a random amount.
        "cup_level": rng.uniform(0.22, 0.3, n)
        * (1.0 - 0.8 * np.minimum(severity, 1.0) * rng.random(n)),
        "background": rng.uniform(0.3, 0.42, n),
        "vignetting": rng.uniform(0.25, 0.45, n),
        "vessel_angles": rng.uniform(-np.pi, np.pi, (n, 6)),
        "vessel_bend": rng.normal(0, 1.2, (n, 6)),
    }


def render_fundus(params: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render the images of ``params`` (see ``_draw_params``) as uint8 arrays ``[n, size, size]``.

    Bright optic disc with a brighter cup of radius ``cdr * disc radius``, dark vessels leaving
    the disc, a darker macula, low-frequency texture and vignetting inside a circular field of
    view; then the acquisition: contrast reduced, blurred (Gaussian, in Fourier space) and noise
    added in proportion to ``severity``.
    """
    n = len(params["cdr"])
    f32 = np.float32

    def col(name: str) -> np.ndarray:
        return np.asarray(params[name], dtype=f32)[:, None, None]

    axis = np.linspace(-1.0, 1.0, size, dtype=f32)
    y, x = axis[None, :, None], axis[None, None, :]
    r_centre = np.sqrt(x**2 + y**2)
    image = col("background") * (1.0 - col("vignetting") * r_centre**2)

    dx, dy = x - col("disc_x"), y - col("disc_y")
    r_disc = np.sqrt(dx**2 + dy**2)
    edge = f32(1.5 / size + 0.01)
    disc_r = col("disc_r")
    image += col("disc_level") / (1.0 + np.exp((r_disc - disc_r) / edge))
    r_cup = np.sqrt((dx - col("cup_dx")) ** 2 + (dy - col("cup_dy")) ** 2)
    image += col("cup_level") / (1.0 + np.exp((r_cup - col("cdr") * disc_r) / edge))
    macula = np.exp(-((x + col("disc_x") * 0.15) ** 2 + (y - col("disc_y")) ** 2) / f32(0.02))
    image -= f32(0.08) * macula

    theta = np.arctan2(dy, dx)
    outside = 1.0 / (1.0 + np.exp((0.7 * disc_r - r_disc) / edge))
    width = f32(0.018) * (1.0 - 0.4 * np.minimum(r_disc, 1.0)) + f32(1.0 / size)
    angles = np.asarray(params["vessel_angles"], dtype=f32)
    bends = np.asarray(params["vessel_bend"], dtype=f32)
    closest = np.full_like(image, np.inf)  # squared distance to the nearest vessel, in widths
    for k in range(angles.shape[1]):
        delta = theta - angles[:, k, None, None] - bends[:, k, None, None] * r_disc
        delta -= f32(2 * np.pi) * np.rint(delta * f32(1 / (2 * np.pi)))
        np.minimum(closest, (r_disc * delta / width) ** 2, out=closest)
    image -= f32(0.14) * np.exp(-closest) * outside * np.exp(-r_disc / f32(1.2))

    # Acquisition, in one Fourier pass: reduced contrast, Gaussian blur, then low-frequency
    # texture and white pixel noise drawn from one random spectrum (white noise of unit
    # variance per pixel has coefficients of scale size / sqrt(2) under irfft2).
    severity = col("severity")
    mean = image.mean(axis=(1, 2), keepdims=True)
    image = mean + (image - mean) / (1.0 + 0.8 * severity)
    fy = np.fft.fftfreq(size).astype(f32)[:, None]
    fx = np.fft.rfftfreq(size).astype(f32)[None, :]
    f2 = (fx**2 + fy**2)[None]
    sigma_px = (0.3 + 1.5 * severity) * f32(size / 128)
    spectrum = np.fft.rfft2(image) * np.exp(-2 * np.pi**2 * sigma_px**2 * f2)
    random = rng.standard_normal((2, n, *f2.shape[1:]), dtype=f32)
    texture = np.exp(-f2 / f32(2 * 0.03**2)) * f32(size * 0.6) * (0.04 + 0.04 * severity)
    noise = (0.012 + 0.03 * severity) * f32(size / np.sqrt(2))
    spectrum += (random[0] + 1j * random[1]) * (texture + noise)
    image = np.fft.irfft2(spectrum, s=(size, size)).astype(f32)
    field_of_view = 1.0 / (1.0 + np.exp((r_centre - 0.96) / f32(2.0 / size)))
    image *= field_of_view
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files: deterministic npz (fixed zip timestamps) and CSVs.


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` like ``np.savez`` but byte-identical across runs (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(value), allow_pickle=False)


def _render_chunk(task: dict) -> int:
    """Render one chunk of images and write its npz files (runs in a worker process)."""
    rng = np.random.default_rng(task["seed"])
    images = render_fundus(task["params"], task["size"], rng)
    for image, (path, scalars) in zip(images, task["files"], strict=True):
        arrays = {"slo_fundus": image}
        arrays.update({key: np.array(value) for key, value in scalars.items()})
        write_npz(Path(path), arrays)
    return len(images)


def _sample_groups(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    groups = {}
    for attribute in schema.CATEGORICAL_ATTRIBUTES:
        codes = np.array(list(GROUP_PROPORTIONS[attribute]), dtype=np.int64)
        probs = np.array(list(GROUP_PROPORTIONS[attribute].values()))
        groups[attribute] = rng.choice(codes, size=n, p=probs / probs.sum())
    return groups


def _group_values(groups: dict[str, np.ndarray], table: dict[str, float], default: float):
    """Per-sample value: the largest ``table`` entry among the sample's groups, else ``default``."""
    n = len(next(iter(groups.values())))
    values = np.full(n, np.nan)
    for key, value in table.items():
        attribute, code = parse_group(key)
        hit = groups[attribute] == code
        values[hit] = np.fmax(values[hit], value)
    return np.where(np.isnan(values), default, values)


def _exact_counts(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``shares`` (largest remainder)."""
    shares = np.asarray(shares, dtype=float) / float(np.sum(shares))
    raw = shares * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _plant_bad_pairs(
    rng: np.random.Generator, config: SyntheticConfig, groups: dict, labels: np.ndarray
) -> np.ndarray:
    """Kind index per sample (-1 clean): exact rate per rate class, exact kind mix."""
    n = len(labels)
    kinds = np.full(n, -1, dtype=np.int64)
    rates = _group_values(groups, config.bad_pair_group_rates, config.bad_pair_rate)
    chosen = []
    for rate in np.unique(rates):
        members = np.flatnonzero(rates == rate)
        chosen.append(rng.choice(members, size=round(rate * len(members)), replace=False))
    bad = rng.permutation(np.sort(np.concatenate(chosen)).astype(np.int64))
    counts = _exact_counts(len(bad), config.bad_pair_mix)
    kinds[bad] = np.repeat(np.arange(len(BAD_PAIR_KINDS)), counts)
    return kinds


@dataclass
class _Split:
    name: str
    folder: str
    use: str
    filenames: list[str]
    sample_ids: np.ndarray
    groups: dict[str, np.ndarray]
    labels: np.ndarray
    ages: np.ndarray
    params: dict
    summaries: list[str]
    notes: list[str]
    kinds: np.ndarray


def _build_split(
    config: SyntheticConfig, index: int, first_id: int, n: int, seed: np.random.SeedSequence
) -> _Split:
    """Draw attributes, labels, image parameters, notes and bad pairs of one split."""
    name, folder, use = _SPLITS[index]
    rng_groups, rng_images, rng_notes, rng_bad = (np.random.default_rng(s) for s in seed.spawn(4))
    groups = _sample_groups(rng_groups, n)
    labels = (rng_groups.random(n) < config.glaucoma_rate).astype(np.int64)
    ages = np.round(rng_groups.normal(61.0, 16.0, n).clip(18, 95), 1)
    mean_cdr = np.where(labels == 1, config.cdr_glaucoma, config.cdr_normal)
    cdr = np.clip(mean_cdr + rng_images.normal(0, config.cdr_std, n), 0.12, 0.92)
    shift = _group_values(groups, config.shift_groups, 0.0)
    severity = rng_images.uniform(0.0, 0.3, n) + config.shift_strength * shift
    params = _draw_params(rng_images, cdr, severity)
    summaries = [
        write_note(rng_notes, int(g), float(c), config.max_note_length)
        for g, c in zip(labels, cdr, strict=True)
    ]
    notes = [_original_note(rng_notes, s) for s in summaries]

    kinds = np.full(n, -1, dtype=np.int64)
    if name in config.bad_pair_splits and n:
        kinds = _plant_bad_pairs(rng_bad, config, groups, labels)
    clean_summaries, clean_notes = list(summaries), list(notes)
    filenames = [f"data_{first_id + i:05d}.npz" for i in range(n)]
    contradicting = BAD_PAIR_KINDS.index("contradicting")
    replaced = 0
    for i in np.flatnonzero(kinds >= 0):
        kind = BAD_PAIR_KINDS[kinds[i]]
        if kind != "contradicting":
            wanted = 1 - labels[i] if kind == "swap_contradicting" else labels[i]
            pool = np.flatnonzero((labels == wanted) & (kinds < 0))
            if not len(pool):
                pool = np.flatnonzero((labels == wanted) & (np.arange(n) != i))
            if len(pool):
                donor = int(rng_bad.choice(pool))
                summaries[i], notes[i] = clean_summaries[donor], clean_notes[donor]
                continue
            kinds[i], replaced = contradicting, replaced + 1
        opposite = 1 - int(labels[i])
        mean = config.cdr_glaucoma if opposite else config.cdr_normal
        fake_cdr = float(np.clip(mean + rng_bad.normal(0, config.cdr_std), 0.12, 0.92))
        summaries[i] = write_note(rng_bad, opposite, fake_cdr, config.max_note_length)
        notes[i] = _original_note(rng_bad, summaries[i])
    if replaced:
        logger.warning(
            "split %r: %d swap bad pair(s) had no other patient with the needed diagnosis to "
            "take a note from and were written as contradicting notes instead",
            name,
            replaced,
        )
    return _Split(
        name=name,
        folder=folder,
        use=use,
        filenames=filenames,
        sample_ids=np.arange(first_id, first_id + n, dtype=np.int64),
        groups=groups,
        labels=labels,
        ages=ages,
        params=params,
        summaries=summaries,
        notes=notes,
        kinds=kinds,
    )


def _render_tasks(split: _Split, out_dir: Path, size: int, seed: np.random.SeedSequence):
    folder = out_dir / split.folder
    n = len(split.filenames)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        stop = min(start + _CHUNK, n)
        files = []
        for i in range(start, stop):
            scalars: dict[str, Any] = {"glaucoma": np.int64(split.labels[i])}
            scalars.update({a: np.int64(split.groups[a][i]) for a in schema.CATEGORICAL_ATTRIBUTES})
            scalars["age"] = np.float64(split.ages[i])
            scalars["note"] = split.notes[i]
            files.append((str(folder / split.filenames[i]), scalars))
        yield {
            "seed": np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, chunk)),
            "size": size,
            "params": {k: v[start:stop] for k, v in split.params.items()},
            "files": files,
        }


def _write_csvs(splits: list[_Split], out_dir: Path) -> None:
    with open(out_dir / schema.NOTES_FILES[0], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["File Name", "Original Note", "Summarized Note"])
        for split in splits:
            writer.writerows(zip(split.filenames, split.notes, split.summaries, strict=True))
    names = schema.CODINGS
    with open(out_dir / schema.SUMMARY_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            [
                "filename",
                "age",
                *("gender", "race", "ethnicity", "language", "maritalstatus"),
                *("note", "gpt4_summary", "glaucoma", "use"),
            ]
        )
        for s in splits:
            for i, filename in enumerate(s.filenames):
                g = {a: names[a][int(s.groups[a][i])] for a in schema.CATEGORICAL_ATTRIBUTES}
                writer.writerow(
                    [
                        filename,
                        f"{s.ages[i]:.1f}",
                        *(
                            g[a]
                            for a in ("gender", "race", "ethnicity", "language", "maritalstatus")
                        ),
                        *(s.notes[i], s.summaries[i], "yes" if s.labels[i] else "no", s.use),
                    ]
                )
    with open(out_dir / schema.GROUND_TRUTH_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["filename", "sample_id", "kind"])
        for s in splits:
            for i in np.flatnonzero(s.kinds >= 0):
                writer.writerow([s.filenames[i], int(s.sample_ids[i]), BAD_PAIR_KINDS[s.kinds[i]]])


def _default_workers() -> int:
    """CPUs this process may use, at most 8 (rendering is fast; more mostly adds start-up)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(available or 1, 8))


def generate_synthetic(
    out_dir: str | os.PathLike,
    config: SyntheticConfig | None = None,
    *,
    num_workers: int | None = None,
) -> Path:
    """Write a synthetic data set in the Harvard-FairVLMed layout into ``out_dir`` and return it.

    ``out_dir`` must not exist or be empty. ``num_workers`` processes render the images (default:
    the CPU count; 0 or 1 renders in this process); the output does not depend on it.
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"generate_synthetic: out_dir {out_dir} exists and is not empty")
    sizes = (config.num_train, config.num_validation, config.num_test)
    root_seed = np.random.SeedSequence(config.seed)
    split_seeds = root_seed.spawn(len(_SPLITS))
    splits, tasks, first_id = [], [], 1
    for index, n in enumerate(sizes):
        meta_seed, image_seed = split_seeds[index].spawn(2)
        split = _build_split(config, index, first_id, n, meta_seed)
        (out_dir / split.folder).mkdir(parents=True, exist_ok=True)
        tasks.extend(_render_tasks(split, out_dir, config.image_size, image_seed))
        splits.append(split)
        first_id += n
    total = sum(sizes)
    workers = _default_workers() if num_workers is None else num_workers
    workers = max(1, min(workers, len(tasks)))
    start = time.perf_counter()
    if workers == 1:
        with tqdm(total=total, desc="rendering synthetic FairVLMed", unit="img") as progress:
            for task in tasks:
                progress.update(_render_chunk(task))
    else:
        # spawn, not fork: safe when the caller already runs threads (torch, tqdm, logging)
        with (
            multiprocessing.get_context("spawn").Pool(workers) as pool,
            tqdm(total=total, desc="rendering synthetic FairVLMed", unit="img") as progress,
        ):
            for done in pool.imap_unordered(_render_chunk, tasks):
                progress.update(done)
    _write_csvs(splits, out_dir)
    logger.info(
        "wrote %d samples (%s) to %s in %.1fs",
        total,
        ", ".join(f"{s.name} {len(s.filenames)}" for s in splits),
        out_dir,
        time.perf_counter() - start,
    )
    return out_dir


def sample_truth(config: SyntheticConfig | None = None, split: str = "train") -> dict[str, Any]:
    """What the generator knows about each sample of ``split`` and the files do not say.

    Returns arrays aligned with the split's files: ``sample_id``, ``glaucoma``, ``kind`` (``clean``
    or a bad-pair kind), ``claimed_glaucoma`` (the diagnosis the note states), ``cdr`` (the
    cup-to-disc ratio drawn in the image), ``stated_cdr`` (the first ratio the note states) and
    ``severity`` (the acquisition's degradation, 0 for a clean acquisition). Nothing is rendered:
    the split's draws are repeated from the seed, so this is cheap even for the full data set.
    It is for analyses of what a detector could know (``recipes/detection_ceiling.py``).
    """
    config = config or SyntheticConfig()
    names = [name for name, _, _ in _SPLITS]
    if split not in names:
        raise ValueError(f"sample_truth: unknown split {split!r}; valid: {names}")
    index = names.index(split)
    sizes = (config.num_train, config.num_validation, config.num_test)
    meta_seed, _ = np.random.SeedSequence(config.seed).spawn(len(_SPLITS))[index].spawn(2)
    built = _build_split(config, index, 1 + sum(sizes[:index]), sizes[index], meta_seed)
    claimed = built.labels.copy()
    contradicts = np.isin(
        built.kinds,
        [BAD_PAIR_KINDS.index("swap_contradicting"), BAD_PAIR_KINDS.index("contradicting")],
    )
    claimed[contradicts] = 1 - claimed[contradicts]
    stated = []
    for summary in built.summaries:
        match = _RATIO.search(summary)
        if match is None:
            raise AssertionError(f"sample_truth: no cup-to-disc ratio in the note {summary!r}")
        stated.append(float(match.group()))
    return {
        "sample_id": built.sample_ids,
        "glaucoma": built.labels,
        "kind": np.array(["clean", *BAD_PAIR_KINDS])[built.kinds + 1],
        "claimed_glaucoma": claimed,
        "cdr": np.asarray(built.params["cdr"], dtype=np.float64),
        "stated_cdr": np.array(stated),
        "severity": np.asarray(built.params["severity"], dtype=np.float64),
    }


def ensure_synthetic(
    config: SyntheticConfig | None = None,
    cache_root: str | os.PathLike | None = None,
    *,
    num_workers: int | None = None,
) -> Path:
    """Return a folder holding the synthetic data set of ``config``, generating it once.

    The folder is ``<cache_root>/synthetic/fairvlmed-<config hash>`` (default root:
    ``$FAIRVLM_HF_CACHE`` or ``~/.cache/fairvlm_hf``). It is written to a temporary folder and
    renamed when complete, under a file lock, so that concurrent callers get one finished copy.
    """
    config = config or SyntheticConfig()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    parent = root / "synthetic"
    target = parent / f"fairvlmed-{config.fingerprint()}"
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
        try:
            generate_synthetic(staging, config, num_workers=num_workers)
            (staging / "synthetic_config.json").write_text(
                json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n"
            )
            staging.chmod(0o755)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("synthetic FairVLMed ready at %s", target)
    return target


# ---------------------------------------------------------------------------------------------
# Command line: `fairvlm-hf synth OUT_DIR [--option value ...]`.


def _parse_group_table(text: str) -> dict[str, float]:
    table = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.rpartition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not 'attribute=group:value'")
        try:
            table[key] = float(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a number") from error
    return table


def build_parser() -> argparse.ArgumentParser:
    """The ``synth`` argument parser: one option per :class:`SyntheticConfig` field."""
    parser = argparse.ArgumentParser(
        prog="fairvlm-hf synth",
        description="Write a synthetic data set in the Harvard-FairVLMed layout (npz files, "
        "notes CSVs and the bad-pair ground truth bad_pairs.csv).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", help="Folder to write (must not exist or be empty).")
    for f in dataclasses.fields(SyntheticConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata["help"]
        if isinstance(default, dict):
            parser.add_argument(
                f"--{f.name}",
                type=_parse_group_table,
                default=",".join(f"{k}:{v}" for k, v in default.items()),
                help=f"{help_} Format: 'race=Black:0.3,language=2:0.5' ('' for none).",
            )
        elif isinstance(default, tuple):
            kind, nargs = (str, "+") if f.name == "bad_pair_splits" else (float, len(default))
            parser.add_argument(
                f"--{f.name}", type=kind, nargs=nargs, default=list(default), help=help_
            )
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default, help=help_)
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="Processes rendering images (None: the usable CPUs, at most 8; 0 or 1: this "
        "process); the output does not depend on it.",
    )
    return parser


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fairvlm-hf synth``; prints where the data went and what was planted."""
    args = vars(build_parser().parse_args(argv))
    out_dir, num_workers = args.pop("out_dir"), args.pop("num_workers")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = SyntheticConfig(**args)
        start = time.perf_counter()
        path = generate_synthetic(out_dir, config, num_workers=num_workers)
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"fairvlm-hf synth: {error}\n")
        return 2
    with open(path / schema.GROUND_TRUTH_FILE, encoding="utf-8") as handle:
        bad = list(csv.DictReader(handle))
    kinds = {kind: sum(row["kind"] == kind for row in bad) for kind in BAD_PAIR_KINDS}
    total = config.num_train + config.num_validation + config.num_test
    sys.stdout.write(
        f"wrote {total} samples to {path} in {time.perf_counter() - start:.1f}s; "
        f"{len(bad)} bad pairs ({', '.join(f'{k} {v}' for k, v in kinds.items())})\n"
    )
    return 0
