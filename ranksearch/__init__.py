"""ranksearch: a measured LoRA configuration search (Optuna + PEFT + accelerate, tracked in MLflow).

The packages follow the data, in the order a study flows through them:

    config    the study file: schema, paths, search space, one load that lists every problem
    data      read, label-map, split and tokenize once; SFT examples; GGUF sources; estimates
    search    the ask -> launch -> report -> tell loop: samplers, pruners, slots, workers, storage
    worker    one fine-tune as a plain accelerate script; imports nothing of ranksearch outside it
    tracking  MLflow: one parent run per study, one nested run per trial; the MLflow UI
    answer    best and recommended, confirmation, report data, plots, HTML report, export, model
    cli       the `ranksearch` commands: wiring, exit codes and what the terminal shows
"""
