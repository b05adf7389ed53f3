"""Sweep and search files read into cells: models x attack settings x seeds, each cell an ordinary
attack config with an id derived from it, so any machine computes the same ids. The search
builds its trials with the same `read_sweep_file` and `cell_config`.

Attacks may be of different kinds (`kind: finetune`, ...). `base` holds settings shared by the
attacks; each attack takes the base sections its kind has and ignores the others, so one base
can carry the fine-tuning data and the evaluation tasks for every kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from attack.config import (
    KINDS,
    AttackConfig,
    Section,
    config_hash,
    explain,
    load_config,
    merge,
    read_yaml,
    refuse_file_trust,
    shipped,
    updated,
    with_paths_from,
)
from attack.config.kinds import DEFAULT_KIND
from attack.errors import UserError
from attack.records import CellMeta
from attack.rundir import RunDir


class SweepModel(Section):
    label: str
    """Short name in tables and figures, e.g. strong-filter."""
    name: str
    """Hub id or local directory."""
    role: Literal["filtered", "unfiltered", "unlearned", "reference", "other"] = "other"
    """The report's reference line is the pre-attack score of the reference model (or, if none,
    the unfiltered one)."""
    revisions: list[str] = []
    """Hub revisions to attack, each a separate cell; empty: the default revision."""
    expect: dict[str, float] = {}
    """Published pre-attack scores of this model, {task: value}; each cell's step 0 is checked
    against them (eval.expect)."""
    gguf_file: str | None = None
    """GGUF file inside a hub repository or folder named by `name` (model.gguf_file)."""


@dataclass(frozen=True)
class SweepAttack:
    label: str
    """Short name of the attack setting, e.g. lora-2e-5."""
    overrides: dict = field(default_factory=dict)
    """Config sections this setting changes, e.g. {train: {lr: 5e-5}, adapter: {kind: full}}."""
    seeds: list[int] | None = None
    """Seeds of this setting, instead of the sweep's (one for a deterministic ablation)."""
    models: list[str] | None = None
    """Labels of the models this setting attacks, instead of every model (a reference model that
    needs only its pre-attack score gets one setting of kind evaluate)."""


@dataclass(frozen=True)
class Cell:
    id: str
    model: SweepModel
    revision: str | None
    attack: SweepAttack
    seed: int
    config: AttackConfig

    @property
    def run_dir(self) -> RunDir:
        return RunDir.for_config(self.config)

    def meta(self, sweep: str) -> CellMeta:
        return CellMeta(cell_id=self.id, sweep=sweep, model=self.model.label, role=self.model.role,
                        revision=self.revision, attack=self.attack.label, kind=self.config.kind, seed=self.seed)


@dataclass(frozen=True)
class SweepFile:
    """What a sweep file and a search file share, read and checked: the file, its raw keys, its
    folder (relative input paths in it are found from there first), the base config, the models
    and the output folder."""

    path: Path
    raw: dict
    here: Path
    base: dict
    models: list[SweepModel]
    output: str
    name: str


def read_sweep_file(path: str | Path, what: str, own: dict[str, type]) -> SweepFile:
    """Read a sweep or search file (`what`): its keys are name, output, base, models and `own`
    (key -> the type it must have). One line for any unknown key, missing model, wrong type or
    repeated model label."""
    raw = read_yaml(path)
    allowed = {"name", "output", "base", "models", *own}
    unknown = set(raw) - allowed
    if unknown:
        raise UserError(f"unknown {what} key(s) {', '.join(sorted(unknown))} in {path}; valid: {', '.join(sorted(allowed))}")
    if not raw.get("models"):
        raise UserError(f"{what} {path} lists no models")
    for key, kind in (("base", dict), ("models", list), *own.items()):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise UserError(f"{what} {path}: '{key}' must be a {'mapping of config sections' if kind is dict else 'list'}, "
                            f"got {type(raw[key]).__name__}")
    here = Path(path).parent
    models = [parse_model(with_paths_from({"model": m}, here)["model"] if isinstance(m, dict) else m, i)
              for i, m in enumerate(raw["models"])]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"{what} {path}: model labels must be unique, got {labels}")
    return SweepFile(Path(path), raw, here, with_paths_from(raw.get("base") or {}, here), models,
                     str(raw.get("output") or f"runs/{Path(path).stem}"), str(raw.get("name") or Path(path).stem))


def load_sweep(path: str | Path, trust_remote_code: bool = False) -> tuple[dict, list[Cell]]:
    """Read a sweep file and expand it into cells, in a fixed order. A cell whose model asks to
    run its own code is refused unless `trust_remote_code` (the command line's flag) grants it."""
    path = shipped(path, "sweeps")  # a path, or a shipped sweep's name (adversary_suite, deep_ignorance)
    f = read_sweep_file(path, "sweep", {"attacks": list, "seeds": list})
    raw, here, base, models, output = f.raw, f.here, f.base, f.models, f.output
    attacks = [_attack(with_paths_from(a, here) if isinstance(a, dict) else a, i)
               for i, a in enumerate(raw.get("attacks") or [{"label": "default"}])]
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise UserError(f"sweep seeds must be integers, got {seeds}")
    labels = [a.label for a in attacks]
    if len(set(labels)) != len(labels):
        raise UserError(f"sweep {path}: attack labels must be unique, got {labels}")
    for a in attacks:
        unknown = sorted(set(a.models or []) - {m.label for m in models})
        if unknown:
            raise UserError(f"sweep {path}: attack {a.label} names model(s) {', '.join(unknown)} that the sweep does not "
                            f"list; its models: {', '.join(m.label for m in models)}")
    cells = []
    for m in models:
        for rev in m.revisions or [None]:
            for a in attacks:
                if a.models is not None and m.label not in a.models:
                    continue
                draws = KINDS[known_kind(a.overrides.get("kind", DEFAULT_KIND))].trains()
                for seed in (a.seeds or seeds) if draws else [0]:  # a quantization is the same at every seed
                    label = m.label + (f"@{rev}" if rev else "")
                    cfg, cell_id = cell_config(base, a.overrides, m, rev, seed, output,
                                               f"{safe_name(label)}--{safe_name(a.label)}--s{seed}",
                                               f"sweep cell {m.label}/{a.label}/seed {seed}", f"sweep {path}",
                                               trust_remote_code)
                    cells.append(Cell(cell_id, m, rev, a, seed, cfg))
    return dict(name=raw.get("name") or Path(path).stem, output=str(output)), cells


def cell_config(base: dict, overrides: dict, model: SweepModel, revision: str | None, seed: int, output,
                name: str, what: str, where: str, trust_remote_code: bool) -> tuple[AttackConfig, str]:
    """One cell's config, built the one way sweeps and searches build it: the base sections of the
    attack's kind, the attack's settings, the model (and revision), the seed where the kind draws
    one, the output folder and the model's published scores. Refused in one line that names the
    cell (`what`); its id, `name--<config hash>`, is also its run id."""
    kind = known_kind(overrides.get("kind", DEFAULT_KIND))
    data = merge(merge(base_for(base, kind), overrides),
                 {"model": {"name": model.name, "revision": revision, "gguf_file": model.gguf_file},
                  **({"train": {"seed": seed}} if KINDS[kind].trains() else {}), "output": {"dir": str(output)},
                  "eval": {"expect": model.expect}})
    try:
        cfg = load_config(data)
        refuse_file_trust(cfg, where, trust_remote_code)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    cell_id = f"{name}--{config_hash(cfg)}"
    return updated(cfg, {"output.run_id": cell_id}), cell_id


def parse_model(m, i) -> SweepModel:
    if not isinstance(m, dict):
        raise UserError(f"sweep models[{i}] must be a mapping with label and name")
    try:
        return SweepModel.model_validate(m)
    except ValidationError as e:
        raise UserError(explain(e, SweepModel, prefix=f"models[{i}]")) from None


def known_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise UserError(f"sweep attack kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def base_for(base: dict, kind: str) -> dict:
    """The base sections that an attack of this kind has (the others belong to other kinds)."""
    return {k: v for k, v in base.items() if k in KINDS[known_kind(kind)].model_fields}


def _attack(a, i) -> SweepAttack:
    if not isinstance(a, dict) or "label" not in a:
        raise UserError(f"sweep attacks[{i}] must be a mapping with a label and config sections")
    overrides = {k: v for k, v in a.items() if k not in ("label", "seeds", "models")}
    models = a.get("models")
    if models is not None and not (isinstance(models, list) and models and all(isinstance(m, str) for m in models)):
        raise UserError(f"sweep attacks[{i}].models must be a list of model labels, got {models!r}")
    seeds = a.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise UserError(f"sweep attacks[{i}].seeds must be a list of integers, got {seeds!r}")
    return SweepAttack(label=str(a["label"]), overrides=overrides, seeds=seeds, models=models)


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "-" for c in str(text))


def shard(cells: list[Cell], spec: str | None) -> list[Cell]:
    """Cells of shard i of n (1-based): every n-th cell, starting at the i-th."""
    if not spec:
        return cells
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard expects i/n, e.g. 2/8, got '{spec}'") from None
    if not (n >= 1 and 1 <= i <= n):
        raise UserError(f"--shard {spec}: need 1 <= i <= n")
    return cells[i - 1 :: n]
