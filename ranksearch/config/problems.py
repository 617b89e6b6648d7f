"""How every check reports: a `Problem` names its key and says the fix; `StudyError` lists them.

The bottom layer of the checks: `config.py`, `space.py`, `validate.py`, `packing.py` and
`storage.py` all return or raise problems in this one shape, so a caller gathers them without
parsing any message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Problem(NamedTuple):
    """One problem: the key path or option at fault (`search.rank`, `--out`; "" for the file as
    a whole) and a message that says what is wrong and how to fix it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"`{self.key}`: {self.message}" if self.key else self.message


class StudyError(Exception):
    """One or more problems with a study, each a `Problem` (a (key, message) pair)."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str = "study file"):
        self.problems = [Problem(*p) for p in problems]
        self.source = source
        lines = [f"{len(self.problems)} problem(s) in {source}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
