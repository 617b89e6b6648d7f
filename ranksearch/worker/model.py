"""The base model of a trial: loaded as the spec asks (head, 4-bit, checkpointing), or kept by
a warm worker between trials and given back without LoRA."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict
from typing import Any

import torch
from accelerate import Accelerator

from ranksearch.worker.spec import TrialSpec


def load_base(spec: TrialSpec, accelerator: Accelerator) -> torch.nn.Module:
    """The base model as the trial needs it (head, quantization, checkpointing), without LoRA."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_spec, train = spec.model, spec.training
    kwargs: dict[str, Any] = {"trust_remote_code": model_spec.trust_remote_code}
    if model_spec.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        # QLoRA: frozen base in 4-bit NF4 with double quantization, LoRA computed in bf16.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": accelerator.local_process_index}
    if spec.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_spec.path, num_labels=spec.data.num_labels, **kwargs
        )
        model.config.pad_token_id = spec.data.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_spec.path, **kwargs)
        model.config.use_cache = False  # training: no KV cache (packed rows need none)
    if model_spec.quantization == "4bit":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train["gradient_checkpointing"]
        )
    elif train["gradient_checkpointing"]:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return model


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": np.random.get_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class KeptBase:
    """The base model a warm worker keeps between trials, and the random state right after it
    was loaded.

    A trial on the same base (same model, head, checkpointing and seed) gets it back as a cold
    start would have it: the same weights (LoRA never changes them, and `strip_lora` puts back
    the very modules PEFT wrapped, a classification head's untrained original included) and
    the same random state, so the LoRA initialization, dropout and data order that follow are
    those of a cold start, bit for bit. Anything else loads the base again.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.model: torch.nn.Module | None = None
        self.rng: dict[str, Any] = {}

    def get(self, spec: TrialSpec, accelerator: Accelerator) -> torch.nn.Module:
        data, train = spec.data, spec.training
        key = json.dumps(
            [spec.task, asdict(spec.model), data.num_labels, data.pad_token_id,
             train["gradient_checkpointing"], train["seed"]],
            sort_keys=True,
        )  # fmt: skip
        if key == self.key:
            _set_rng_state(self.rng)
            return self.model
        self.key, self.model = None, None  # free the old base before loading the new one
        gc.unfreeze()
        gc.collect()
        self.model = load_base(spec, accelerator)
        self.key, self.rng = key, _rng_state()
        # What lives now (the imports, the base) lives on: out of the collector's sight, a
        # collection after each trial takes milliseconds instead of about half a second.
        gc.collect()
        gc.freeze()
        return self.model


def strip_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The base model of a PEFT model as it was before `get_peft_model`: every LoRA layer
    replaced by the layer it wraps, every `modules_to_save` copy by its untouched original."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model()
    done: list[str] = []
    for name, module in list(base.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue  # inside a wrapper already replaced
        if isinstance(module, BaseTunerLayer):
            original = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            original = module.original_module
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, original)
        done.append(name)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base
