"""The study's search space -> Optuna distributions -> a trial's resolved `TrialConfig`.

A dimension is searched when it is a list of two or more choices or a range; a single value is
fixed and never reaches Optuna. Target-module sets reach Optuna as their string keys (`qv`), so
the sampler sees a plain categorical and the table stays readable.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ranksearch.config.problems import Problem
from ranksearch.config.schema import Range, SearchConfig, StudyConfig

if TYPE_CHECKING:
    from collections.abc import Sequence

    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial


# study-file key -> Optuna parameter name, in display order
PARAM_NAMES = {
    "rank": "rank",
    "alpha": "lora_alpha",
    "alpha_ratio": "alpha_ratio",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "learning_rate": "learning_rate",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "init_lora_weights": "init_lora_weights",
}
INT_KEYS = {"rank"}


@dataclass(frozen=True)
class TrialConfig:
    """A trial's resolved configuration: what its worker trains.

    Optuna keeps it as the trial's user attribute `config` (`as_attr`, JSON); every reader gets it
    back with `TrialConfig.of`, so the keys live here alone. The stored keys and their order are
    those of the fields: studies on disk depend on them, so a field is never renamed."""

    rank: int
    lora_alpha: int | float
    lora_dropout: float
    target_modules: str  # the set's name, as Optuna and the tables show it
    modules: str | tuple[str, ...]  # what PEFT adapts: `all-linear` or module names
    learning_rate: float
    use_rslora: bool
    use_dora: bool
    init_lora_weights: bool | str

    def __post_init__(self) -> None:
        if isinstance(self.modules, list):  # from JSON: a tuple keeps the object immutable
            object.__setattr__(self, "modules", tuple(self.modules))

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialConfig | None:
        """The trial's configuration; None for one that never got one (enqueued, waiting, or
        failed before it was suggested), which readers show as blank."""
        attr = trial.user_attrs.get("config")
        return cls(**attr) if attr else None

    def as_attr(self) -> dict[str, Any]:
        """The JSON-able dict stored as the user attribute `config` (module names as a list)."""
        attr = asdict(self)
        if isinstance(self.modules, tuple):
            attr["modules"] = list(self.modules)
        return attr

    def shown(self) -> dict[str, Any]:
        """The configuration as reports, MLflow and manifests show it: the set's name stands for
        its modules."""
        return {k: v for k, v in self.as_attr().items() if k != "modules"}


def shown_config(trial: FrozenTrial) -> dict[str, Any]:
    """`TrialConfig.of(trial).shown()`, or {} for a trial without a configuration."""
    config = TrialConfig.of(trial)
    return config.shown() if config else {}


def dimensions(search: SearchConfig) -> dict[str, Any]:
    """Study-file key -> dimension, with defaults filled in (alpha_ratio [1, 2] if no alpha)."""
    dims = search.model_dump(exclude_none=True, exclude={"rank_mode", "nested_sampling"})
    dims = {k: getattr(search, k) for k in dims}
    if search.rank_mode == "nested":  # one LoRA at the largest rank reports every rank
        dims["rank"] = max(_values(search.rank))
    if search.alpha is None and search.alpha_ratio is None:
        dims["alpha_ratio"] = [1, 2]
    if isinstance(search.target_modules, dict):
        dims["target_modules"] = list(search.target_modules)
    else:
        dims["target_modules"] = module_set_name(search.target_modules)
    return dims


def module_set_name(modules: str | list[str]) -> str:
    return modules if isinstance(modules, str) else "+".join(modules)


def module_sets(search: SearchConfig) -> dict[str, str | list[str]]:
    tm = search.target_modules
    return dict(tm) if isinstance(tm, dict) else {module_set_name(tm): tm}


def is_searched(dim: Any) -> bool:
    if isinstance(dim, Range):
        return dim.low < dim.high
    return isinstance(dim, list) and len(dim) > 1


def _fixed_value(dim: Any) -> Any:
    if isinstance(dim, Range):
        return dim.low
    return dim[0] if isinstance(dim, list) else dim


def suggest(trial: optuna.Trial, search: SearchConfig) -> TrialConfig:
    """Ask the trial for every searched dimension; return the full resolved configuration."""
    values: dict[str, Any] = {}
    for key, dim in dimensions(search).items():
        name = PARAM_NAMES[key]
        if not is_searched(dim):
            values[key] = _fixed_value(dim)
        elif isinstance(dim, Range) and key in INT_KEYS:
            step = int(dim.step or 1)
            values[key] = trial.suggest_int(
                name, int(dim.low), int(dim.high), step=step, log=dim.log
            )
        elif isinstance(dim, Range):
            values[key] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            values[key] = trial.suggest_categorical(name, dim)
    return resolve(search, values)


def distributions(search: SearchConfig) -> dict[str, BaseDistribution]:
    """Optuna parameter name -> the distribution `suggest` asks it with (searched dims only)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    dists: dict[str, BaseDistribution] = {}
    for key, dim in dimensions(search).items():
        if not is_searched(dim):
            continue
        if isinstance(dim, Range) and key in INT_KEYS:
            step = int(dim.step or 1)
            dists[PARAM_NAMES[key]] = IntDistribution(int(dim.low), int(dim.high), dim.log, step)
        elif isinstance(dim, Range):
            dists[PARAM_NAMES[key]] = FloatDistribution(dim.low, dim.high, dim.log, dim.step)
        else:
            dists[PARAM_NAMES[key]] = CategoricalDistribution(dim)
    return dists


def changed_dimensions(trials: Sequence[FrozenTrial], search: SearchConfig) -> list[Problem]:
    """(key, message) for each dimension the study's trials searched otherwise than `search`.

    A study keeps the space it started with: Optuna refuses other choices for a parameter, and
    the trials' results would not compare. A trial another process is sampling holds only the
    parameters suggested so far, so a parameter counts as fixed only when a trial that has
    reported or finished lacks it."""
    from optuna.trial import TrialState

    then: dict[str, BaseDistribution] = {}
    for t in trials:
        then.update(t.distributions)
    if not then:  # no trial asked yet: nothing to keep
        return []
    sampled_in_full = any(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t.intermediate_values for t in trials
    )
    now = distributions(search)
    problems = []
    for key, name in PARAM_NAMES.items():
        if name not in then and not sampled_in_full:  # not suggested yet, as far as one can tell
            continue
        if now.get(name) != then.get(name):
            problems.append(
                Problem(
                    f"search.{key}",
                    f"the study's trials used {_shown(then.get(name))}, this file asks for "
                    f"{_shown(now.get(name))}; a study keeps its search space: restore it, or "
                    "start a new study under a new name (--set study_name=NEW) or, with the "
                    "default storage, in a new --out",
                )
            )
    return problems


def _shown(dist: BaseDistribution | None) -> str:
    if dist is None:
        return "a fixed value"
    if hasattr(dist, "choices"):
        return str(list(dist.choices))
    log = ", log" if dist.log else ""
    return f"[{dist.low:g} .. {dist.high:g}{log}]"


def resolve(search: SearchConfig, values: dict[str, Any]) -> TrialConfig:
    """Study-file values -> the concrete configuration a worker trains (lora_alpha computed)."""
    rank = int(values["rank"])
    if "alpha_ratio" in values:
        alpha = float(values["alpha_ratio"]) * rank
    else:
        alpha = float(values["alpha"])
    set_name = values["target_modules"]
    return TrialConfig(
        rank=rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=float(values["dropout"]),
        target_modules=set_name,
        modules=module_sets(search)[set_name],
        learning_rate=float(values["learning_rate"]),
        use_rslora=bool(values["use_rslora"]),
        use_dora=bool(values["use_dora"]),
        init_lora_weights=values["init_lora_weights"],
    )


def nested_ranks(search: SearchConfig) -> list[int] | None:
    """The ranks a nested trial reports (`search.rank_mode: nested`), ascending; None: plain."""
    if search.rank_mode != "nested":
        return None
    return sorted({int(r) for r in _values(search.rank)})


def at_rank(config: TrialConfig, rank: int, search: SearchConfig) -> TrialConfig:
    """The plain LoRA of `rank` that a nested trial's configuration holds: lora_alpha scales
    with the rank under `alpha_ratio` (alpha_b = ratio x b) and stays under `alpha`."""
    alpha = config.lora_alpha
    if search.alpha is None:  # alpha_ratio (given or the default): the ratio is kept
        alpha = config.lora_alpha / config.rank * rank
        alpha = int(alpha) if float(alpha).is_integer() else alpha
    return replace(config, rank=rank, lora_alpha=alpha)


def nested_spec(search: SearchConfig, config: TrialConfig) -> dict[str, Any] | None:
    """The worker's `TrialSpec.nested` for a trial of this configuration; None: plain."""
    ranks = nested_ranks(search)
    if ranks is None:
        return None
    return {
        "ranks": ranks,
        "alphas": [at_rank(config, r, search).lora_alpha for r in ranks],
        "sampling": search.nested_sampling,
    }


def config_key(config: TrialConfig) -> str:
    """A canonical string of what is trained; equal keys mean the same fine-tune. Stored as the
    trial's `config_key` and keyed on by benchmark tables: its format never changes."""
    keep = config.shown()
    keep["learning_rate"] = float(f"{keep['learning_rate']:.6g}")
    keep["lora_dropout"] = float(f"{keep['lora_dropout']:.6g}")
    return json.dumps(keep, sort_keys=True)


def grid(search: SearchConfig) -> dict[str, list[Any]]:
    """Optuna parameter name -> choices, for GridSampler (every searched dim must be a list)."""
    return {PARAM_NAMES[k]: list(d) for k, d in dimensions(search).items() if is_searched(d)}


def enqueue_params(search: SearchConfig, entry: dict[str, Any]) -> dict[str, Any]:
    """A study file's `enqueue:` entry -> Optuna params. `alpha` converts to a ratio if needed."""
    dims = dimensions(search)
    entry = dict(entry)
    if "alpha" in entry and "alpha_ratio" in dims and "alpha" not in dims:
        rank = entry.get("rank", _fixed_value(dims["rank"]))
        entry["alpha_ratio"] = entry.pop("alpha") / rank
    return {PARAM_NAMES[k]: v for k, v in entry.items() if k in dims and is_searched(dims[k])}


def lora_kwargs(config: TrialConfig, task: str) -> dict[str, Any]:
    """The `peft.LoraConfig` keyword arguments for a resolved configuration (JSON-able: they go
    into the worker's spec)."""
    modules = config.modules
    return {
        "task_type": "SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": modules if isinstance(modules, str) else list(modules),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": config.init_lora_weights,
    }


def _values(dim: Any) -> list[Any]:
    if isinstance(dim, Range):
        return [dim.low, dim.high]
    return list(dim) if isinstance(dim, list) else [dim]


def _number_problems(key: str, dim: Any, ok, fix: str) -> list[Problem]:
    bad = [v for v in _values(dim) if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        return [Problem(f"search.{key}", f"expected numbers, got {bad!r}")]
    bad = [v for v in _values(dim) if not ok(v)]
    return [Problem(f"search.{key}", f"{bad!r} out of range: {fix}")] if bad else []


def space_problems(cfg: StudyConfig) -> list[Problem]:
    """Value ranges of the search space, sampler compatibility and `enqueue` entries."""
    s = cfg.search
    dims = dimensions(s)
    problems: list[Problem] = []
    problems += _number_problems(
        "rank", s.rank, lambda v: v > 0 and float(v).is_integer(), "ranks are integers >= 1"
    )
    problems += _number_problems(
        "dropout", s.dropout, lambda v: 0 <= v < 1, "dropout must be in [0, 1)"
    )
    problems += _number_problems(
        "learning_rate", s.learning_rate, lambda v: 0 < v < 1, "use e.g. 1.0e-4 .. 3.0e-3"
    )
    for key in ("alpha", "alpha_ratio"):
        if getattr(s, key) is not None:
            problems += _number_problems(key, getattr(s, key), lambda v: v > 0, "must be > 0")
    for key in ("use_rslora", "use_dora"):
        if any(not isinstance(v, bool) for v in _values(getattr(s, key))):
            problems.append(Problem(f"search.{key}", "expected true/false or a list of them"))
    if s.rank_mode == "nested":
        problems += _nested_problems(s)
    if isinstance(s.target_modules, dict) and not s.target_modules:
        problems.append(
            Problem("search.target_modules", "name at least one set, e.g. {qv: [query, value]}")
        )
    if cfg.sampler.type in ("grid", "bruteforce"):
        for key, dim in dims.items():
            if isinstance(dim, Range) and is_searched(dim):
                mid = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
                problems.append(
                    Problem(
                        f"search.{key}",
                        f"`sampler: {cfg.sampler.type}` needs a list of choices, not a range; "
                        f"e.g. [{dim.low:g}, {mid:g}, {dim.high:g}]",
                    )
                )
    if cfg.sampler.type == "grid" and cfg.enqueue:
        problems.append(
            Problem("enqueue", "`sampler: grid` runs every combination already; remove it")
        )
    for i, entry in enumerate(cfg.enqueue):
        problems += _enqueue_problems(f"enqueue.{i}", s, dims, entry)
    return problems


def _nested_problems(s: SearchConfig) -> list[Problem]:
    """What a nested-rank study cannot train: its ranks are a list, and each leading rank of
    one LoRA is a plain LoRA only with PEFT's default initialization and without DoRA."""
    problems = []
    if not isinstance(s.rank, list) or len(s.rank) < 2:
        problems.append(
            Problem(
                "search.rank",
                "`rank_mode: nested` reports the ranks of a list: give two or more, e.g. "
                "[4, 8, 16, 32] (or set rank_mode: plain)",
            )
        )
    if any(v is not False for v in _values(s.use_dora)):
        problems.append(
            Problem(
                "search.use_dora",
                "DoRA's magnitude belongs to the full-rank update, so a leading rank is no "
                "DoRA adapter: set use_dora: false, or rank_mode: plain",
            )
        )
    if any(v is not True for v in _values(s.init_lora_weights)):
        problems.append(
            Problem(
                "search.init_lora_weights",
                "a nested trial's leading ranks are plain LoRAs of that rank only with PEFT's "
                "default initialization: set init_lora_weights: true, or rank_mode: plain",
            )
        )
    return problems


def _enqueue_problems(where: str, s: SearchConfig, dims: dict, entry: dict) -> list[Problem]:
    allowed = set(dims) | ({"alpha"} if "alpha_ratio" in dims else set())
    problems = [
        Problem(f"{where}.{k}", f"not a search key; use one of {sorted(allowed)}")
        for k in entry
        if k not in allowed
    ]
    if problems:
        return problems
    for name, value in enqueue_params(s, entry).items():
        key = next(k for k, v in PARAM_NAMES.items() if v == name)
        dim = dims[key]
        if isinstance(dim, list) and value not in dim:
            problems.append(Problem(f"{where}.{key}", f"{value!r} is not one of the choices {dim}"))
        if isinstance(dim, Range) and not dim.low <= value <= dim.high:
            outside = f"{value!r} is outside [{dim.low}, {dim.high}]"
            problems.append(Problem(f"{where}.{key}", outside))
    return problems
