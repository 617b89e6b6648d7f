"""What the commands print besides the live view: `run`'s opening lines, and the tables of
`report`, `estimate` and `status` (rich tables of the answer package's rows and cells)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ranksearch.answer.report import trial_row
from ranksearch.answer.text import (
    COLUMNS,
    RANK_COLUMNS,
    cell,
    format_row,
    rank_cells,
    summary_lines,
)
from ranksearch.config.paths import redact_url

# the trial table's columns in the order they give way to a narrow terminal (first: first
# dropped); the number, state, rank, modules, lr, val loss and note always stay
DROPPED_FIRST = ("sec", "dropout", "alpha", "trainable", "step", "acc")
TEXT_COLUMNS = ("state", "modules", "note")
NOTE_MIN = 12  # the note wraps (`pruned at` / `step 40`), never narrower than this


def fitted_columns(cells: list[list[str]], width: int) -> list[int]:
    """Which COLUMNS to show at `width` terminal columns: every cell but the note's is shown
    whole (a number cut to `0.…` would be wrong, not short), so columns are dropped by
    priority (DROPPED_FIRST) until the rest fits, borders and padding counted."""
    need = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(COLUMNS)]
    need[COLUMNS.index("note")] = min(need[COLUMNS.index("note")], NOTE_MIN)
    kept = list(range(len(COLUMNS)))
    for name in DROPPED_FIRST:
        if sum(need[i] + 3 for i in kept) + 1 <= width:  # "│ " + cell + " " each, a last "│"
            break
        kept.remove(COLUMNS.index(name))
    return kept


def rows_table(rows: list[dict[str, Any]], title: str, width: int) -> Table:
    """The trials (`report.trial_row` rows) as a table that fits `width` columns."""
    cells = [format_row(r) for r in rows]
    kept = fitted_columns(cells, width)
    table = Table(title=title, title_justify="left")
    for i in kept:
        name = COLUMNS[i]
        if name == "note":
            table.add_column(name, overflow="fold", min_width=NOTE_MIN)
        else:
            table.add_column(name, justify="left" if name in TEXT_COLUMNS else "right",
                             no_wrap=True)  # fmt: skip
    for row in cells:
        table.add_row(*(row[i] for i in kept))
    return table


def trials_table(study: optuna.Study, title: str | None, width: int) -> Table:
    """`run`'s closing table: every finished trial, in order."""
    finished = [
        t for t in study.get_trials(deepcopy=False)
        if t.state not in (TrialState.RUNNING, TrialState.WAITING)
    ]  # fmt: skip
    return rows_table([trial_row(t) for t in finished], title or "", width)


def rank_table(report: dict[str, Any]) -> Table:
    table = Table(title="by rank", title_justify="left")
    for col in (*RANK_COLUMNS, "sec"):
        table.add_column(col, justify="right")
    for r in report["ranks"]:
        table.add_row(*rank_cells(r), cell(r["mean_seconds"], ".0f"))
    return table


DROP_REASONS = {
    "dropped_empty": "empty",
    "dropped_unmapped": "label not in data.labels",
    "train_dropped_truncated": "answer cut by max_length (train)",
    "validation_dropped_truncated": "answer cut by max_length (validation)",
}


def data_line(counts: dict[str, int]) -> str:
    """`data: 20,826 train / 384 validation rows; dropped: 15,018 label not in data.labels`."""
    dropped = [
        f"{counts[k] + counts.get('validation_' + k, 0):,} {why}"
        for k, why in DROP_REASONS.items()
        if counts.get(k, 0) + counts.get("validation_" + k, 0)
    ]
    line = f"data: {counts['train']:,} train / {counts['validation']:,} validation rows"
    return line + (f"; dropped: {', '.join(dropped)}" if dropped else "")


def ui_command(args: Any) -> str:
    """The `ranksearch ui` command that opens the study `args` (of `run` or `confirm`) names:
    the same study file, overrides, study directory and stores, quoted for a shell (a storage
    URL with its password masked: `ui` reads only the MLflow store)."""
    parts = ["ranksearch", "ui", "--study", args.study]
    for override in args.overrides:
        parts += ["--set", override]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    if args.storage:
        parts += ["--storage", redact_url(args.storage)]
    if args.tracking_uri:
        parts += ["--tracking-uri", redact_url(args.tracking_uri)]
    return shlex.join(parts)


def study_lines(checked: Any, mlflow_uri: str | None, browse: str) -> list[str]:
    """Where a study runs and logs, said once before it starts (a `validate.CheckedStudy`);
    `browse`: the command that opens its runs (`ui_command`)."""
    parallel = checked.slots.parallel
    trials = f"{parallel} trial{'s' if parallel > 1 else ''} at a time"
    lines = [
        f"study {checked.cfg.study_name}: {checked.out} (storage "
        f"{redact_url(checked.storage_url)}, device {checked.device}, {trials})"
    ]
    if mlflow_uri:
        lines.append(f"MLflow: {redact_url(mlflow_uri)} (browse: {browse})")
    return lines


def print_report(
    console: Console,
    report: dict[str, Any],
    in_mlflow: bool,
    page: Path | None = None,
    kept: Path | None = None,
) -> None:
    """`ranksearch report` as tables: the trials, by rank, the answer, where the plots and the
    page `report.html` went (`kept`: the earlier page a `--no-plots` report left as it was)."""
    console.print(rows_table(report["trials"], f"study {report['study']}", console.width))
    console.print(rank_table(report))
    for line in summary_lines(report):
        console.print(Text(line))
    where = " and on the study's MLflow parent run" if in_mlflow else ""
    if report.get("plots"):
        folder = Path(report["plots"][0]).parent
        console.print(Text(f"Plots:       {len(report['plots'])} files in {folder}{where}"))
    if page is not None:
        console.print(Text(f"Report:      {page}{where}"))
    elif kept is not None:
        console.print(
            Text(f"Report:      {kept} left as the last full report wrote it (--no-plots)")
        )


ESTIMATE_COLUMNS = (
    "rank",
    "modules",
    "dora",
    "adapted",
    "trainable",
    "fraction",
    "adapter MB",
    "optimizer MB",
    "memory MB (est.)",
    "compression",
)


def print_estimate(console: Console, title: str, rows: list, measured: dict | None) -> None:
    """`ranksearch estimate` as a table of `estimate.Estimate` rows, and the measured step."""
    table = Table(title=title, title_justify="left")
    for col in ESTIMATE_COLUMNS:
        table.add_column(col, justify="left" if col == "modules" else "right")
    for r in rows:
        table.add_row(
            str(r.rank),
            r.target_modules,
            "yes" if r.use_dora else "no",
            str(r.adapted_modules),
            f"{r.trainable_params:,}",
            f"{r.trainable_fraction:.3%}",
            f"{r.adapter_mb:.2f}",
            f"{r.optimizer_state_mb:.2f}",
            f"{r.memory_estimate_mb:.0f}",
            f"{r.compression:,.0f}x",
        )
    console.print(table)
    if measured:
        m = measured
        console.print(
            Text(
                f"measured: rank {m['rank']} {m['target_modules']}, one step on {m['device']}: "
                f"{m['measured_mb']:.0f} MB ({m['method']}) vs {m['estimate_mb']:.0f} MB estimated"
            )
        )


def print_status(console: Console, status: dict[str, Any]) -> None:
    """`ranksearch status` as lines and a table by worker host (`report.study_status`)."""
    c = status["counts"]
    console.print(
        Text(
            f"study {status['study']}: {c['complete']} complete, {c['pruned']} "
            f"pruned, {c['fail']} failed, {c['running']} running, "
            f"{status['to_go']} to go of {status['n_trials']}"
            + (f", {c['duplicate']} not retrained" if c["duplicate"] else "")
        )
    )
    if status["best"] is not None:
        console.print(
            Text(f"best: trial {status['best']}, recommended: trial {status['recommended']}")
        )
    if status.get("compute"):
        console.print(Text(status["compute"]))
    table = Table(title="by worker host", title_justify="left")
    for col in ("host", "complete", "pruned", "failed", "running"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for host, n in status["hosts"].items():
        table.add_row(host, str(n["complete"]), str(n["pruned"]), str(n["fail"]), str(n["running"]))
    console.print(table)
    for r in status["running"]:
        seen = r.get("last_report_time")  # a hung worker shows as a long silence
        heard = f"last report {time.time() - seen:.0f} s ago" if seen else "no report yet"
        console.print(
            Text(
                f"running: trial {r['trial']} on {r['host']} (pid {r['pid']}), "
                f"step {r['last_step']}, started {r['started']}, {heard}"
            )
        )
