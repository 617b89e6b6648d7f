"""`ranksearch` commands: wiring, exit codes and human output; the logic lives elsewhere.

Exit codes: 0 done; 1 the study stopped early (failures); 2 bad input (nothing was launched or
written); 130/143 interrupted by SIGINT/SIGTERM (the running trial was stopped and recorded).
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from ranksearch.cli.parser import build_parser
from ranksearch.config.load import load_study, parse_study
from ranksearch.config.paths import BUILTIN_STUDIES, PathError, study_dir
from ranksearch.config.problems import StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.data.prepare import DataError
from ranksearch.search.storage import StorageError
from ranksearch.tracking.store import TrackingError, rebase_artifacts, tracking_uri
from ranksearch.tracking.tracker import make_tracker

if TYPE_CHECKING:
    import optuna


EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1


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

    from ranksearch.answer.publish import publish_answer
    from ranksearch.cli.output import data_line, study_lines, ui_command
    from ranksearch.cli.view import PlainView, make_view
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
    tracker = make_tracker(
        cfg, out, args.tracking_uri, args.no_mlflow, args.overrides, publish=publish_answer
    )
    for line in [] if args.quiet else study_lines(checked, tracker.uri, ui_command(args)):
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


def _check_ranks(cfg: StudyConfig, orchestrator, view, console: Console, quiet: bool) -> int:
    """A nested study's recommended rank trained as a plain LoRA (confirm.rank_check)."""
    from ranksearch.answer.confirm import rank_check

    code = 0
    while code == 0:
        job = rank_check(orchestrator.study.get_trials(deepcopy=False), cfg.report.tolerance)
        if job is None:
            break
        if not quiet:
            a = job["attrs"]
            console.print(
                Text(
                    f"nested answer: rank {a['rank_check_rank']} of trial {a['rank_check_of']} "
                    f"(estimated val_loss {a['nested_estimate']:.4f}); training it once as a "
                    "plain LoRA of that rank"
                )
            )
        code = _drive(lambda job=job: orchestrator.confirm([job]), view, console)
    return code


def cmd_run(args, console: Console) -> int:
    from ranksearch.answer.recommend import rank_view
    from ranksearch.answer.text import best_summary
    from ranksearch.cli.output import rank_table, trials_table
    from ranksearch.search.budget import compute_line

    cfg, orchestrator, view = _orchestrator(args, console)
    code = _drive(orchestrator.run, view, console)
    if code == 0 and cfg.search.rank_mode == "nested":
        code = _check_ranks(cfg, orchestrator, view, console, args.quiet)
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
        console.print(trials_table(orchestrator.study, f"study {cfg.study_name}", console.width))
        if cfg.search.rank_mode == "nested":  # the rank curve is what nested trials are for
            ranks = rank_view(orchestrator.study.get_trials(deepcopy=False))
            console.print(rank_table({"ranks": ranks}))
        for line in best_summary(orchestrator.study, cfg.report.tolerance):
            console.print(Text(line))
        console.print(Text(compute_line(orchestrator.study.get_trials(deepcopy=False), cfg)))
    return code


def cmd_confirm(args, console: Console) -> int:
    from ranksearch.answer.report import build_report
    from ranksearch.answer.text import summary_lines

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


def open_existing(args) -> tuple[StudyConfig, Path, optuna.Study]:
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
    return cfg, path, study


def cmd_report(args, console: Console) -> int:
    import json

    from ranksearch.answer.publish import write_report
    from ranksearch.answer.report import build_report
    from ranksearch.answer.text import to_markdown
    from ranksearch.cli.output import print_report

    cfg, _, study = open_existing(args)
    report = build_report(study, cfg.report.tolerance, args.sort)
    out = study_dir(cfg.study_name, args.out)
    page, in_mlflow = write_report(
        cfg, study, report, out, plots=not args.no_plots, uri_option=args.tracking_uri
    )
    if args.format == "json":
        print(json.dumps(report, indent=2, default=str))
    elif args.format == "markdown":
        print(to_markdown(report), end="")
    else:
        earlier = out / "report.html"
        print_report(console, report, in_mlflow, page, earlier if earlier.is_file() else None)
    return 0


def cmd_estimate(args, console: Console) -> int:
    import json

    from ranksearch.cli.output import print_estimate
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
    from ranksearch.cli.output import print_status
    from ranksearch.search.budget import compute_line
    from ranksearch.search.sampling import search_budget

    cfg, _, study = open_existing(args)
    status = study_status(study, search_budget(cfg), cfg.report.tolerance)
    status["compute"] = compute_line(study.get_trials(deepcopy=False), cfg)
    if args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        print_status(console, status)
    return 0


def cmd_export(args, console: Console) -> int:
    from ranksearch.answer.export import ExportError, export, pick_trial

    cfg, path, study = open_existing(args)
    try:
        trial = pick_trial(study, args.trial, cfg.report.tolerance)
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
