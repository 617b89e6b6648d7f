"""What the answer's MLflow model says about itself: the trial it came from (its run is the
model's source run), that trial's parameters and results, and why it was recommended."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from ranksearch.answer.marks import trial_label
from ranksearch.answer.recommend import Answer
from ranksearch.config.space import shown_config
from ranksearch.tracking.store import retry

_log = logging.getLogger(__name__)
# the trial's results the model shows, as the trial's run logs them: its final evaluation
EVALUATED = ("val_loss", "accuracy", "answer_accuracy", "f1", "perplexity")
# ... and its size, logged once at the trial's end
SIZE = ("trainable_params", "trainable_fraction")
DESCRIPTION = "mlflow.note.content"  # the tag MLflow's UI shows as a description


@dataclass(frozen=True)
class ModelCard:
    source_run_id: str  # the trial's run; the parent's where this store lacks it
    params: dict[str, str]
    metrics: list[tuple[str, float, int]]  # key, value, step (as on the trial's run)
    tags: dict[str, str]


def model_card(client, parent_id: str, trial: FrozenTrial, ans: Answer | None) -> ModelCard:
    """The card of `trial` as the answer's model: its run's parameters (the configuration and
    the fixed training settings, as the tracker logged them), its final evaluation, its size,
    and the tolerance rule that admitted it."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    run = _run(client, run_id) if run_id else None
    params = dict(run.data.params) if run else {k: str(v) for k, v in shown_config(trial).items()}
    a, step = trial.user_attrs, int(trial.user_attrs.get("last_step", 0))
    metrics = [(k, float(a[k]), step) for k in EVALUATED if a.get(k) is not None]
    if trial.value is not None and "val_loss" not in a:
        metrics.append(("val_loss", float(trial.value), step))
    metrics += [(k, float(a[k]), 0) for k in SIZE if a.get(k) is not None]
    if ans is not None and ans.tolerance is not None:
        params["answer.tolerance_rule"] = ans.tolerance_rule
        params["answer.tolerance"] = f"{ans.tolerance:.6g}"
    if ans is not None and ans.best is not None:
        params["answer.best_trial"] = str(ans.best.number)
    source = run.info.run_id if run else parent_id
    tags = {
        "ranksearch.trial": str(trial.number),
        "ranksearch.trial_run": source if run else "",
        DESCRIPTION: _description(trial, ans, source if run else None),
    }
    return ModelCard(source, params, metrics, tags)


def _run(client, run_id: str):
    """The trial's run, or None where it is in another node's store."""
    from mlflow.exceptions import MlflowException

    try:
        return retry(client.get_run, run_id)
    except MlflowException as e:
        _log.warning("the trial's MLflow run %s is not in this store: %s", run_id, e)
        return None


def _description(trial: FrozenTrial, ans: Answer | None, run_id: str | None) -> str:
    what = f"The recommended LoRA configuration: trial {trial_label(trial)}"
    if trial.value is not None:
        what += f", val loss {trial.value:.4f}"
    if ans is not None and ans.best is not None and ans.best.number == trial.number:
        what += "; the best trial itself"
    elif ans is not None and ans.tolerance is not None and ans.best is not None:
        what += (
            f"; within {ans.tolerance:.4g} ({ans.tolerance_rule}) of the best, "
            f"trial {ans.best.number}"
        )
    where = f" Trained by MLflow run {run_id}." if run_id else ""
    return what + "." + where
