"""What a study's parent run records of it: its settings as params, its data as dataset inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ranksearch.config.paths import local_path
from ranksearch.search.sampling import min_steps


def study_params(cfg, study_file: Path) -> dict[str, object]:
    """The study's settings as the parent run's params (the search space as one JSON value)."""
    return {
        "study_file": study_file.name,
        "task": cfg.task,
        "model": cfg.model.path,
        "search_space": json.dumps(cfg.search.model_dump(mode="json"), sort_keys=True),
        "budget.n_trials": cfg.budget.n_trials,
        "sampler": cfg.sampler.type,
        "sampler.seed": cfg.sampler.seed,
        "pruner": cfg.pruner.type,
        "pruner.min_steps": min_steps(cfg),  # the first rung, derived when not set
        "pruner.reduction_factor": cfg.pruner.reduction_factor,
        "training.max_steps": cfg.training.max_steps,
        "training.eval_every": cfg.training.eval_every,
        "launch.num_processes": cfg.launch.num_processes,
        "launch.gpus_per_trial": cfg.launch.gpus_per_trial,
        "launch.parallel_trials": cfg.launch.parallel_trials or "auto",
    }


def dataset_inputs(cfg, data) -> list:
    """The prepared train and validation splits as MLflow dataset inputs of the parent run."""
    import mlflow.data  # mlflow and datasets: only when a study starts
    from datasets import load_from_disk
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split in ("train", "validation"):
        ds = load_from_disk(str(data.path / split))
        with warnings.catch_warnings():
            # its schema hint about integer columns (token ids, labels), printed when the
            # entity infers the schema, is for model signatures: nothing a user can act on
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            dataset = mlflow.data.from_huggingface(
                ds, name=f"{cfg.study_name}-{split}", **_dataset_source(cfg, split)
            )
            entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", split)]
        inputs.append(DatasetInput(entity, tags))
    return inputs


def _dataset_source(cfg, split: str) -> dict[str, Any]:
    """Where a split came from, for MLflow: a local file (a `package://` path resolved) as its
    file:// URI, a hub dataset by its id. The validation split is `data.validation` when that is
    a file, else it came from `data.source`."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    path = local_path(cfg.data.source)
    if split == "validation" and cfg.data.validation:  # a file, or a hub dataset's split
        path = local_path(cfg.data.validation) or path
    if path is None:
        return {"path": cfg.data.source}  # a hub dataset: MLflow links to it
    with warnings.catch_warnings():  # MLflow registers its local-file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return {"source": resolve_dataset_source(path.resolve().as_uri())}
