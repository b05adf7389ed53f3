"""Sweeps: models x attack settings x seeds, each a *cell* run as an ordinary attack.

    python -m attack sweep configs/sweeps/toy.yaml [--shard 2/8] [--dry-run]

Cells are independent and their ids are derived from their resolved config, so any machine
computes the same ids; re-running skips finished cells, resumes interrupted ones and runs the
rest; `--shard i/n` takes every n-th cell (1-based), so array jobs need no coordinator.

Attacks may be of different kinds (`kind: finetune`, ...). `base` holds settings shared by the
attacks; each attack takes the base sections its kind has and ignores the others, so one base
can carry the fine-tuning data and the evaluation tasks for every kind.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationError

from attack import signals
from attack.config import (
    KINDS,
    AttackConfig,
    Section,
    check_dataset_copies,
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
from attack.config.files import grant_code
from attack.config.kinds import DEFAULT_KIND
from attack.errors import ArgumentParser, UserError, first_line
from attack.records import CellMeta, Outcome, Status
from attack.rundir import RunDir
from attack.runlock import RunDirInUse


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
    needs only its pre-attack score gets one cheap setting)."""


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
                kind = a.overrides.get("kind", DEFAULT_KIND)
                kind_base = base_for(base, kind)  # (refuses an unknown kind)
                draws = KINDS[kind].trains()
                for seed in (a.seeds or seeds) if draws else [0]:  # a quantization is the same at every seed
                    data = merge(kind_base, a.overrides)
                    data = merge(data, {"model": {"name": m.name, "revision": rev, "gguf_file": m.gguf_file},
                                        **({"train": {"seed": seed}} if draws else {}), "output": {"dir": str(output)},
                                        "eval": {"expect": m.expect}})
                    try:
                        cfg = load_config(data)
                        refuse_file_trust(cfg, f"sweep {path}", trust_remote_code)
                    except UserError as e:
                        raise UserError(f"sweep cell {m.label}/{a.label}/seed {seed}: {e}") from None
                    label = m.label + (f"@{rev}" if rev else "")
                    cell_id = f"{safe_name(label)}--{safe_name(a.label)}--s{seed}--{config_hash(cfg)}"
                    cfg = updated(cfg, {"output.run_id": cell_id})
                    cells.append(Cell(cell_id, m, rev, a, seed, cfg))
    return dict(name=raw.get("name") or Path(path).stem, output=str(output)), cells


def parse_model(m, i) -> SweepModel:
    if not isinstance(m, dict):
        raise UserError(f"sweep models[{i}] must be a mapping with label and name")
    try:
        return SweepModel.model_validate(m)
    except ValidationError as e:
        raise UserError(explain(e, SweepModel, prefix=f"models[{i}]")) from None


def base_for(base: dict, kind: str) -> dict:
    """The base sections that an attack of this kind has (the others belong to other kinds)."""
    schema = KINDS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise UserError(f"sweep attack kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {k: v for k, v in base.items() if k in schema.model_fields}


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


def status(cell: Cell) -> Status:
    return cell.run_dir.status


def check_offline(cells: list[Cell]) -> None:
    """Validate what can be checked without downloads: task names, local paths."""
    known = {}
    for c in cells:
        try:
            check_config_offline(c.config, known)
        except UserError as e:
            raise UserError(f"cell {c.id}: {e}") from None


def check_config_offline(cfg, known: dict | None = None) -> None:
    """One attack's config checked without downloads or model weights: task names (and the
    published scores' tasks), local dataset copies, the model's location, every input file.
    `known`: task names found so far, by task list and include path (shared across cells)."""
    from attack.config.files import means_local_file
    from attack.evaluation import find_eval_tasks
    from attack.model import model_source

    known = {} if known is None else known
    key = (tuple(cfg.eval.tasks), tuple(cfg.eval.include_path), tuple(sorted(cfg.eval.heldout_texts.items())),
           cfg.model.trust_remote_code)
    if key not in known:  # the run's own route: held-out texts and task code checked as a run checks them
        known[key] = set(find_eval_tasks(cfg.eval, cfg.model.trust_remote_code).all_tasks)
    unknown = sorted(set(cfg.eval.expect) - known[key])
    if unknown:
        raise UserError(f"expect names unknown task(s) {', '.join(unknown)}")
    check_dataset_copies(cfg.eval)
    model_source(cfg.model)
    for name, path in cfg.input_files().items():
        if not Path(path).expanduser().exists():
            raise UserError(f"{name} file not found: {path} (relative paths are taken from the current directory)")
    data = cfg.data.path if cfg.uses_data else ""
    if data and means_local_file(data) and not Path(data).expanduser().exists():
        raise UserError(f"attack data not found: {data} (relative paths are taken from the current directory; "
                        "hub dataset ids look like org/name)")


def describe(cell: Cell) -> str:
    cfg = cell.config
    steps, per_step = cfg.training_steps(), cfg.tokens_per_step()
    tokens = f" tokens={steps * per_step:,}" if per_step is not None else ""  # RL: as generated
    rev = f"@{cell.revision}" if cell.revision else ""
    return (f"{cell.id}  model={cfg.model.name}{rev} role={cell.model.role} attack={cell.attack.label} "
            f"({cfg.describe()}) seed={cell.seed} steps={steps}{tokens} [{status(cell)}]")


def run_sweep(path: str | Path, shard_spec: str | None = None, quiet: bool = False, log=print,
              progress: bool = False, trust_remote_code: bool = False) -> dict:
    """Run this shard's cells; returns counts by outcome."""
    sweep, cells = load_sweep(path, trust_remote_code)
    mine = shard(cells, shard_spec)
    check_offline(mine)
    outcome = Outcome.counts(Outcome.DONE, Outcome.SKIPPED, Outcome.BUSY, Outcome.FAILED)
    spent, ran = 0.0, 0
    for k, cell in enumerate(mine, 1):
        signals.raise_pending()  # a signal a finalizer swallowed ends the sweep here
        eta = f", ETA {_duration(spent / ran * (len(mine) - k + 1))}" if ran else ""
        start = time.perf_counter()
        result = run_cell(cell, sweep["name"], quiet=quiet, progress=progress,
                          log=lambda m, k=k, cell=cell, eta=eta: log(f"[{k} of {len(mine)}{eta}] {cell.id}: {m}"))
        if result in (Outcome.DONE, Outcome.FAILED):  # cells that ran here tell what the rest will take
            spent, ran = spent + time.perf_counter() - start, ran + 1
        outcome[result] += 1
    signals.raise_pending()
    return outcome


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_cell(cell: Cell, sweep: str, quiet: bool = False, progress: bool = False, log=print) -> Outcome:
    """Run one cell (resumed when it was started before): done, skipped (finished already), busy
    (another process holds its run directory: not finished here) or failed (recorded in its
    summary.json; Ctrl-C still stops)."""
    from attack.recipes import run_attack

    state = status(cell)
    if state == Status.DONE:
        log("done already, skipped")
        return Outcome.SKIPPED
    resume = state != Status.PENDING
    log("resuming" if resume else "running")
    cfg = updated(cell.config, {"output.resume": resume})
    try:
        run_attack(cfg, quiet=quiet, cell=cell.meta(sweep), progress=progress or not quiet)
        return Outcome.DONE
    except RunDirInUse as e:  # another shard or job is on this cell: leave it to that one
        log(f"busy, not run here: {e}")
        return Outcome.BUSY
    except Exception as e:  # one failed cell must not stop the others (Ctrl-C still does)
        signals.raise_pending()  # the exception of a swallowed signal: stop, do not record a failure
        run = cell.run_dir
        if run.status == Status.DONE:  # another process finished it meanwhile (two sweeps on one file)
            log("finished by another process meanwhile, skipped")
            return Outcome.SKIPPED
        if run.lock.holder_alive():  # another process started it meanwhile: its run, not a failure here
            log(f"busy, not run here: {first_line(e)}")
            return Outcome.BUSY
        record_failure(run, cell.meta(sweep), e)
        log(f"FAILED: {first_line(e)}")
        return Outcome.FAILED
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def record_failure(run: RunDir, meta: CellMeta, error: Exception) -> None:
    """A cell that failed says so in its summary.json, with its cell.json, for the report."""
    run.path.mkdir(parents=True, exist_ok=True)
    if run.cell is None:
        run.write_cell(meta)
    detail = "" if isinstance(error, UserError) else traceback.format_exc(limit=5)
    run.write_summary(status=Status.FAILED, error=first_line(error), traceback=detail)


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack sweep", description="Run a sweep of attack cells.")
    p.add_argument("sweep", help="sweep YAML file, or a shipped sweep by name (adversary_suite, deep_ignorance)")
    p.add_argument("--shard", help="i/n: run the i-th of n disjoint shares of the cells (1-based)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and validate offline; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; a line per evaluation point")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let models whose cells set model.trust_remote_code run their own code (a file alone cannot)")
    args = p.parse_args(argv)
    grant_code(args.trust_remote_code)  # cells and workers started from here inherit it
    sweep, cells = load_sweep(args.sweep, args.trust_remote_code)
    mine = shard(cells, args.shard)
    if args.dry_run:
        for cell in mine:
            print(describe(cell))
        check_offline(mine)
        print(f"{len(mine)} of {len(cells)} cells in this shard; configs, tasks and local paths check out")
        return 0
    outcome = run_sweep(args.sweep, args.shard, quiet=args.quiet, progress=True, trust_remote_code=args.trust_remote_code)
    print(f"sweep {sweep['name']}: {outcome[Outcome.DONE]} run, {outcome[Outcome.SKIPPED]} already done, "
          f"{outcome[Outcome.BUSY]} busy (held by another process, not finished here), {outcome[Outcome.FAILED]} failed; "
          f"runs under {sweep['output']}")
    if not outcome[Outcome.FAILED] and not outcome[Outcome.BUSY] and not args.shard:  # the whole sweep is in: its verdict
        from attack.report import report_and_verdict

        report_and_verdict(sweep["output"])
    # a cell that did not finish must not read as success: 1 for a failure, BUSY for "try again
    # later", so a job array requeues the task (examples/slurm/sweep_array.sh)
    return 1 if outcome[Outcome.FAILED] else BUSY if outcome[Outcome.BUSY] else 0


BUSY = 75  # sysexits' EX_TEMPFAIL
