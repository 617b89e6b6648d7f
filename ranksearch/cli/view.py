"""The view of a running study: a live Rich view on a terminal, plain lines otherwise.

Each view takes the same calls from the orchestrator; `QuietView` is the null object (warnings
only), so the loop never branches on how it is watched. What the commands print before and
after is in output.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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

    # the compute line (search/budget.compute_line); the orchestrator sets it
    compute: Callable[[list[FrozenTrial]], str] | None = None

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
        if self.compute is not None:
            self.console.print(Text(self.compute(study.get_trials(deepcopy=False))))


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
        if self.compute is not None:
            lines.append(Text(self.compute(self._study.get_trials(deepcopy=False))))
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
