"""`ranksearch report` on a small real study: what it adds to the study directory and to MLflow,
that `--no-plots` never replaces a fuller report, and docs/mlflow.md's plain-MLflow snippet on a
moved study."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from plotly.offline import get_plotlyjs

from ranksearch.cli.output import ui_command
from ranksearch.cli.parser import build_parser

from ..conftest import run_cli


def _size(folder: Path) -> int:
    """Bytes under `folder`, a hard-linked file counted once (as `du` does)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        st = path.stat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _holding(folder: Path, text: bytes) -> set[tuple[int, int]]:
    """The distinct files (by inode) under `folder` whose bytes contain `text`."""
    return {
        (p.stat().st_dev, p.stat().st_ino)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix == ".html" and text in p.read_bytes()
    }


def _parent_page(out: Path, tmp: Path) -> bytes:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finished")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'study'")
    return Path(client.download_artifacts(parent.info.run_id, "report.html", str(tmp))).read_bytes()


def test_report_stores_its_page_once_and_no_plots_keeps_the_full_one(finished_study, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_study, out)
    study = ["report", "--study", str(finished_study.parent / "finished.yaml"), "--out", str(out)]
    before = _size(out)
    r = run_cli(*study, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    after = _size(out)
    page = (out / "report.html").read_bytes()
    pngs = sum(p.stat().st_size for p in (out / "plots").iterdir())
    print(f"study directory: {before:,} bytes before report, {after:,} after "
          f"(report.html {len(page):,}, PNGs {pngs:,})")  # fmt: skip
    # plotly.js once in the whole study (the page), page and PNGs once though MLflow has them
    assert len(_holding(out, get_plotlyjs()[:2000].encode())) == 1
    assert {p.suffix for p in (out / "plots").iterdir()} == {".png"}
    assert after - before < len(page) + pngs + 500_000  # and MLflow's few rows
    r = run_cli(*study, cwd=tmp_path)  # again: replaced, not added
    assert r.returncode == 0 and _size(out) < after + 500_000
    page = (out / "report.html").read_bytes()
    r = run_cli(*study, "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left as the last full report wrote it (--no-plots)" in r.stdout
    assert (out / "report.html").read_bytes() == page  # on disk and on the parent run
    assert _parent_page(out, tmp_path / "downloaded") == page
    assert "Recommended: trial" in page.decode() and len(page) > 1_000_000


def test_the_readme_mlflow_snippet_loads_the_model_of_a_moved_study(finished_study, tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(finished_study, first)
    first.rename(moved)  # the place it ran is gone; no ranksearch command has seen it since
    client = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finished")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'study'")
    model_id = parent.data.tags["ranksearch.model_uri"].removeprefix("models:/")
    folder = f"{moved}/mlartifacts/models/{model_id}/artifacts"
    snippet = (  # docs/mlflow.md's, with this study's paths
        "import mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({folder!r})\n"
        "print(model.predict(pd.DataFrame({'text': ['what a lovely day', 'awful']})))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "label" in r.stdout and not first.exists()


def test_runs_browse_hint_is_the_command_that_opens_that_study():
    parser = build_parser()
    ran = parser.parse_args(shlex.split(
        "run --study 'my studies/x.yaml' --out '/data/runs/x 1' --set budget.n_trials=3 "
        "--storage sqlite:////data/o.db --tracking-uri http://127.0.0.1:5001"
    ))  # fmt: skip
    hint = ui_command(ran)
    assert hint.startswith("ranksearch ui ")
    ui = parser.parse_args(shlex.split(hint)[1:])
    for key in ("study", "out", "overrides", "storage", "tracking_uri"):
        assert getattr(ui, key) == getattr(ran, key), key
    plain = parser.parse_args(["run", "--study", "cls-task"])
    assert ui_command(plain) == "ranksearch ui --study cls-task"
