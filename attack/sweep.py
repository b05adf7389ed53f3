"""Sweeps: every cell of a sweep file (attack/cells.py) run as an ordinary attack.

    python -m attack sweep configs/sweeps/toy.yaml [--shard 2/8] [--dry-run]

Cells are independent; re-running skips finished cells, resumes interrupted ones and runs the
rest; `--shard i/n` takes every n-th cell (1-based), so array jobs need no coordinator.
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path

import torch

from attack import signals
from attack.cells import Cell, load_sweep, shard
from attack.config import (
    updated,
)
from attack.config.files import grant_code
from attack.errors import ArgumentParser, UserError, first_line
from attack.preflight import check_config_offline
from attack.records import CellMeta, Outcome, Status
from attack.rundir import RunDir
from attack.runlock import RunDirInUse


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
    check_models_unchanged(mine)
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


def check_models_unchanged(cells: list[Cell]) -> None:
    """A sweep skips its finished cells and resumes its started ones, by config: a local model
    rebuilt in place at the same path would have the old model's runs read as its own."""
    changed = [c for c in cells if status(c) != Status.PENDING and c.run_dir.model_changed(c.config)]
    if changed:
        c = changed[0]
        raise UserError(f"the model {c.config.model.name} changed since this sweep's runs of it were made ({len(changed)} "
                        f"cell(s) in {c.run_dir.path.parent}, e.g. {c.run_dir.path.name}); they measured the old files: "
                        "move them away or give the sweep another output")


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
