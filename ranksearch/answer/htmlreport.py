"""`report.html`: a study's whole answer in one self-contained page.

The recommendation and the best trial, the confirmation round, the trial and rank tables and every
plot, readable offline and from an MLflow artifact: plotly.js is embedded once in the page's head,
each interactive plot is a div drawn with it, the PNG plots are data URIs; nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranksearch.answer.text import (
    COLUMNS,
    RANK_COLUMNS,
    cell,
    format_row,
    rank_cells,
    summary_lines,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.answer { background: #f4f8ff; border-left: 4px solid #2a6ad8; padding: 0.6em 1em; }
.answer p { margin: 0.2em 0; font-family: ui-monospace, monospace; white-space: pre-wrap; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.best td { background: #fff4d6; } tr.recommended td { background: #e2f5e4; }
tr.best.recommended td { background: #e6f0d0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
"""
TEXT_COLUMNS = {"state", "modules", "note"}


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """An HTML table; each row is (css class, cells)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for css, cells in rows:
        tds = "".join(
            f'<td class="text">{html.escape(c)}</td>'
            if h in TEXT_COLUMNS
            else f"<td>{html.escape(c)}</td>"
            for h, c in zip(header, cells, strict=True)
        )
        body.append(f'<tr class="{css}">{tds}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _trials(report: dict[str, Any]) -> str:
    roles = {}
    for role in ("best", "recommended"):
        if report[role] is not None:
            roles.setdefault(report[role]["trial"], []).append(role)
    rows = [(" ".join(roles.get(r["number"], [])), format_row(r)) for r in report["trials"]]
    return _table(list(COLUMNS), rows)


def _ranks(report: dict[str, Any]) -> str:
    return _table(list(RANK_COLUMNS), [("", rank_cells(r)) for r in report["ranks"]])


def _confirmation(report: dict[str, Any]) -> str:
    c = report.get("confirmation")
    if not c or c["recommended"] is None:
        return ""
    header = ["trial", "trainable", "seeds", "mean val loss", "std", "p(worse than best)", "kept"]
    rows = [
        (
            "recommended" if r["trial"] == c["recommended"] else "",
            [
                str(r["trial"]),
                cell(r["trainable_params"], ","),
                str(r["n"]),
                cell(r["mean_val_loss"], ".4f"),
                cell(r["std_val_loss"], ".4f"),
                cell(r["p_worse_than_best"], ".3f"),
                "yes" if r["not_worse"] else "no",
            ],
        )
        for r in c["candidates"]
    ]
    return (
        '<h2 id="confirmation">Confirmation round</h2>'
        f"<p>Welch's one-sided t-test against trial {c['best_mean_trial']} (the best mean), "
        f"alpha {c['alpha']}: the confirmed recommendation is trial {c['recommended']}.</p>"
        + _table(header, rows)
    )


def _plots(figures: dict[str, go.Figure], pngs: list[Path]) -> str:
    parts = []
    for path in [p for p in pngs if p.stem not in figures]:  # drawn interactive below
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.stem)}</figcaption></figure>"
        )
    for name, fig in figures.items():
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{name}")
        parts.append(f"<figure>{div}</figure>")
    return '<h2 id="plots">Plots</h2>' + "".join(parts) if parts else ""


def render(report: dict[str, Any], figures: dict[str, go.Figure], pngs: list[Path]) -> str:
    """The page, as one string; plotly.js once in the head when there is a plot to draw."""
    from plotly.offline import get_plotlyjs

    counts = report["counts"]
    title = f"Study {report['study']}"
    script = f"<script>{get_plotlyjs()}</script>" if figures else ""
    answer = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(report))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>{script}</head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>objective {html.escape(report['objective'])}; {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed trials</p>"
        f'<h2 id="answer">Answer</h2><div class="answer">{answer}</div>'
        + _confirmation(report)
        + '<h2 id="trials">Trials</h2>'
        + _trials(report)
        + '<h2 id="ranks">By rank</h2>'
        + _ranks(report)
        + _plots(figures, pngs)
        + "</body></html>\n"
    )


def write_html(
    report: dict[str, Any], figures: dict[str, go.Figure], pngs: list[Path], path: Path
) -> Path:
    """Write the page as a new file, renamed into place: the old one may be a hard link to its
    copy in the MLflow store (publish.py), which must not change until it is logged again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(report, figures, pngs), encoding="utf-8")
    os.replace(tmp, path)
    return path
