"""What the benchmark scripts share: `ranksearch run` on a study with `--set` overrides, and the
target a search must reach on a grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_study(study: str, out: Path, overrides: dict[str, str]) -> None:
    """`ranksearch run --study STUDY --out OUT --quiet --set k=v ...`, as a user runs it."""
    sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    subprocess.run(
        [sys.executable, "-m", "ranksearch.cli", "run", "--study", study, "--out", str(out),
         "--quiet", *sets],
        check=True,
    )  # fmt: skip


def target_val_loss(table: dict) -> float:
    """The target: within one seed std of the grid's best full-budget val_loss."""
    return table["configs"][table["best"]]["val_loss"] + table["best_seeds"]["std"]
