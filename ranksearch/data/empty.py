"""Rows that teach nothing: found, counted and said in one place.

A row whose text is blank (for the causal-LM formats: a column its templates name, or every
assistant answer of its conversation) is dropped and counted as `dropped_empty`. A few are
sparse data; past `MAX_EMPTY_SHARE` of a file the column is more likely wrong than sparse and
the study is refused; with none left there is nothing to train on. A text column that holds
numbers only is most likely the wrong column (a score or an id); a model can still learn from
digits, so that is said as a warning, not refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ranksearch.config.problems import Problem
from ranksearch.data.sft import columns_key, columns_used

if TYPE_CHECKING:
    import pandas as pd

    from ranksearch.config.schema import DataConfig, StudyConfig

MAX_EMPTY_SHARE = 0.5  # past this share of empty rows, the column is more likely wrong than sparse


class Empty(NamedTuple):
    """What an empty row is empty in: the key to fix, the subject in words, the fix."""

    key: str
    subject: str
    fix: str


def what_is_empty(d: DataConfig, task: str) -> Empty:
    if task != "causal-lm" or d.format == "text":
        key = "data.text_column"
        return Empty(
            key, f"{d.text_column!r} is", f"point `{key}` at the column that holds the texts"
        )
    if isinstance(d.messages, str) and d.format == "messages":
        return Empty(
            "data.messages",
            f"every assistant answer in {d.messages!r} is",
            "give the assistant turns their answers",
        )
    key = columns_key(d)
    return Empty(key, "a column its templates name is", f"point `{key}` at columns that hold text")


def blank_rows(d: DataConfig, frame: pd.DataFrame, task: str) -> np.ndarray:
    """A mask of the rows that teach nothing (the columns the study reads exist)."""
    if task != "causal-lm" or d.format == "text":
        return _blank(frame[d.text_column])
    if isinstance(d.messages, str) and d.format == "messages":
        return np.array([_no_answer(turns) for turns in frame[d.messages]], dtype=bool)
    blank = np.zeros(len(frame), bool)
    for column in columns_used(d):
        blank |= _blank(frame[column])
    return blank


def _blank(column: pd.Series) -> np.ndarray:
    return (column.astype(str).str.strip() == "").to_numpy()


def _no_answer(turns) -> bool:
    """A well-formed conversation whose assistant turns are all blank (a malformed one, or one
    without an assistant turn, is left for `sft.conversation` to name)."""
    if isinstance(turns, np.ndarray):  # parquet gives arrays of dicts
        turns = turns.tolist()
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return False
    answers = [t.get("content") for t in turns if t.get("role") == "assistant"]
    return bool(answers) and all(isinstance(a, str) and not a.strip() for a in answers)


def numeric_texts(d: DataConfig, frame: pd.DataFrame, task: str) -> int:
    """How many rows of a text column read as numbers (0 for the template formats)."""
    import pandas as pd

    if task == "causal-lm" and d.format != "text":
        return 0
    texts = frame[d.text_column].astype(str).str.strip()
    return int(pd.to_numeric(texts, errors="coerce").notna().sum())


def nothing_left(d: DataConfig, task: str, rows: int, where: str) -> Problem:
    """The problem of a file with no row left to train on: none at all, or all empty."""
    if not rows:
        return Problem(where, f"`{where}` has no rows; give a file with data in it")
    empty = what_is_empty(d, task)
    return Problem(
        empty.key,
        f"{empty.subject} empty in all {rows:,} rows of `{where}`: nothing to train on; "
        f"{empty.fix}",
    )


def empty_rows(
    cfg: StudyConfig, counts: dict[str, int], where: str
) -> tuple[Problem | None, str | None]:
    """A warning when rows of `where` were dropped as empty; a problem when most of them were."""
    dropped, rows = counts.get("dropped_empty", 0), counts.get("rows", 0)
    if not dropped:
        return None, None
    empty = what_is_empty(cfg.data, cfg.task)
    said = f"{dropped:,} of {rows:,} rows of `{where}` dropped: {empty.subject} empty in them"
    if dropped <= MAX_EMPTY_SHARE * rows:
        return None, said
    fix = (
        f"more than {MAX_EMPTY_SHARE:.0%} of the rows: {empty.fix}, or remove the empty rows "
        "from the file"
    )
    return Problem(empty.key, f"{said}; {fix}"), said


def numbers_warning(cfg: StudyConfig, counts: dict[str, int], where: str) -> str | None:
    """A warning when every text of `where` is a number: most likely the wrong column."""
    kept = counts.get("rows", 0) - counts.get("dropped_empty", 0)
    if not kept or counts.get("numeric_texts", 0) < kept:
        return None
    column = cfg.data.text_column
    return (
        f"every text of `{where}` in {column!r} is a number: is it the column that holds the "
        "texts? If not, point `data.text_column` at that column"
    )


def row_warnings(cfg: StudyConfig, counts: dict[str, int], where: str) -> list[str]:
    """What is accepted in the rows of `where` but worth saying."""
    said = [empty_rows(cfg, counts, where)[1], numbers_warning(cfg, counts, where)]
    return [w for w in said if w]


def data_warnings(cfg: StudyConfig, counts: dict[str, int]) -> list[str]:
    """`row_warnings` for prepared data (its validation counts are prefixed `validation_`)."""
    said = []
    for where, prefix in (("data.source", ""), ("data.validation", "validation_")):
        part = {k: counts.get(prefix + k, 0) for k in ("rows", "dropped_empty", "numeric_texts")}
        said += row_warnings(cfg, part, where)
    return said
