"""The search file: its search section (the space, the pruner, the budget), loading it on the
sweep's model and base handling, and drawing a trial's settings from the space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator

from attack.cells import SweepModel, base_for, cell_config, read_sweep_file, safe_name
from attack.config import (
    Section,
    explain,
    merge,
    set_dotted,
    shipped,
)
from attack.config.kinds import DEFAULT_KIND, KINDS
from attack.errors import UserError, did_you_mean

Choice = str | int | float | bool | None


class Range(Section):
    low: float
    """Smallest value tried."""
    high: float
    """Largest value tried."""
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: float | None = None
    """Grid step (integers when low, high and step are integers)."""

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"a search range needs low < high, got {self.low:g} and {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale search range needs low > 0, got {self.low:g}")
        return self


PRUNERS = {  # Optuna's pruners by name, built on demand (Optuna warns at construction of its experimental ones)
    "none": lambda optuna, sec: optuna.pruners.NopPruner(),
    "median": lambda optuna, sec: optuna.pruners.MedianPruner(n_startup_trials=sec.startup_trials, n_warmup_steps=0),
    "successive_halving": lambda optuna, sec: optuna.pruners.SuccessiveHalvingPruner(),
    # the curve's points as paired instances against the best trial's
    "wilcoxon": lambda optuna, sec: optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=1),
}


class SearchSection(Section):
    space: Annotated[dict[str, Annotated[list[Choice], Field(min_length=1)] | Range], Field(min_length=1)]
    """Config keys (train.lr, train.optimizer, adapter.kind, kind, ...) -> a list of choices or {low, high, log}."""
    trials: Annotated[int, Field(gt=0)] = 20
    """Trials per model under test, in total over every worker."""
    selection_tasks: Annotated[list[str], Field(min_length=1)]
    """lm-eval tasks the objective reads (a dev split); they must share no question with eval.tasks."""
    utility_task: str | None = None
    """A task whose drop bounds the search: a point that loses more than max_utility_drop of it is infeasible."""
    max_utility_drop: Annotated[float, Field(ge=0)] = 0.10
    """The utility bound (absolute drop of the utility task's headline score)."""
    max_kl: Annotated[float, Field(gt=0)] | None = None
    """A bound on the KL divergence each point records on eval.kl_task's prompts (heretic's
    measure on harmless prompts): a point beyond it is infeasible, like one beyond the utility bound."""
    pruner: str = "median"
    """Optuna's pruner (none, median, successive_halving, wilcoxon): stops a trial at an evaluation point when it cannot beat the others."""
    startup_trials: Annotated[int, Field(ge=0)] = 2
    """Trials that run to the end before the pruner may stop any (median, wilcoxon)."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the sampler (TPE) and of every trial's attack."""
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    """No new trial starts after this many seconds of this worker."""
    token_budget: Annotated[int, Field(gt=0)] | None = None
    """No new trial starts once the study's trials have trained this many tokens in total (per model)."""

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, name: str) -> str:
        if name not in PRUNERS:
            raise ValueError(f"search.pruner must be one of {', '.join(PRUNERS)}, got {name!r}{did_you_mean(name, PRUNERS)}")
        return name

    @model_validator(mode="after")
    def _bound_needs_task(self):
        if "max_utility_drop" in self.model_fields_set and self.utility_task is None:
            raise ValueError("search.max_utility_drop bounds the drop of search.utility_task: name that task "
                             "(e.g. utility_task: mmlu), or drop max_utility_drop")
        return self


@dataclass(frozen=True)
class Search:
    name: str
    output: Path
    base: dict
    models: list[SweepModel]
    search: SearchSection
    trust_remote_code: bool = False

    def study_name(self, model: SweepModel) -> str:
        return f"{self.name}--{model.label}"

    def config(self, model: SweepModel, params: dict, number: int):
        """The config of trial `number` with `params` (dotted keys), and its cell id."""
        kind = params.get("kind", self.base.get("kind", DEFAULT_KIND))
        overrides: dict = {"kind": kind}  # a fresh mapping per trial: no trial's settings reach the base
        for key, value in params.items():
            if key != "kind":
                set_dotted(overrides, key, value)
        reported = merge(base_for(self.base, kind), overrides).get("eval", {}).get("tasks", [])
        tasks = list(dict.fromkeys([*reported, *self.search.selection_tasks,
                                    *([self.search.utility_task] if self.search.utility_task else [])]))
        return cell_config(self.base, merge(overrides, {"eval": {"tasks": tasks}}), model, None, self.search.seed,
                           self.output, f"{safe_name(model.label)}--trial{number:03d}",
                           f"search trial {model.label}/{number} ({describe_params(params)})", "the search file",
                           self.trust_remote_code)


def load_search(path: str | Path, trust_remote_code: bool = False) -> Search:
    path = shipped(path, "sweeps", "search.yaml")  # a path, or a shipped search's name (deep_ignorance_search, own_model)
    f = read_sweep_file(path, "search file", {"search": dict})  # the sweep's own reading of the shared keys
    if not isinstance(f.raw.get("search"), dict):
        raise UserError(f"{path} has no search section: add search: {{space: ..., selection_tasks: [...]}} "
                        "(a sweep of listed attacks runs with `python -m attack sweep`)")
    try:
        section = SearchSection.model_validate(f.raw["search"])
    except ValidationError as e:
        raise UserError(explain(e, SearchSection, prefix="search")) from None
    base, models = f.base, f.models
    reported = set((base.get("eval") or {}).get("tasks") or [])
    shared = reported & set(section.selection_tasks)
    if shared:
        raise UserError(f"search.selection_tasks and eval.tasks share {', '.join(sorted(shared))}: the tasks that "
                        "choose the adversary must not be the ones the verdict reports")
    if section.max_kl is not None and not (base.get("eval") or {}).get("kl_task"):
        raise UserError("search.max_kl bounds the KL recorded on eval.kl_task's prompts: set base eval.kl_task "
                        "(a task of harmless prompts), or drop max_kl")
    s = Search(f.name, Path(f.output), base, models, section, trust_remote_code)
    _check_space(s)
    return s


def _check_space(s: Search) -> None:
    """Every choice and both ends of every range make a valid config (one line naming the key if not)."""
    corners = []
    for key, values in s.search.space.items():
        for v in values if isinstance(values, list) else [range_value(values, values.low), range_value(values, values.high)]:
            corners.append({key: v})
    for params in corners:
        s.config(s.models[0], params, 0)


def range_value(r: Range, x: float):
    return int(x) if _integer(r) else float(x)


def _integer(r: Range) -> bool:
    return not r.log and all(float(v).is_integer() for v in (r.low, r.high)) and (r.step is None or float(r.step).is_integer())


def describe_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# sections that matter only to an attack that trains (an ablation without then_finetune does not)
TRAINING_SECTIONS = ("train", "data", "adapter")


def suggest(trial, s: Search, model: SweepModel) -> dict:
    """The trial's settings, drawn by the sampler from the space (or its own, when resumed). The
    kind first; then only the keys that kind reads, the training sections last and only for an
    attack that trains (train.lr does not change an ablation: drawing it would spend trials on
    settings that differ in name only). Optuna's samplers take such a conditional space as it
    comes (define-by-run)."""
    space = s.search.space
    params = {"kind": _draw(trial, "kind", space["kind"])} if "kind" in space else {}
    kind = params.get("kind", s.base.get("kind", DEFAULT_KIND))
    fields = KINDS[kind].model_fields if kind in KINDS else {}
    later = [k for k in space if k.split(".")[0] in TRAINING_SECTIONS and k != "train.seed"]
    for key in [k for k in space if k != "kind" and k not in later]:
        if key.split(".")[0] in fields:
            params[key] = _draw(trial, key, space[key])
    if later and s.config(model, params, trial.number)[0].training_steps() > 0:
        for key in later:
            if key.split(".")[0] in fields:
                params[key] = _draw(trial, key, space[key])
    return params


def _draw(trial, key: str, values):
    if isinstance(values, list):
        return trial.suggest_categorical(key, values)
    if _integer(values):
        return trial.suggest_int(key, int(values.low), int(values.high), step=int(values.step or 1))
    return trial.suggest_float(key, values.low, values.high, log=values.log, step=values.step)
