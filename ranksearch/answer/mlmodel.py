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
import warnings
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd

NAME = "recommended"  # the logged model's name under the parent run
BATCH = 32


class AdapterModel(mlflow.pyfunc.PythonModel):
    """A trial's PEFT adapter on its base model, as MLflow's pyfunc flavor calls it."""

    def load_context(self, context) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from ranksearch.data.prepare import model_location, tokenizer_at

        folder = context.artifacts["adapter"]
        self.manifest = m = json.loads((Path(folder) / "ranksearch.json").read_text())
        location = model_location(m["base_model_reference"])
        trust = m["trust_remote_code"]
        self.tokenizer = tokenizer_at(location, trust)
        if m["task"] == "sequence-classification":
            base = AutoModelForSequenceClassification.from_pretrained(
                location,
                id2label={int(i): name for i, name in m["id2label"].items()},
                label2id=m["label2id"],
                trust_remote_code=trust,
            )
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


def requirements() -> list[str]:
    """What loading needs, pinned to this environment (ranksearch itself: installed by hand)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "peft", "pandas")]


def log_adapter_model(client, run_id: str, folder: Path, register: str | None):
    """Log the exported adapter `folder` as the model `recommended` of run `run_id`, in that
    run's experiment (its artifacts where the experiment keeps them), through the global
    tracking URI, which the caller set to `client`'s; register it as `register` when given."""
    from mlflow.models import Model

    manifest = json.loads((folder / "ranksearch.json").read_text())
    labels = manifest.get("id2label") or {}
    # created here: MLflow would put a model logged outside an active run in the Default
    # experiment, with its artifacts under ./mlruns of whatever directory the command ran in
    model = client.create_logged_model(
        client.get_run(run_id).info.experiment_id,
        name=NAME,
        source_run_id=run_id,
        tags={"ranksearch.trial": str(manifest["trial"]), "study": manifest["study"]},
    )
    with warnings.catch_warnings():
        # an input example would make MLflow load the base model while logging; the explicit
        # signature says what it would
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        return Model.log(
            artifact_path=None,
            name=NAME,
            flavor=mlflow.pyfunc,
            python_model=__file__,  # models from code: this file, no pickled object
            artifacts={"adapter": str(folder)},
            signature=signature(manifest["task"]),
            pip_requirements=requirements(),
            metadata={
                "ranksearch.trial": manifest["trial"],
                "base_model": manifest["base_model_reference"],
                "labels": [labels[k] for k in sorted(labels, key=int)],
            },
            registered_model_name=register,
            run_id=run_id,
            model_id=model.model_id,
        )


# what MLflow finds when it loads this file as the model's code
mlflow.models.set_model(AdapterModel())
