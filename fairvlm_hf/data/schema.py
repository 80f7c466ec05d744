"""The Harvard-FairVLMed codings, shared by the reader, the generator, the trainer and the metric.

One place for the attribute names and their integer codes, so that every module agrees on what
``race == 2`` means and on which codes are valid. ``-1`` always means *unknown*.
"""

from __future__ import annotations

UNKNOWN = -1

#: Protected attributes the fairness regulariser and the evaluation can use.
PROTECTED_ATTRIBUTES: tuple[str, ...] = ("race", "gender", "ethnicity", "language")

#: Every categorical attribute stored per sample, with its code -> name mapping.
CODINGS: dict[str, dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic", UNKNOWN: "Unknown"},
    "language": {0: "English", 1: "Spanish", 2: "Other", UNKNOWN: "Unknown"},
    "maritalstatus": {
        0: "Married or Partnered",
        1: "Single",
        2: "Divorced",
        3: "Widowed",
        4: "Legally Separated",
        UNKNOWN: "Unknown",
    },
}

#: Categorical attributes, in the order the dataset columns use.
CATEGORICAL_ATTRIBUTES: tuple[str, ...] = tuple(CODINGS)

LABEL_COLUMN = "glaucoma"
LABEL_NAMES: dict[int, str] = {0: "non-glaucoma", 1: "glaucoma"}

#: Split names of the returned ``DatasetDict`` and the folder names that may hold each split.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("Training",),
    "validation": ("Validation",),
    "test": ("Test", "Testing"),
}

#: Accepted names of the summarised-notes CSV.
NOTES_FILES: tuple[str, ...] = ("gpt-4_summarized_notes.csv", "gpt4_summarized_notes.csv")
SUMMARY_FILE = "data_summary.csv"
GROUND_TRUTH_FILE = "bad_pairs.csv"

#: Columns of every split produced by :func:`fairvlm_hf.data.load_fairvlmed`.
COLUMNS: tuple[str, ...] = (
    "sample_id",
    "filename",
    "image",
    "text",
    LABEL_COLUMN,
    *CATEGORICAL_ATTRIBUTES,
    "age",
)


def group_name(attribute: str, code: int) -> str:
    """Human-readable name of ``code`` for ``attribute`` (``"race=2"`` -> ``"White"``)."""
    return CODINGS.get(attribute, {}).get(int(code), str(code))
