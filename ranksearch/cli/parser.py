"""The `ranksearch` command line: every command, its options with their defaults, and examples."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ranksearch.config.paths import path_option

if TYPE_CHECKING:
    pass


MAIN_EXAMPLES = """examples:
  ranksearch run --study cls-task                       # the offline default study
  ranksearch run --study my.yaml --set budget.n_trials=40
  ranksearch validate --study cls-task                  # check a study, run nothing
  ranksearch report --study cls-task                    # best, recommended, by rank
  ranksearch estimate --study cls-task                  # parameters and memory per config
  ranksearch ui --study cls-task                        # its runs in the MLflow UI
  ranksearch list                                       # the study files shipped
"""
RUN_EXAMPLES = """examples:
  ranksearch run --study cls-task
  ranksearch run --study path/to/my.yaml --set budget.n_trials=40 --set training.max_steps=600
  ranksearch run --study cls-task --out /data/runs/cls --storage postgresql://u:pw@db/optuna
  ranksearch run --study cls-task --tracking-uri http://127.0.0.1:5000
Run it again to resume: finished trials are kept, only the missing ones run."""
VALIDATE_EXAMPLES = """examples:
  ranksearch validate --study cls-task
  ranksearch validate --study my.yaml --set search.rank=[4,8] --schema-only"""
REPORT_EXAMPLES = """examples:
  ranksearch report --study cls-task
  ranksearch report --study cls-task --sort val_loss
  ranksearch report --study cls-task --format json > answer.json"""
ESTIMATE_EXAMPLES = """examples:
  ranksearch estimate --study cls-task
  ranksearch estimate --study cls-task --rank 4 64 --targets qv all-linear --format json"""
STATUS_EXAMPLES = """examples:
  ranksearch status --study cls-task
  ranksearch status --study cls-task --storage postgresql://u:pw@db/optuna --format json"""
CONFIRM_EXAMPLES = """examples:
  ranksearch confirm --study cls-task                 # top 3 + the recommendation, 3 seeds each
  ranksearch confirm --study cls-task --top 5 --seeds 5
Confirmation trainings are Optuna trials (user attr `confirmation`) and MLflow runs of the study;
they do not count toward budget.n_trials, and an interrupted round resumes where it stopped."""
EXPORT_EXAMPLES = """examples:
  ranksearch export --study cls-task --to adapters/cls            # the recommended trial
  ranksearch export --study cls-task --trial best --to adapters/best
  ranksearch export --study cls-task --trial 7 --to adapters/t7   # retrained if not kept
--out names the study directory, as in every command that reads a study."""
UI_EXAMPLES = """examples:
  ranksearch ui --study cls-task                 # http://127.0.0.1:5000, this study's experiment
  ranksearch ui --study cls-task --port 5001 --no-browser
  ranksearch ui --study cls-task --host 0.0.0.0  # reachable from other machines: explicit only"""


def _study_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study")
    g.add_argument(
        "--study",
        required=True,
        help="a study NAME (search_spaces/NAME.yaml) or a path to a YAML file",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a study key, e.g. --set training.max_steps=600 (repeatable)",
    )
    g.add_argument(
        "--out", type=path_option, default=None, help="study directory (default: runs/<study_name>)"
    )
    g.add_argument(
        "--storage",
        default=os.environ.get("RANKSEARCH_STORAGE") or None,
        help="Optuna storage URL (default: $RANKSEARCH_STORAGE, else sqlite:///<out>/optuna.db)",
    )
    g.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: study file `tracking.uri`, then "
        "MLFLOW_TRACKING_URI, then sqlite:///<out>/mlflow.db)",
    )


def _sub(sub, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranksearch",
        description="Measured LoRA configuration search (Optuna + PEFT).",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = _sub(sub, "run", "run (or resume) a study", RUN_EXAMPLES)
    _study_args(run)
    out = run.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    out.add_argument(
        "--plain",
        action="store_true",
        help="line output even on a terminal (default: live view on a terminal)",
    )
    out.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log to MLflow (same as `tracking: none`; default: log)",
    )
    val = _sub(sub, "validate", "check a study file; run nothing", VALIDATE_EXAMPLES)
    _study_args(val)
    val.add_argument(
        "--schema-only",
        action="store_true",
        help="check keys and values only; do not load the model or data",
    )
    ui = _sub(sub, "ui", "open the MLflow UI on this study's runs", UI_EXAMPLES)
    _study_args(ui)
    ui.add_argument(
        "--host",
        default=None,
        help="address to bind (default: 127.0.0.1; another address only if given)",
    )
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--no-browser", action="store_true", help="only print the URL")
    rep = _sub(
        sub, "report", "the trials, the best and the recommended configuration", REPORT_EXAMPLES
    )
    _study_args(rep)
    rep.add_argument(
        "--format",
        choices=("table", "json", "markdown"),
        default="table",
        help="output format (default: table; json is stable, see README)",
    )
    rep.add_argument(
        "--no-plots",
        action="store_true",
        help="skip the PNG/HTML plots (default: write them to <out>/plots and to MLflow)",
    )
    rep.add_argument(
        "--sort",
        choices=("number", "val_loss", "rank", "trainable", "seconds"),
        default="number",
        help="order of the trial table (default: number)",
    )
    est = _sub(
        sub, "estimate", "parameter counts and memory of every configuration", ESTIMATE_EXAMPLES
    )
    _study_args(est)
    est.add_argument("--rank", type=int, nargs="+", help="ranks (default: the study's)")
    est.add_argument("--targets", nargs="+", help="module sets (default: the study's)")
    est.add_argument(
        "--measure",
        action="store_true",
        help="also run one real training step of the largest configuration and measure its "
        "peak memory (CUDA peak on GPU, RSS delta on CPU; default: off)",
    )
    est.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )
    con = _sub(
        sub, "confirm", "train the top configurations again with more seeds", CONFIRM_EXAMPLES
    )
    _study_args(con)
    con.add_argument(
        "--top",
        type=int,
        default=None,
        help="configurations to confirm (default: study file confirm.top, else 3)",
    )
    con.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="samples per configuration, the search trial included "
        "(default: confirm.seeds, else 3)",
    )
    for flag, text in (
        ("--quiet", "warnings only"),
        ("--plain", "line output"),
        ("--no-mlflow", "do not log to MLflow"),
    ):
        con.add_argument(flag, action="store_true", help=f"{text} (default: off)")
    sta = _sub(
        sub, "status", "a study's progress: trials by state and by worker host", STATUS_EXAMPLES
    )
    _study_args(sta)
    sta.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )
    exp = _sub(sub, "export", "write a trial's PEFT adapter to a directory", EXPORT_EXAMPLES)
    _study_args(exp)
    exp.add_argument(
        "--trial",
        default="recommended",
        help="best, recommended or a trial number (default: recommended)",
    )
    exp.add_argument(
        "--to",
        type=path_option,
        required=True,
        metavar="DIR",
        help="destination directory (PeftModel.from_pretrained(base, DIR))",
    )
    sub.add_parser("list", help="list the study files shipped with ranksearch")
    return parser
