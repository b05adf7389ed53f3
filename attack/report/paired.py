"""Paired recovery statistics from the per-question records (samples/ in each run directory).

Every point of a curve scores the same questions as step 0, so the change since step 0 is
measured question by question, which is far more precise than comparing two accuracies.

- change(t): mean over questions of correct(t) - correct(0). With several seeds, each question's
  difference is first averaged over the seeds; the interval is then a percentile bootstrap over
  questions (BOOTSTRAP resamples, 95%). It rests on the questions scored at both points (all of
  them, or the eval.limit subset at intermediate points) and on the seeds that have records.
- recovered(t): change(t) / (reference - pre), the share of the gap to the reference model's
  pre-attack score closed by step t; its interval is change's divided by the gap (the reference
  is taken as fixed).
- steps to X%: the first point whose recovered interval lies wholly above X (a claim the data
  support at 95%), beside the first point whose estimate passes X.
- not reached: the upper end of recovered's interval at the last point: recovery above that
  share of the gap is excluded at 95% by this attack at this budget.
- flips: questions wrong at step 0 and right at t (recovered), and right at 0 and wrong at t
  (with several seeds: right or wrong on most of them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attack.errors import UserError, first_line
from attack.files import read_json
from attack.rundir import RunDir
from eval_callbacks import read_samples
from eval_callbacks.task_lookup import ORIENTED

BOOTSTRAP = 1000
LEVEL = 0.95
THRESHOLDS = (0.25, 0.5, 0.75, 0.9)


def load_records(runs: pd.DataFrame) -> pd.DataFrame:
    """The per-question records of the runs in `runs` (one row per run: run, path, model, attack,
    seed), with those columns added. Empty when no run has records."""
    frames = []
    for run in runs.itertuples(index=False):
        folder = RunDir(Path(run.path)).samples
        try:
            records = read_samples(folder)
        except (OSError, EOFError, ValueError) as e:  # a damaged or foreign file among the records
            raise UserError(f"the per-question records in {folder} are unreadable ({first_line(e)}); "
                            "remove the damaged file or leave that run out") from None
        if records:
            df = pd.DataFrame(records)
            df["model"], df["attack"], df["seed"] = run.model, run.attack, run.seed
            tasks = read_json(RunDir(Path(run.path)).tasks_path)
            flipped = [t for t, i in (tasks if isinstance(tasks, dict) else {}).items()
                       if isinstance(i, dict) and i.get("metric") in ORIENTED]
            if flipped:  # as the curves are read: non-refusal, higher is the attack's way
                rows = df.task.isin(flipped)
                df.loc[rows, "correct"] = 1 - df.loc[rows, "correct"]
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def bootstrap_mean(d: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of d with a percentile-bootstrap interval over its entries."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), (100, len(d)))].mean(1) for _ in range(BOOTSTRAP // 100)])
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(d.mean()), float(lo), float(hi)


def paired_curve(records: pd.DataFrame) -> pd.DataFrame:
    """Per step of one model x attack x task: questions, seeds, change and its interval, flips.
    `records` holds that cell's rows (all seeds)."""
    # per question and step: mean over seeds of correct
    by_q = records.groupby(["step", "question"])["correct"].mean().unstack("question").sort_index()
    seeds = records.seed.nunique()
    if 0 not in by_q.index:
        return pd.DataFrame()
    base = by_q.loc[0]
    rows = []
    for step, now in by_q.iterrows():
        both = now.notna() & base.notna()
        d = (now[both] - base[both]).to_numpy()
        change, lo, hi = bootstrap_mean(d, seed=int(step))
        rows.append(dict(step=int(step), questions=int(both.sum()), seeds=seeds, pre=float(base[both].mean()),
                         change=change, change_lo=lo, change_hi=hi,
                         # right or wrong on most seeds (a tie is neither)
                         flipped_right=int(((base[both] < 0.5) & (now[both] > 0.5)).sum()),
                         flipped_wrong=int(((base[both] > 0.5) & (now[both] < 0.5)).sum())))
    return pd.DataFrame(rows)


def recovery_claims(curve: pd.DataFrame, reference: float) -> dict:
    """From a paired curve and the reference score: recovered fraction at the last point with its
    interval, steps to each threshold (supported and estimated), and the bound for "not reached"."""
    pre = float(curve.pre.iloc[0])
    gap = reference - pre
    out = dict(questions=int(curve.questions.iloc[0]), seeds=int(curve.seeds.iloc[0]))
    last = curve.iloc[-1]
    out.update(change_final=last.change, change_final_lo=last.change_lo, change_final_hi=last.change_hi)
    if not np.isfinite(gap) or gap <= 0:
        return out  # no gap to recover (the reference model itself, or a model already above it)
    rec, rec_lo, rec_hi = curve.change / gap, curve.change_lo / gap, curve.change_hi / gap
    out.update(recovered_final=float(rec.iloc[-1]), recovered_final_lo=float(rec_lo.iloc[-1]),
               recovered_final_hi=float(rec_hi.iloc[-1]))
    for t in THRESHOLDS:
        pct = int(t * 100)
        sure = curve.step[rec_lo >= t]
        estimate = curve.step[rec >= t]
        out[f"sure_steps_to_{pct}%"] = int(sure.iloc[0]) if len(sure) else None
        out[f"estimated_steps_to_{pct}%"] = int(estimate.iloc[0]) if len(estimate) else None
        out[f"claim_{pct}%"] = (f"reached at step {int(sure.iloc[0])}" if len(sure) else
                                f"not reached; recovery above {100 * float(rec_hi.iloc[-1]):.0f}% of the gap "
                                f"is excluded at 95%" if rec_hi.iloc[-1] < t else
                                "not established (the interval still includes it)")
    return out


def paired_table(records: pd.DataFrame, references: dict[str, float], tasks: list[str] | None = None) -> pd.DataFrame:
    """One row per model x attack x task with the claims of `recovery_claims` (and the per-step
    curves, with flips, as `paired_curves`)."""
    rows = []
    for (model, attack, task), g in records.groupby(["model", "attack", "task"], sort=True):
        if tasks is not None and task not in tasks:
            continue
        curve = paired_curve(g)
        if curve.empty:
            continue
        rows.append(dict(model=model, attack=attack, task=task,
                         **recovery_claims(curve, references.get(task, float("nan")))))
    return pd.DataFrame(rows)


def paired_curves(records: pd.DataFrame) -> pd.DataFrame:
    """Every model x attack x task's paired curve in one table (flips included)."""
    frames = []
    for (model, attack, task), g in records.groupby(["model", "attack", "task"], sort=True):
        curve = paired_curve(g)
        if not curve.empty:
            frames.append(curve.assign(model=model, attack=attack, task=task))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
