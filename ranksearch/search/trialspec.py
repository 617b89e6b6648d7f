"""A trial's spec.json: everything its worker needs, built from the study and the trial."""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from ranksearch.config.schema import StudyConfig
from ranksearch.config.space import TrialConfig, lora_kwargs
from ranksearch.data.prepare import PreparedData, model_location
from ranksearch.worker.spec import DataSpec, ModelSpec, TrialSpec


def trial_spec(
    cfg: StudyConfig, data: PreparedData, trial: optuna.Trial, config: TrialConfig, trial_dir: Path
) -> TrialSpec:
    """The worker's input. Its paths are relative to `trial_dir` (the worker resolves them
    against the spec's folder), so a copied or moved study directory still runs."""
    return TrialSpec(
        study=cfg.study_name,
        trial=trial.number,
        task=cfg.task,
        model=ModelSpec(
            path=model_location(cfg.model.path),
            quantization=cfg.model.quantization,
            trust_remote_code=cfg.model.trust_remote_code,
        ),
        data=DataSpec(
            path=os.path.relpath(data.path.absolute(), trial_dir.absolute()),
            num_labels=data.num_labels,
            pad_token_id=data.pad_token_id,
            format=data.format,
        ),
        lora=lora_kwargs(config, cfg.task),
        training={
            **cfg.training.model_dump(),
            "learning_rate": config.learning_rate,
            "seed": trial.user_attrs.get("seed", cfg.training.seed),  # confirmation seeds
        },
        reports="reports.jsonl",
        orchestrator_pid=os.getpid(),  # the worker exits if this process is gone
        adapter_dir="adapter",
        nested=trial.user_attrs.get("nested"),  # a nested trial's ranks (loop._start sets it)
    )
