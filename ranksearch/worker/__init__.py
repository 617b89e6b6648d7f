"""One LoRA fine-tune, as a plain accelerate script: train, evaluate every `eval_every` steps,
report each evaluation.

ranksearch starts it for every trial, and it can be run by hand on a trial's spec:

    accelerate launch --num_processes 1 -m ranksearch.worker runs/cls-task/trials/3/spec.json
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m ranksearch.worker spec.json   # 2 CPU ranks

Reports go to the JSON-lines file named in the spec (`reports`), one line per evaluation, written
by the main process only; stdout and stderr are left to the libraries and end in the trial log.
The package imports neither Optuna nor MLflow (the orchestrator owns those) nor anything of
ranksearch outside itself. Its modules, in the order a trial uses them:

    spec      the spec.json contract and the report vocabulary (no torch: the orchestrator
              and export read it too)
    batches   padding, packing and length-grouped batches; the trial's data loaders
    model     the base model, loaded or kept warm, and LoRA stripped off it again
    train     the training loop, evaluation and reports: `training_function`
    serve     the warm worker (`--serve`)
    __main__  the command line

torch and the model libraries are imported by batches/model/train/serve only, so importing
`ranksearch.worker` (for `TrialSpec`) stays fast.

`--serve` makes it a warm worker (see `serve`): one process that trains trial after trial on a
base model it loads once, each trial as a cold start would train it.
"""

from ranksearch.worker.spec import (
    SPEC_VERSION,
    DataSpec,
    ModelSpec,
    NullReporter,
    Reporter,
    TrialSpec,
)

__all__ = ["SPEC_VERSION", "DataSpec", "ModelSpec", "NullReporter", "Reporter", "TrialSpec"]
