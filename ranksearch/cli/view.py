"""What a user sees in the terminal: the view of a running study, and the commands' tables.

Unlike ui.py (MLflow's web UI, `ranksearch ui`), everything here prints to the terminal.
While a study runs: a live Rich view on a terminal, plain lines otherwise. Each view takes the
same calls from the orchestrator; `QuietView` is the null object (warnings only), so the loop
never branches on how it is watched. After it: the lines and tables of `run`, `report`,
`estimate` and `status` (their content comes from report.py and estimate.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ranksearch.answer.recommend import accuracy, best_of, progress
from ranksearch.answer.report import trial_row
from ranksearch.config.space import TrialConfig, shown_config


def describe(config: dict[str, Any]) -> str:
    """A configuration in one line, from a shown configuration or a `trial_row`."""
    return (
        f"rank={config['rank']} alpha={config['lora_alpha']} "
        f"dropout={config['lora_dropout']:g} modules={config['target_modules']} "
        f"lr={config['learning_rate']:.2e}"
    )


def finished_line(t: FrozenTrial) -> str:
    r = trial_row(t)
    loss = f"val_loss {r['val_loss']:.4f}" if r["val_loss"] is not None else "no val_loss"
    acc = f" acc {r['accuracy']:.3f}" if r["accuracy"] is not None else ""
    secs = f" {r['wall_seconds']:.0f}s" if r["wall_seconds"] is not None else ""
    note = f"  ({r['note']})" if r["note"] else ""
    return (
        f"trial {t.number:>3} {t.state.name:<8} {loss}{acc}{secs}  {describe(r)}{note}"
        if r["rank"] is not None
        else f"trial {t.number:>3} {t.state.name}{note}"
    )


def _counts(study: optuna.Study, budget: int) -> dict[str, int]:
    """The counts `status` shows too (recommend.progress)."""
    n = progress(study.get_trials(deepcopy=False), budget)
    return {
        "COMPLETE": n["complete"],
        "PRUNED": n["pruned"],
        "FAIL": n["fail"],
        "to go": n["to_go"],
        "not retrained": n["duplicate"],
    }


class QuietView:
    """Warnings only."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    def message(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def study_started(self, study: optuna.Study, budget: int) -> None: ...
    def trial_started(self, number: int, config: TrialConfig) -> None: ...
    def trial_report(self, number: int, record: dict[str, Any]) -> None: ...
    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None: ...
    def close(self) -> None: ...


class PlainView(QuietView):
    """One line per event: for logs, CI and `nohup`."""

    def __init__(self, console: Console | None = None):
        super().__init__(console or Console(highlight=False, soft_wrap=True))

    def message(self, text: str) -> None:
        self.console.print(Text(text))

    def study_started(self, study: optuna.Study, budget: int) -> None:
        c = _counts(study, budget)
        self.console.print(
            f"study {study.study_name}: {c['COMPLETE']} complete, "
            f"{c['PRUNED']} pruned, {c['FAIL']} failed, {c['to go']} to go"
            + (f", {c['not retrained']} not retrained" if c["not retrained"] else "")
        )

    def trial_started(self, number: int, config: TrialConfig) -> None:
        self.console.print(Text(f"trial {number:>3} started  {describe(config.shown())}"))

    def trial_report(self, number: int, record: dict[str, Any]) -> None:
        value = accuracy(record)
        acc = f" acc {value:.3f}" if value is not None else ""
        self.console.print(
            f"trial {number:>3} step {record['step']:>5} val_loss {record['val_loss']:.4f}{acc}"
        )

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.console.print(Text(finished_line(trial)))


class LiveView(QuietView):
    """A live panel (counts, running trials, best so far); finished trials scroll above it."""

    def __init__(self, console: Console | None = None):
        super().__init__(console or Console())
        self._live = Live(console=self.console, refresh_per_second=4, transient=True)
        self._study: optuna.Study | None = None
        self._budget = 0
        self._running: dict[int, dict[str, Any]] = {}  # trial number -> its progress

    def message(self, text: str) -> None:
        self._live.console.print(Text(text))

    def study_started(self, study: optuna.Study, budget: int) -> None:
        self._study, self._budget = study, budget
        self._live.start()
        self._refresh()

    def trial_started(self, number: int, config: TrialConfig) -> None:
        self._running[number] = {
            "config": config.shown(),
            "step": 0,
            "val_loss": None,
            "since": time.time(),
        }
        self._refresh()

    def trial_report(self, number: int, record: dict[str, Any]) -> None:
        if number in self._running:
            self._running[number].update(step=record["step"], val_loss=record["val_loss"])
        self._refresh()

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        style = {TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow"}.get(trial.state, "red")
        self._live.console.print(Text(finished_line(trial), style=style))
        self._running.pop(trial.number, None)
        self._refresh()

    def close(self) -> None:
        self._live.stop()

    def _refresh(self) -> None:
        if self._study is None:
            return
        c = _counts(self._study, self._budget)
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[green]{c['COMPLETE']} complete",
            f"[yellow]{c['PRUNED']} pruned",
            f"[red]{c['FAIL']} failed",
            f"{c['to go']} to go",
            f"{c['not retrained']} not retrained" if c["not retrained"] else "",
        )
        lines: list[Any] = [head]
        for number, r in sorted(self._running.items()):
            loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
            lines.append(
                Text(
                    f"running trial {number}: {describe(r['config'])}  "
                    f"step {r['step']}  val_loss {loss}  "
                    f"{time.time() - r['since']:.0f}s"
                )
            )
        best = best_of(self._study.get_trials(deepcopy=False))
        if best is not None:
            lines.append(
                Text(
                    f"best so far: trial {best.number} val_loss {best.value:.4f}  "
                    f"{describe(shown_config(best))}",
                    style="bold",
                )
            )
        self._live.update(Group(*lines))


def make_view(quiet: bool, console: Console | None = None) -> QuietView:
    console = console or Console()
    if quiet:
        return QuietView()
    return LiveView(console) if console.is_terminal else PlainView()


# The commands' own output: what `run` says before the view starts, and the tables of
# `report`, `estimate` and `status`.

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


def study_lines(checked: Any, mlflow_uri: str | None, study_arg: str) -> list[str]:
    """Where a study runs and logs, said once before it starts (a `validate.CheckedStudy`)."""
    from ranksearch.config.paths import redact_url

    parallel = checked.slots.parallel
    trials = f"{parallel} trial{'s' if parallel > 1 else ''} at a time"
    lines = [
        f"study {checked.cfg.study_name}: {checked.out} (storage "
        f"{redact_url(checked.storage_url)}, device {checked.device}, {trials})"
    ]
    if mlflow_uri:
        browse = f"browse: ranksearch ui --study {study_arg}"
        lines.append(f"MLflow: {redact_url(mlflow_uri)} ({browse})")
    return lines


def print_report(
    console: Console, report: dict[str, Any], in_mlflow: bool, page: Path | None = None
) -> None:
    """`ranksearch report` as tables: the trials, by rank, the answer, where the plots and the
    page `report.html` went."""
    from ranksearch.answer.report import rank_table, rows_table, summary_lines

    console.print(rows_table(report))
    console.print(rank_table(report))
    for line in summary_lines(report):
        console.print(Text(line))
    where = " and on the study's MLflow parent run" if in_mlflow else ""
    if report.get("plots"):
        folder = Path(report["plots"][0]).parent
        console.print(Text(f"Plots:       {len(report['plots'])} files in {folder}{where}"))
    if page is not None:
        console.print(Text(f"Report:      {page}{where}"))


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
    table = Table(title="by worker host", title_justify="left")
    for col in ("host", "complete", "pruned", "failed", "running"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for host, n in status["hosts"].items():
        table.add_row(host, str(n["complete"]), str(n["pruned"]), str(n["fail"]), str(n["running"]))
    console.print(table)
    for r in status["running"]:
        console.print(
            Text(
                f"running: trial {r['trial']} on {r['host']} (pid {r['pid']}), "
                f"step {r['last_step']}, started {r['started']}"
            )
        )
