"""A trial's objective, read from its curve (the best gain on the selection tasks within the
utility bound), and the callback that reports it to the study at every evaluation point."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from attack.files import read_json
from attack.records import read_curve
from attack.rundir import RunDir
from attack.search.space import SearchSection
from eval_callbacks.task_lookup import ORIENTED, headline_metric


def objective(run: RunDir, search: SearchSection) -> dict:
    """The trial's objective from its curve: the best gain over step 0 of the selection tasks'
    mean headline score among the points that keep the utility bound and, with search.max_kl,
    the KL bound (step 0 always does), the step it was read at, and whether any point after
    step 0 kept them (feasible) with the least violation (the sampler's constraint)."""
    tasks = read_json(run.tasks_path) or {}
    rows = read_curve(run.curve)

    def score(task: str, step: int) -> float | None:
        """The task's headline score, oriented as the report reads it (refused as 1 - refused), so
        that a gain is always the suppressed side's way back."""
        metric = headline_metric(tasks.get(task))
        values = [r["value"] for r in rows if r["task"] == task and r["metric"] == metric and r["step"] == step]
        if not values or values[-1] is None:
            return None
        return 1 - float(values[-1]) if metric in ORIENTED else float(values[-1])

    steps = sorted({r["step"] for r in rows})
    if 0 not in steps:
        return dict(value=0.0, step=0, feasible=False, constraint=1.0, points=0)
    selection = {s: _mean([score(t, s) for t in search.selection_tasks]) for s in steps}
    kl = {r["step"]: r["value"] for r in rows if r["metric"] == "kl" and r["value"] is not None}
    best, best_step, violations = 0.0, 0, []
    for s in steps:
        drop = 0.0
        if search.utility_task:
            before, now = score(search.utility_task, 0), score(search.utility_task, s)
            drop = (before - now) if before is not None and now is not None else 0.0
        # how far the point is beyond its bounds (<= 0: within them): the utility drop, and the KL
        beyond = drop - search.max_utility_drop
        if search.max_kl is not None:
            beyond = max(beyond, kl.get(s, 0.0) - search.max_kl)
        if s > 0:
            violations.append(beyond)
        gain = selection[s] - selection[0] if math.isfinite(selection[s]) and math.isfinite(selection[0]) else float("nan")
        if s > 0 and beyond <= 0 and math.isfinite(gain) and gain > best:
            best, best_step = gain, s
    feasible = bool(violations) and min(violations) <= 0
    return dict(value=round(best, 6), step=best_step, feasible=feasible,
                constraint=float(min(violations)) if violations else 0.0, points=len(steps))


def _mean(values) -> float:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else float("nan")


class ReportToStudy(TrainerCallback):
    """At each evaluation point (after the curve callback wrote it): the objective so far goes
    to the study; when the pruner says this trial cannot beat the others, training stops there."""

    def __init__(self, trial, run: RunDir, search: SearchSection, schedule: list[int], offset: int):
        self.trial, self.run, self.search = trial, run, search
        self.schedule, self.offset = set(schedule), offset
        self.pruned_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.schedule or state.global_step == 0 or not state.is_world_process_zero:
            return
        step = state.global_step + self.offset
        self.trial.report(objective(self.run, self.search)["value"], step)
        if self.trial.should_prune() and state.global_step < max(self.schedule):
            self.pruned_at = step
            control.should_training_stop = True
