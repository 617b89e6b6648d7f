"""A `--quick` run of every benchmark script, so they never rot (the figures come from full runs
by hand, recorded in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import make_rows, write_study

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str, cwd: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--quick"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _sst2_like(folder: Path) -> Path:
    """A small dataset in SST-2's layout (train.tsv, dev.tsv: text<TAB>label, 0/1)."""
    folder.mkdir()
    for name, seed in (("train.tsv", 0), ("dev.tsv", 1)):
        rows = make_rows(400 if name == "train.tsv" else 128, seed)
        kept = [(t, int(lab == "pos")) for lab, t in rows if lab != "neutral"]
        lines = ["text\tlabel"] + [f"{t}\t{y}" for t, y in kept]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_search_cost_quick(tmp_path, tiny_bert):
    out = tmp_path / "sc"
    data = _sst2_like(tmp_path / "sst2")
    _run("search_cost.py", "all", "--data", str(data), "--out", str(out), "--model", str(tiny_bert),
         cwd=tmp_path)  # fmt: skip
    table = json.loads((out / "table.json").read_text())
    assert len(table["configs"]) == 2 and len(table["best_seeds"]["val_loss"]) == 3
    compare = json.loads((out / "compare.json").read_text())
    assert "ranksearch TPE + Hyperband | equal trials" in compare
    assert json.loads((out / "trainer.json").read_text())["pick"] in table["configs"]
    anytime = compare["TPE, no pruning | equal trials"]["anytime"]
    assert len(anytime) == 2 and all(curve for curve in anytime)  # one curve per sampler seed
    assert (out / "search_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trial_cost_quick(tmp_path, tiny_bert, sentiment_csv):
    study = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    _run("trial_cost.py", "--out", str(tmp_path), "--study", str(study), cwd=tmp_path)
    result = json.loads((tmp_path / "trial_cost.json").read_text())
    speeds = result["train_samples_per_s"]
    assert result["trial"]["train_s"] > 0 and result["eval"]["examples"] > 0
    assert all(speeds[k] > 0 for k in ("ranksearch", "ranksearch_group_by_length", "trainer",
                                       "trainer_group_by_length"))  # fmt: skip


def test_parallel_trials_quick(tmp_path, tiny_bert, sentiment_csv):
    study = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    _run("parallel_trials.py", "--out", str(tmp_path), "--study", str(study), cwd=tmp_path)
    assert json.loads((tmp_path / "parallel.json").read_text())["speedup_trials"] > 0


def test_orchestration_quick(tmp_path, pg_url):
    _run("orchestration.py", "--storage", pg_url, "--out", str(tmp_path), cwd=tmp_path)
    result = json.loads((tmp_path / "orchestration.json").read_text())
    assert result["trials"] == 12  # exactly the budget, across 2 processes
