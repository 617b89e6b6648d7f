"""The study's answer as an MLflow model: the recommended trial's adapter, loaded with one call.

    model = mlflow.pyfunc.load_model(uri)   # uri: the parent run's tag `ranksearch.model_uri`
    model.predict(pd.DataFrame({"text": ["what a great film"]}))  # a classifier: label, score

The model holds the folder `ranksearch export` writes (the adapter, `lora_config.json`,
`study.yaml`, `ranksearch.json` with the label names). The base model is not copied: it is loaded
from the reference the study gave (`package://...`, a hub id, a local directory), resolved where
the model is loaded, so ranksearch must be installed there. A classifier predicts `label` (the
names of `data.labels`) and `score` (its probability); a causal LM predicts `completion`, greedy,
`max_new_tokens` tokens (a predict param, default 16), from prompts given as `text` (a user turn
of the chat template for a study in the `messages` format).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd

if TYPE_CHECKING:
    from ranksearch.answer.modelcard import ModelCard

NAME = "recommended"  # the logged model's name under the parent run
BATCH = 32


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A trial's PEFT adapter on its base model, as MLflow's pyfunc flavor calls it."""

    def load_context(self, context) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from ranksearch.data.prepare import model_location, tokenizer_at

        folder = context.artifacts["adapter"]
        self.manifest = m = json.loads((Path(folder) / "ranksearch.json").read_text())
        location = model_location(m["base_model_reference"])
        trust = m["trust_remote_code"]
        self.tokenizer = tokenizer_at(location, trust)
        if m["task"] == "sequence-classification":
            base = _classifier_base(location, m, folder)
            base.config.pad_token_id = self.tokenizer.pad_token_id
        else:
            base = AutoModelForCausalLM.from_pretrained(location, trust_remote_code=trust)
            self.tokenizer.padding_side = "left"  # generation continues each prompt's last token
        self.model = PeftModel.from_pretrained(base, folder).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        column = model_input["text"] if isinstance(model_input, pd.DataFrame) else model_input
        texts = [str(x) for x in column]
        if self.manifest["task"] == "sequence-classification":
            return pd.DataFrame(self._classify(texts), columns=["label", "score"])
        steps = int((params or {}).get("max_new_tokens", 16))
        return pd.DataFrame({"completion": self._complete(texts, steps)})

    def _classify(self, texts: list[str]) -> list[tuple[str, float]]:
        import torch

        rows = []
        for start in range(0, len(texts), BATCH):
            batch = self.tokenizer(
                texts[start : start + BATCH],
                truncation=True,
                max_length=self.manifest["max_length"],
                padding=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                probs = self.model(**batch).logits.float().softmax(-1)
            score, index = probs.max(-1)
            labels = self.model.config.id2label
            rows += [(labels[int(i)], float(s)) for s, i in zip(score, index, strict=True)]
        return rows

    def _complete(self, texts: list[str], max_new_tokens: int) -> list[str]:
        import torch

        if self.manifest["data_format"] == "messages":
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        out = []
        for start in range(0, len(texts), BATCH):
            batch = self.tokenizer(texts[start : start + BATCH], padding=True, return_tensors="pt")
            with torch.no_grad():
                ids = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = ids[:, batch["input_ids"].shape[1] :]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out


def _classifier_base(location: str, manifest: dict, folder: str):
    """The base model with a classification head. A base without one (a sentence encoder)
    gets a new head, which transformers reports as MISSING ("Consider training"); but the
    trained head is in the adapter (PEFT's `modules_to_save`) and replaces it. So the report is
    held back when the adapter holds every missing weight, and passed on as it was otherwise."""
    from transformers import AutoModelForSequenceClassification

    held = _Held()
    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addFilter(held)
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            location,
            id2label={int(i): name for i, name in manifest["id2label"].items()},
            label2id=manifest["label2id"],
            trust_remote_code=manifest["trust_remote_code"],
            output_loading_info=True,
        )
    finally:
        reporter.removeFilter(held)
    covered = set(info["missing_keys"]) <= _adapter_weights(folder)
    if not covered or info["unexpected_keys"] or info["mismatched_keys"]:
        for record in held.records:
            reporter.handle(record)
    return base


class _Held(logging.Filter):
    """Keeps a logger's records instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _adapter_weights(folder: str) -> set[str]:
    """The base model's weights the adapter replaces with its own (the `modules_to_save`),
    named as in the base model."""
    from safetensors import safe_open

    prefix = "base_model.model."
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle: names without reading the tensors
    return {k.removeprefix(prefix) for k in names if "lora_" not in k}


def signature(task: str):
    """Text in; a label and its probability, or a completion, out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "text")])
    if task == "sequence-classification":
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
        return ModelSignature(inputs, outputs)
    params = ParamSchema([ParamSpec("max_new_tokens", "long", 16)])
    return ModelSignature(inputs, Schema([ColSpec("string", "completion")]), params)


def log_adapter_model(client, parent_id: str, folder: Path, card: ModelCard, register: str | None):
    """Log the exported adapter `folder` as the model `recommended`, in the parent run's
    experiment (its artifacts where the experiment keeps them), through the global tracking URI,
    which the caller set to `client`'s: its source run the trial's (`card`), an output of both
    that run and the parent; registered as `register` when given."""
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model

    # imported here, not where the model loads: what loading needs stays small
    from ranksearch.answer.modelenv import pack_wheel, requirements

    manifest = json.loads((folder / "ranksearch.json").read_text())
    labels = manifest.get("id2label") or {}
    # created here: MLflow would put a model logged outside an active run in the Default
    # experiment, with its artifacts under ./mlruns of whatever directory the command ran in
    model = client.create_logged_model(
        client.get_run(parent_id).info.experiment_id,
        name=NAME,
        source_run_id=card.source_run_id,
        params=card.params,
        tags={**card.tags, "study": manifest["study"]},
    )
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step, model_id=model.model_id) for k, v, step in card.metrics]
    client.log_batch(card.source_run_id, metrics=metrics)
    for run_id in dict.fromkeys((card.source_run_id, parent_id)):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory(prefix="ranksearch-wheel-") as tmp:
        wheel = pack_wheel(Path(tmp))
        with warnings.catch_warnings():
            # an input example would make MLflow load the base model while logging; the
            # explicit signature says what it would
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            return Model.log(
                artifact_path=None,
                name=NAME,
                flavor=mlflow.pyfunc,
                python_model=__file__,  # models from code: this file, no pickled object
                artifacts={"adapter": str(folder), "ranksearch": str(wheel)},
                signature=signature(manifest["task"]),
                pip_requirements=requirements(manifest["base_model_reference"], wheel),
                metadata={
                    "ranksearch.trial": manifest["trial"],
                    "base_model": manifest["base_model_reference"],
                    "labels": [labels[k] for k in sorted(labels, key=int)],
                },
                registered_model_name=register,
                model_id=model.model_id,  # linked to its runs above, with the card's metrics
            )


# what MLflow finds when it loads this file as the model's code
mlflow.models.set_model(AdapterModel())
