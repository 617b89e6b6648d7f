"""`ranksearch` commands: wiring, exit codes and human output; the logic lives elsewhere.

Exit codes: 0 done; 1 the study stopped early (failures); 2 bad input (nothing was launched or
written); 130/143 interrupted by SIGINT/SIGTERM (the running trial was stopped and recorded).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from ranksearch.config.load import load_study, parse_study
from ranksearch.config.paths import BUILTIN_STUDIES, PathError, path_option, study_dir
from ranksearch.config.problems import StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.data.prepare import DataError
from ranksearch.search.storage import StorageError
from ranksearch.tracking.tracker import TrackingError, make_tracker, rebase_artifacts, tracking_uri

if TYPE_CHECKING:
    import optuna

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1

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


def quiet_libraries() -> None:
    """Library chatter (load reports, progress bars, deprecations) stays out of the view."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notes
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import datasets
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ranksearch records heartbeats itself for its ask/tell loop (see study.py)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")


def _checked(args, schema_only: bool = False):
    """The study as `validate.check_study` passes it, from the common options."""
    from ranksearch.cli.validate import check_study

    return check_study(
        args.study,
        args.overrides,
        out=args.out,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        mlflow=not getattr(args, "no_mlflow", False),
        schema_only=schema_only,
    )


def _rung_warning(cfg: StudyConfig, args, storage_url: str) -> str | None:
    """`sampling.rung_warning` on the study's own trials, when the study exists already."""
    import optuna

    from ranksearch.search.sampling import rung_warning
    from ranksearch.search.storage import open_storage

    if not args.storage and not (study_dir(cfg.study_name, args.out) / "optuna.db").is_file():
        return None
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(storage_url))
    except KeyError:  # a storage without this study
        return None
    return rung_warning(cfg, study.get_trials(deepcopy=False))


def cmd_validate(args, console: Console) -> int:
    checked = _checked(args, args.schema_only)
    warnings = list(checked.warnings)
    if not args.schema_only and (rung := _rung_warning(checked.cfg, args, checked.storage_url)):
        warnings.append(rung)
    for line in warnings:
        console.print(Text("warning: ", style="yellow") + Text(line))
    what = "schema" if args.schema_only else "schema, model modules, data, tracking"
    console.print(f"[green]ok[/green]: study {checked.cfg.study_name} ({what}) is valid")
    return 0


def _orchestrator(args, console: Console):
    """What `run` and `confirm` share: checked study, prepared data, tracker, view."""
    import torch

    from ranksearch.cli.view import PlainView, data_line, make_view, study_lines
    from ranksearch.data.empty import data_warnings
    from ranksearch.data.prepare import prepare
    from ranksearch.search.loop import Orchestrator
    from ranksearch.search.sampling import rung_warning

    checked = _checked(args)
    cfg, out, device, slots = checked.cfg, checked.out, checked.device, checked.slots
    storage_url, study_file = checked.storage_url, checked.path
    try:  # judged writable above; creating it is the proof (root may "write" to /proc)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = ("--out", f"{out}: cannot create it ({e.strerror}); give a writable directory")
        raise StudyError([problem], str(study_file)) from None
    view = PlainView(console) if args.plain else make_view(args.quiet, console)
    tracker = make_tracker(cfg, out, args.tracking_uri, args.no_mlflow, args.overrides)
    for line in [] if args.quiet else study_lines(checked, tracker.uri, args.study):
        console.print(Text(line))
    data = prepare(cfg, out)
    if not args.quiet:
        console.print(Text(data_line(data.counts)))
    for line in data_warnings(cfg, data.counts):  # more than half empty was refused above
        view.message(f"warning: {line}")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    orchestrator = Orchestrator(
        cfg, out, storage_url, data, view, device, bf16, tracker, study_file, slots, checked.gpus
    )
    rung = rung_warning(cfg, orchestrator.study.get_trials(deepcopy=False))
    if rung:  # a resumed study whose own curves say its first rung prunes too early
        view.message(f"warning: {rung}")
    return cfg, orchestrator, view


def _drive(work, view, console: Console) -> int:
    """Run `work()`; map a stop or an interrupt to its exit code and message."""
    from ranksearch.search.loop import Interrupted, StudyStopped

    try:
        work()
    except StudyStopped as e:
        view.close()
        console.print(Text("study stopped: ", style="red") + Text(str(e)))
        return EXIT_STOPPED
    except Interrupted as e:
        view.close()
        console.print(
            Text(
                f"interrupted ({e}): the running trial was stopped and recorded; "
                "run the same command to resume"
            )
        )
        return 128 + signal.Signals[str(e)].value  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        view.close()
    return 0


def _confirmation_jobs(cfg: StudyConfig, study, top: int, seeds: int) -> list:
    from ranksearch.answer.confirm import plan

    return plan(
        study.get_trials(deepcopy=False), top, seeds, cfg.training.seed, cfg.report.tolerance
    )


def cmd_run(args, console: Console) -> int:
    from ranksearch.answer.report import best_summary, trials_table

    cfg, orchestrator, view = _orchestrator(args, console)
    code = _drive(orchestrator.run, view, console)
    if code == 0 and cfg.confirm is not None:
        jobs = _confirmation_jobs(cfg, orchestrator.study, cfg.confirm.top, cfg.confirm.seeds)
        if jobs and not args.quiet:
            console.print(
                Text(
                    f"confirmation round: {len(jobs)} more trainings "
                    f"(top {cfg.confirm.top}, {cfg.confirm.seeds} seeds each)"
                )
            )
        code = _drive(lambda: orchestrator.confirm(jobs), view, console) if jobs else 0
    if not args.quiet:
        console.print(trials_table(orchestrator.study, title=f"study {cfg.study_name}"))
        for line in best_summary(orchestrator.study, cfg.report.tolerance):
            console.print(Text(line))
    return code


def cmd_confirm(args, console: Console) -> int:
    from ranksearch.answer.report import build_report, summary_lines

    cfg, orchestrator, view = _orchestrator(args, console)
    top = args.top or (cfg.confirm.top if cfg.confirm else 3)
    seeds = args.seeds or (cfg.confirm.seeds if cfg.confirm else 3)
    jobs = _confirmation_jobs(cfg, orchestrator.study, top, seeds)
    if not args.quiet:
        console.print(
            Text(f"confirmation round: {len(jobs)} trainings to go (top {top}, {seeds} seeds each)")
        )
    code = _drive(lambda: orchestrator.confirm(jobs), view, console)
    report = build_report(orchestrator.study, cfg.report.tolerance)
    for line in summary_lines(report):
        console.print(Text(line))
    return code


def cmd_ui(args, console: Console) -> int:
    from ranksearch.tracking.ui import serve_ui

    cfg, _, _ = parse_study(args.study, args.overrides)
    out = study_dir(cfg.study_name, args.out)
    uri = tracking_uri(cfg, out, args.tracking_uri)
    rebase_artifacts(uri, out)  # a copied or moved study serves its own artifacts
    return serve_ui(
        uri,
        cfg.tracking.experiment or cfg.study_name,
        args.host,
        args.port,
        not args.no_browser,
        console,
    )


def open_existing(args) -> tuple[StudyConfig, optuna.Study]:
    """The study `run` wrote, found from the same --study/--out/--storage options."""
    from ranksearch.search.storage import open_existing as open_study

    cfg, path, _ = parse_study(args.study, args.overrides)
    study = open_study(
        cfg.study_name,
        study_dir(cfg.study_name, args.out),
        args.storage,
        source=str(path),
        run_first=f"ranksearch run --study {args.study}",
    )
    return cfg, study


def cmd_report(args, console: Console) -> int:
    import json

    from ranksearch.answer.report import build_report, to_markdown
    from ranksearch.cli.view import print_report

    cfg, study = open_existing(args)
    report = build_report(study, cfg.report.tolerance, args.sort)
    page, in_mlflow = write_plots(args, cfg, study, report)
    if args.format == "json":
        print(json.dumps(report, indent=2, default=str))
    elif args.format == "markdown":
        print(to_markdown(report), end="")
    else:
        print_report(console, report, in_mlflow, page)
    return 0


def write_plots(args, cfg: StudyConfig, study: optuna.Study, report: dict) -> tuple[Path, bool]:
    """Plots into <out>/plots (listed in `report`, unless --no-plots) and the page
    <out>/report.html, both onto the study's MLflow parent run when it has one; the page, and
    whether MLflow has them too."""
    from ranksearch.answer.figures import figures
    from ranksearch.answer.htmlreport import write_html
    from ranksearch.answer.plots import make_plots
    from ranksearch.tracking.tracker import log_report

    out, tolerance = study_dir(cfg.study_name, args.out), cfg.report.tolerance
    figs = {} if args.no_plots else figures(study, tolerance)
    if not args.no_plots:
        report["plots"] = [str(p) for p in make_plots(study, out / "plots", figs, tolerance)]
    pngs = [Path(p) for p in report.get("plots", []) if p.endswith(".png")]
    page = write_html(report, figs, pngs, out / "report.html")
    tracked = "mlflow_parent_run_id" in study.user_attrs  # by this node or another one
    if not (tracked and cfg.tracking.enabled):
        return page, False
    uri = tracking_uri(cfg, out, args.tracking_uri)
    experiment = cfg.tracking.experiment or cfg.study_name
    return page, log_report(uri, experiment, cfg.study_name, out)


def cmd_estimate(args, console: Console) -> int:
    import json

    from ranksearch.cli.view import print_estimate
    from ranksearch.data.estimate import estimate_space, measure

    cfg, _ = load_study(args.study, args.overrides)  # a space the rules refuse is not estimated
    rows = estimate_space(cfg, args.rank, args.targets)
    largest = max(rows, key=lambda r: r.memory_estimate_mb)
    measured = measure(cfg, largest) if args.measure else None
    if args.format == "json":
        configurations = [r.to_json() for r in rows]
        print(json.dumps({"configurations": configurations, "measured": measured}, indent=2))
        return 0
    title = f"{cfg.study_name}: batch {cfg.training.batch_size} x {cfg.data.max_length} tokens"
    print_estimate(console, title, rows, measured)
    return 0


def cmd_status(args, console: Console) -> int:
    import json

    from ranksearch.answer.report import study_status
    from ranksearch.cli.view import print_status
    from ranksearch.search.sampling import search_budget

    cfg, study = open_existing(args)
    status = study_status(study, search_budget(cfg), cfg.report.tolerance)
    if args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        print_status(console, status)
    return 0


def cmd_export(args, console: Console) -> int:
    from ranksearch.answer.export import ExportError, export, pick_trial

    cfg, study = open_existing(args)
    try:
        trial = pick_trial(study, args.trial, cfg.report.tolerance)
        _, path, _ = parse_study(args.study, args.overrides)
        manifest = export(
            study, trial, args.to, path, args.overrides, study_dir(cfg.study_name, args.out)
        )
    except ExportError as e:
        raise StudyError([("--trial", str(e))], args.study) from None
    how = "retrained from its spec" if manifest["retrained"] else "copied"
    console.print(
        Text(
            f"trial {trial.number} ({how}) -> {args.to}: "
            f"PeftModel.from_pretrained(base, {str(args.to)!r})"
        )
    )
    return 0


def cmd_list(args, console: Console) -> int:
    for path in sorted(BUILTIN_STUDIES.glob("*.yaml")):
        header = path.read_text().splitlines()[0].lstrip("# ")
        console.print(Text(f"{path.stem:<18} {header}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the trial table
        console = Console(highlight=False, width=max(console.width, 160))
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    commands = {
        "run": cmd_run,
        "validate": cmd_validate,
        "report": cmd_report,
        "estimate": cmd_estimate,
        "export": cmd_export,
        "confirm": cmd_confirm,
        "status": cmd_status,
        "ui": cmd_ui,
        "list": cmd_list,
    }
    try:
        quiet_libraries()
        return commands[args.command](args, console)
    except KeyboardInterrupt:  # before the study loop took over the signal
        err.print("interrupted")
        return 128 + signal.SIGINT.value
    except (StudyError, PathError, DataError, StorageError, TrackingError) as e:
        err.print(Text("error: ", style="red") + Text(str(e)))
        return EXIT_BAD_INPUT
