"""The study and its workers: the storage, the sampler and the pruner, the next trial under the
search's lock (a dead worker's taken over), running and telling a trial."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from attack import signals
from attack.cells import SweepModel, safe_name
from attack.config import (
    updated,
)
from attack.errors import UserError, first_line
from attack.records import Outcome, Status
from attack.rundir import RunDir
from attack.runlock import RunDirInUse, RunLock
from attack.search.objective import ReportToStudy, objective
from attack.search.space import PRUNERS, Search, describe_params, suggest
from attack.sweep import record_failure


def storage_for(url: str | None, output: Path):
    """An Optuna storage: the SQLite file output/study.db by default, `journal:PATH` for a journal
    file (shared file systems without a database), or any database URL SQLAlchemy knows."""
    import optuna

    if url is None:
        output.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(output / 'study.db').absolute()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as e:  # SQLAlchemy and the drivers raise their own types
        raise UserError(f"--storage {url}: cannot open it ({first_line(e)}); give a reachable database URL, "
                        "journal:PATH or nothing for the SQLite file in the output folder") from None


def check_storage(url: str | None) -> None:
    """A storage the search could open, checked before anything is written: a journal's or an
    SQLite file's folder exists; a database answers a connection."""
    if url is None:
        return
    if url.startswith("journal:") or url.startswith("sqlite:///"):
        path = Path(url.removeprefix("journal:").removeprefix("sqlite:///")).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: the folder {path.parent} does not exist; create it, or give another path")
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # SQLAlchemy and the drivers raise their own types
        raise UserError(f"--storage {url}: cannot open it ({first_line(e)}); give a reachable database URL, "
                        "journal:PATH or nothing for the SQLite file in the output folder") from None


def open_study(s: Search, model: SweepModel, storage):
    import optuna

    sec = s.search
    pruner = PRUNERS[sec.pruner](optuna, sec)
    sampler = optuna.samplers.TPESampler(seed=sec.seed, n_startup_trials=max(2, min(10, sec.trials // 3)),
                                         constraints_func=lambda t: t.user_attrs.get("constraint", [0.0]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=s.study_name(model), storage=storage, direction="maximize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def _trial_lock(s: Search, model: SweepModel, number: int) -> RunLock:
    folder = s.output / ".trials"
    folder.mkdir(parents=True, exist_ok=True)
    return RunLock(folder / f"{safe_name(model.label)}-{number:04d}.lock")


def next_trial(s: Search, model: SweepModel, study, storage, started: float):
    """Under the search lock: a trial whose worker died (taken over), else a new one while the
    budget allows, else None. Returns (trial, its lock)."""
    import optuna
    from filelock import FileLock

    TS = optuna.trial.TrialState
    with FileLock(str(s.output / f".search-{safe_name(model.label)}.lock")):
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == TS.RUNNING:
                lock = _trial_lock(s, model, t.number)
                try:
                    lock.acquire()  # taken over only when its holder is gone
                except RunDirInUse:
                    continue
                # the same trial, through the storage's public lookup of a trial by its number
                trial_id = storage.get_trial_id_from_study_id_trial_number(
                    storage.get_study_id_from_name(study.study_name), t.number)
                return optuna.Trial(study, trial_id), lock
        sec = s.search
        if len(trials) >= sec.trials:
            return None, None
        if sec.timeout_s is not None and time.time() - started > sec.timeout_s:
            return None, None
        if sec.token_budget is not None and sum(t.user_attrs.get("tokens", 0) for t in trials) >= sec.token_budget:
            return None, None
        trial = study.ask()
        lock = _trial_lock(s, model, trial.number)
        lock.acquire()
        return trial, lock


def run_trial(s: Search, model: SweepModel, study, trial, log=print) -> Outcome:
    """One trial as an ordinary run directory; its result told to the study. Returns its state."""

    from attack.recipes import run_attack

    try:
        params = suggest(trial, s, model)
        cfg, cell_id = s.config(model, params, trial.number)
    except UserError as e:  # a combination the space allows but the config refuses
        return _failed(study, trial, e, "refused", log)
    same = _same_settings(study, trial, params)
    if same is not None:  # an attack already run (an ablation drawn again): its result, not a rerun
        return _tell(s, study, trial, RunDir(s.output / same.user_attrs["run"]), log, same=same.number)
    run = RunDir.for_config(cfg)
    meta = dict(cell_id=cell_id, sweep=s.name, model=model.label, role=model.role, revision=None,
                attack=f"trial{trial.number:03d} {describe_params(params)}", kind=cfg.kind, seed=cfg.seed,
                trial=trial.number, study=s.study_name(model), selection_tasks=list(s.search.selection_tasks),
                params=params)
    if run.status == Status.DONE or run.status == Status.PRUNED:  # finished, but the worker died before telling
        return _tell(s, study, trial, run, log)
    resume = run.status != Status.PENDING
    log(f"trial {trial.number} ({describe_params(params)}): {'resuming' if resume else 'running'} {run.path.name}")
    report = ReportToStudy(trial, run, s.search, cfg.eval_schedule(), cfg.training_offset)
    try:
        run_attack(updated(cfg, {"output.resume": resume}), extra_callbacks=[report], quiet=True, cell=meta, progress=False)
    except RunDirInUse:
        raise
    except UserError as e:
        record_failure(run, meta, e)
        return _failed(study, trial, e, "FAILED", log)
    finally:
        gc.collect()
    if report.pruned_at is not None:
        run.write_summary(status=Status.PRUNED)
    return _tell(s, study, trial, run, log)


def _failed(study, trial, e: Exception, how: str, log) -> Outcome:
    """Tell the study a trial failed, with why (a user attribute the report shows)."""
    import optuna

    trial.set_user_attr("error", str(e))
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    log(f"trial {trial.number}: {how}: {e}")
    return Outcome.FAILED


def _same_settings(study, trial, params: dict):
    """A finished trial of the very same settings (the same attack: its seed is the search's), or None."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return next((t for t in study.get_trials(deepcopy=False, states=done)
                 if t.number != trial.number and t.params == params and "run" in t.user_attrs), None)


def _tell(s: Search, study, trial, run: RunDir, log, same: int | None = None) -> Outcome:
    import optuna

    result = objective(run, s.search)
    summary = run.summary or {}
    pruned = summary.get("status") == Status.PRUNED
    tokens = int(summary.get("tokens_seen") or 0)
    result.update(pruned=pruned, tokens=tokens)
    if same is None:
        run.write_summary(search=result)
    else:
        trial.set_user_attr("same_as", same)
        log(f"trial {trial.number}: the settings of trial {same}, told its result")
    trial.set_user_attr("constraint", [result["constraint"]])
    trial.set_user_attr("tokens", tokens if same is None else 0)  # (a budget counts what was trained)
    trial.set_user_attr("run", run.path.name)
    trial.set_user_attr("best_step", result["step"])
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log(f"trial {trial.number}: pruned at step {summary.get('steps', '?')} (selection gain so far {result['value']:+.3f})")
        return Outcome.PRUNED
    study.tell(trial, result["value"])
    log(f"trial {trial.number}: done, selection gain {result['value']:+.3f} at step {result['step']}"
        + ("" if result["feasible"] else " (infeasible: every point broke the utility bound"
                                          + (" or the KL bound)" if s.search.max_kl is not None else ")")))
    return Outcome.DONE


def run_search(s: Search, storage_url: str | None = None, log=print) -> dict:
    """This worker's share of every model's study; returns counts by outcome."""
    from filelock import FileLock

    s.output.mkdir(parents=True, exist_ok=True)
    outcome = Outcome.counts(Outcome.DONE, Outcome.PRUNED, Outcome.FAILED)
    started = time.time()
    # Workers starting together would each create the storage's tables and the study: one at a time.
    with FileLock(str(s.output / ".search-storage.lock")):
        storage = storage_for(storage_url, s.output)
        studies = [(model, open_study(s, model, storage)) for model in s.models]
    for model, study in studies:
        if any(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False)):
            study.sampler.reseed_rng()  # another worker is at it: draw other settings than its
        while True:
            signals.raise_pending()  # a signal a finalizer swallowed ends the search here
            trial, lock = next_trial(s, model, study, storage, started)
            if trial is None:
                break
            try:
                state = run_trial(s, model, study, trial, log=lambda m, label=model.label: log(f"[{label}] {m}"))
            finally:
                lock.release()
            outcome[state] += 1
    # no trial left running anywhere: this worker is the last, and the search is complete
    outcome["complete"] = not any(t.state.name == "RUNNING" for _, study in studies for t in study.get_trials(deepcopy=False))
    return outcome
