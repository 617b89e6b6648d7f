"""`ranksearch export`: a trial's PEFT adapter as a directory `PeftModel.from_pretrained` loads.

The worker saves the adapter of every trial that trains to the end. When it is missing (a pruned
trial, a deleted folder), the trial's own spec is trained again: same data, same seed, same
configuration, so on CPU the same weights come back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from ranksearch.answer.nested import at_rank, is_nested, ranks_of
from ranksearch.answer.recommend import accuracy, answer
from ranksearch.config.load import parse_study
from ranksearch.config.paths import model_reference, trial_dir
from ranksearch.config.space import shown_config
from ranksearch.search.launch import WorkerProcess, accelerate_argv
from ranksearch.worker import TrialSpec
from ranksearch.worker.nested import save_rank

if TYPE_CHECKING:
    from ranksearch.worker import TrialSpec


class ExportError(Exception):
    """The trial cannot be exported; says which and why."""


def pick_trial(study: optuna.Study, which: str, tolerance: str | float) -> FrozenTrial:
    """`best`, `recommended` or a trial number; a replayed duplicate resolves to its original."""

    trials = study.get_trials(deepcopy=False)
    if which in ("best", "recommended"):
        ans = answer(trials, tolerance)
        trial = ans.best if which == "best" else ans.recommended
        if trial is None:
            raise ExportError(f"no trial completed in study {study.study_name!r}: no {which}")
    else:
        number, _, rank = which.partition("@r")  # `3@r8`: rank 8 of nested trial 3
        if not number.isdigit() or int(number) >= len(trials) or (rank and not rank.isdigit()):
            raise ExportError(
                f"--trial {which}: expected best, recommended, a trial number "
                f"0..{len(trials) - 1}, or N@rR for rank R of nested trial N"
            )
        trial = trials[int(number)]
        if rank:
            if not is_nested(trial) or int(rank) not in ranks_of(trial):
                ranks = ranks_of(trial) if is_nested(trial) else "none: not a nested trial"
                raise ExportError(f"--trial {which}: trial {number}'s nested ranks are {ranks}")
            trial = at_rank(trial, int(rank))
    origin = trial.user_attrs.get("duplicate_of")
    return trials[origin] if origin is not None else trial


def retrain(spec_path: Path, adapter_dir: Path, log: Path) -> dict[str, Any]:
    """Train the trial's spec again into `adapter_dir`; return its last report."""

    spec = TrialSpec.read(spec_path)  # absolute: the copy below lives elsewhere
    with tempfile.TemporaryDirectory(prefix="ranksearch-export-") as tmp:
        spec_copy = Path(tmp) / "spec.json"
        replace(
            spec,
            adapter_dir=str(adapter_dir),
            reports=str(Path(tmp) / "reports.jsonl"),
            orchestrator_pid=None,  # run by hand: no orchestrator to outlive
        ).write(spec_copy)
        plan = accelerate_argv(spec_copy, num_processes=1, device="cpu", mixed_precision="no")
        worker = WorkerProcess(plan, log, Path(tmp) / "reports.jsonl").start()
        while worker.poll() is None:
            time.sleep(0.2)
        reports = [r for r in worker.read_reports() if "val_loss" in r]
        if worker.poll() != 0 or not reports:
            raise ExportError(f"retraining failed; see {log}:\n{worker.log_tail()}")
        return reports[-1]


def label_maps(spec: TrialSpec) -> dict[str, dict | None]:
    """`id2label` / `label2id` of a classifier, from the prepared data's meta.json (the names of
    `data.labels`); None for a causal LM."""
    meta = Path(spec.data.path) / "meta.json"
    if spec.task != "sequence-classification" or not meta.is_file():
        return {"id2label": None, "label2id": None}
    names = json.loads(meta.read_text())["label_names"]
    return {
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def export(
    study: optuna.Study,
    trial: FrozenTrial,
    out: Path,
    study_file: Path,
    overrides: list[str],
    study_dir: Path,
) -> dict[str, Any]:
    """Write the adapter, its LoraConfig and the run settings into `out`; return the manifest.

    The trial's folder is found from `study_dir`, where the study is now (it may have moved)."""
    folder = trial_dir(study_dir, trial)
    spec_path = folder / "spec.json"
    if not spec_path.is_file():
        raise ExportError(
            f"trial {trial.number} has no spec at {spec_path}; was it trained in this study "
            "directory? (pass the study's --out)"
        )

    try:
        spec = TrialSpec.read(spec_path)
    except ValueError as e:  # another version's spec: said before anything is written
        raise ExportError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    source = folder / "adapter"
    retrained = None
    rank = trial.user_attrs.get("nested_rank")  # one rank of a nested trial: its leading slices
    lora = spec.lora
    with tempfile.TemporaryDirectory(prefix="ranksearch-export-") as tmp:
        if not (source / "adapter_config.json").is_file():
            source = Path(tmp) / "adapter" if rank is not None else out
            retrained = retrain(spec_path, source, out / "retrain.log")
        if rank is not None:
            alpha = trial.user_attrs["config"]["lora_alpha"]
            save_rank(source, out, rank, alpha)
            lora = {**spec.lora, "r": rank, "lora_alpha": alpha}
        elif source != out:
            shutil.copytree(source, out, dirs_exist_ok=True)

    cfg = parse_study(study_file, overrides)[0]
    (out / "lora_config.json").write_text(json.dumps(lora, indent=2) + "\n")
    shutil.copy(study_file, out / "study.yaml")
    command = ["ranksearch", "run", "--study", "study.yaml"]
    for assignment in overrides:
        command += ["--set", assignment]
    manifest = {
        "study": study.study_name,
        "trial": trial.number,
        "nested_rank": rank,  # None: the trial's adapter as trained
        "state": trial.state.name,
        "val_loss": trial.value,
        "accuracy": accuracy(trial.user_attrs),
        "config": shown_config(trial),
        "base_model": spec.model.path,
        # as the study names it: a package:// path or hub id resolves where it is loaded
        "base_model_reference": model_reference(cfg.model.path),
        "trust_remote_code": cfg.model.trust_remote_code,
        "max_length": cfg.data.max_length,
        "data_format": spec.data.format,
        # PEFT's adapter_config.json takes no label names (it warns on unknown keys): the README
        # shows from_pretrained(base_model, id2label=..., label2id=...) with these
        **label_maps(spec),
        "task": spec.task,
        "training": spec.training,
        "command": " ".join(command),
        "retrained": retrained is not None,
        "retrained_val_loss": retrained["val_loss"] if retrained else None,
    }
    (out / "ranksearch.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
