"""The report's view of adversary searches (attack/search.py): which trial each study selected
on its selection tasks, every trial in search.csv, and the section that says what was searched.

The honest rule: a search's trials are ranked on the selection tasks only; the verdict, the
tables and the figures see the selected trial per model (the best finished feasible one) and
never the selection tasks, so the reported recovery is not the maximum of many noisy scores of
the same questions (the winner's curse). Pruned trials are listed apart and ranked nowhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attack.records import Outcome, Status
from attack.report.page import Block, ReportData, figure
from attack.rundir import RunDir
from eval_callbacks.task_lookup import headline_metric


def trials(df: pd.DataFrame) -> pd.DataFrame:
    """One row per search trial among the runs of `df`: model, study, trial, state, its settings,
    the selection objective and the step it was read at, feasibility, tokens, run and path."""
    rows = []
    for (run, path), g in df.groupby(["run", "path"]):
        rd = RunDir(Path(path))
        cell = rd.cell or {}
        if "trial" not in cell:
            continue
        found = (rd.summary or {}).get("search")
        found = found if isinstance(found, dict) else {}
        status = str(g.status.iloc[0])
        state = status if status != Status.DONE else (Outcome.DONE if found.get("feasible", True) else Outcome.INFEASIBLE)
        params = cell.get("params") if isinstance(cell.get("params"), dict) else {}
        rows.append(dict(model=cell.get("model"), study=cell.get("study"), trial=cell.get("trial"), state=state,
                         **{f"param:{k}": v for k, v in params.items()},
                         selection_objective=found.get("value", np.nan), selection_step=found.get("step", np.nan),
                         feasible=found.get("feasible", False), tokens=found.get("tokens", np.nan), run=run, path=path,
                         attack=g.attack.iloc[0], selection_tasks=",".join(cell.get("selection_tasks") or [])))
    return pd.DataFrame(rows)


def selected(table: pd.DataFrame) -> pd.DataFrame:
    """Per study, the trial chosen on the selection tasks: finished, feasible, the highest
    objective (the lower trial number on a tie). Pruned, failed and infeasible trials never are."""
    if table.empty:
        return table
    ok = table[(table.state == Outcome.DONE) & table.feasible.astype(bool)].copy()
    ok = ok.sort_values(["study", "selection_objective", "trial"], ascending=[True, False, True])
    return ok.groupby("study").head(1)


def selection_tasks(table: pd.DataFrame) -> set[str]:
    return {t for s in table.get("selection_tasks", pd.Series(dtype=str)) for t in str(s).split(",") if t}


def heldout(table: pd.DataFrame, df: pd.DataFrame, refs: dict, reported: list[str], tasks_metric: dict) -> pd.DataFrame:
    """Each trial's reported (held-out) tasks at the point its selection objective was read:
    the gain over step 0 and the recovered fraction of the gap to the reference. `df`: the curve
    rows of every run (load_curves'), the trials' included."""
    out = table.copy()
    for task in reported:
        gains, fractions = [], []
        rows = df[(df.task == task) & (df.metric == (tasks_metric.get(task) or headline_metric(None)))]
        values = rows.groupby(["run", "step"]).value.last().to_dict()
        for r in table.itertuples():
            pre, at = values.get((r.run, 0)), values.get((r.run, r.selection_step))
            gain = at - pre if pre is not None and at is not None else np.nan
            gap = refs.get(task, np.nan) - pre if pre is not None else np.nan
            gains.append(gain)
            fractions.append(gain / gap if np.isfinite(gap) and gap > 0.02 else np.nan)
        out[f"heldout_gain:{task}"] = gains
        out[f"heldout_recovered:{task}"] = fractions
    return out


def section(r: ReportData) -> list[Block]:
    t = r.search
    if t is None or t.empty:
        return []
    chosen = selected(t)
    params = [c for c in t.columns if c.startswith("param:")]
    space = ", ".join(c.removeprefix("param:") for c in params)
    counts = t.state.value_counts().to_dict()
    lines = []
    for study, g in t.groupby("study"):
        pick = chosen[chosen.study == study]
        head = f"{g.model.iloc[0]}: {len(g)} trials ({', '.join(f'{n} {s}' for s, n in g.state.value_counts().items())})"
        if pick.empty:
            lines.append(head + "; none finished within the utility bound, so none is selected")
            continue
        p = pick.iloc[0]
        settings = ", ".join(f"{c.removeprefix('param:')}={_fmt(p[c])}" for c in params)
        held = ", ".join(f"{c.split(':', 1)[1]} {_fmt(p[c], signed=True)}" for c in t.columns
                         if c.startswith("heldout_gain:") and pd.notna(p[c]))
        lines.append(f"{head}; selected trial {int(p.trial)} ({settings}): selection gain {p.selection_objective:+.3f} "
                     f"at step {int(p.selection_step)}; held-out change there: {held or 'n/a'}")
    name = figure(_best_so_far(t), r.out, "search_progress.png")
    text = (f"Searched: {space}. Trials: {sum(counts.values())} ({', '.join(f'{n} {s}' for s, n in counts.items())}). "
            f"Each study's adversary was chosen on its selection tasks ({', '.join(sorted(selection_tasks(t)))}), "
            "which no table, figure or verdict here reports; the selected trial alone stands for the search in them. "
            "Pruned trials stopped early at an evaluation point and are ranked nowhere. A model is resistant only "
            f"against a search of these trials over {space or 'this space'} (and the listed settings); the figure "
            "shows whether more trials still found stronger attacks. Every trial: search.csv; the study itself: "
            "optuna-dashboard on the storage (OUTPUT/study.db by default).")
    return [Block("Adversary search", in_markdown=True, text=text, items=lines, figure=name)]


def _fmt(v, signed: bool = False) -> str:
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.3g}"
    return str(v)


def _best_so_far(t: pd.DataFrame):
    """The best selection objective among finished feasible trials, against trials run and tokens spent."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for _study, g in t.sort_values("trial").groupby("study"):
        ok = (g.state == Outcome.DONE) & g.feasible.astype(bool)
        best = g.selection_objective.where(ok).fillna(-np.inf).cummax().replace(-np.inf, np.nan)
        label = str(g.model.iloc[0])
        axes[0].step(g.trial + 1, best, where="post", label=label)
        axes[1].step(g.tokens.fillna(0).cumsum(), best, where="post", label=label)
    axes[0].set_xlabel("trials run")
    axes[1].set_xlabel("tokens spent on trials")
    for ax in axes:
        ax.set_ylabel("best selection gain")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_csv(t: pd.DataFrame, out: Path) -> None:
    if t is not None and not t.empty:
        t.drop(columns=["path", "selection_tasks"]).to_csv(out / "search.csv", index=False)

