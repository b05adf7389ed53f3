"""The report's sections that every set of runs gets, in the order the page shows them; the
sections of one attack kind live beside this file (ablation.py, grpo.py), and attribution.py
for runs that collected it. Each is `section(r: ReportData) -> list[Block]`."""

from __future__ import annotations

import pandas as pd

from attack.report.figures import attack_colors, plot_task
from attack.report.page import Block, ReportData, figure
from attack.report.runs import environments, kinds_with
from attack.report.tables import NOISE_POINTS

PAIRED_NOTE = ("Each point scores the same questions as step 0: change = mean per-question difference from step 0 "
               "(seeds averaged per question), 95% percentile bootstrap over questions; recovered = change / (reference "
               "- pre). 'reached at step N': the first point whose interval lies above the threshold; 'not reached': "
               "the upper end of the interval at the last point bounds what recovery is excluded.")


def header(r: ReportData) -> list[Block]:
    label = r.metric or "each task's headline metric"
    return [Block(f"Recovery report ({label}, x = {r.x})", level=1, in_markdown=True,
                  text=f"{_count(r.df.run.nunique(), 'run')} of {_count(r.df.model.nunique(), 'model')}. Reference = pre-attack score of "
                       "the reference (else unfiltered) model; recovered = (score - pre) / (reference - pre). "
                       "Benchmarks that are groups are shown by their group score; subtasks are in "
                       "recovery_subtasks.csv. The figures, tables and sections of every kind are in index.html.")]


def published(r: ReportData) -> list[Block]:
    if not r.warnings:
        return []
    return [Block("WARNING: step 0 differs from the published score, or a run changed nothing (read before the "
                  "numbers)", items=r.warnings, alert=True, in_markdown=True)]


def failed(r: ReportData) -> list[Block]:
    if not r.failed:
        return []
    return [Block("Failed runs (not in the tables, the worst case or the figures)", in_markdown=True,
                  items=[f"{run}: {error}" for run, error in r.failed.items()])]


def curves(r: ReportData) -> list[Block]:
    """A figure per task, a panel per model; each attack setting keeps its colour in all of them."""
    colors = attack_colors(r.picked.attack)
    last = r.picked.groupby("attack").step.max()
    one_shot = set(last[last <= 1].index)  # no optimizer steps: the edited model at step 1
    blocks = [Block("Recovery curves", text="A panel per model, the same axes in each; a colour per attack setting "
                    "in every figure; diamonds: attacks without optimizer steps (the edited model at step 1).")]
    for task in sorted(r.picked.task.unique()):
        name = figure(plot_task(r.picked, task, r.x, r.refs, colors, one_shot), r.out, f"curve_{task}.png")
        blocks.append(Block(task, level=3, figure=name))
    return blocks


def files(r: ReportData) -> list[Block]:
    """Where to read on: every table of the report as CSV, and the page."""
    return [Block("Files", in_markdown=True, links=["index.html", *sorted(p.name for p in r.out.glob("*.csv"))])]


def paired(r: ReportData) -> list[Block]:
    """recovery_paired.csv (claims per model x attack x target task) and paired_curves.csv (every
    point with its interval and flipped questions), from the runs' per-question records."""
    from attack.report.paired import paired_table

    if r.records.empty:
        return []
    r.paired_curves.to_csv(r.out / "paired_curves.csv", index=False)
    table = paired_table(r.records, r.refs)
    table.to_csv(r.out / "recovery_paired.csv", index=False)
    if "recovered_final" not in table.columns:
        return []
    keep = ["model", "attack", "task", "questions", "seeds", "recovered_final", "recovered_final_lo",
            "recovered_final_hi", "claim_50%", "claim_90%"]
    shown = table[table.recovered_final.notna()]  # rows with a gap to recover (not the reference itself)
    return [Block("Paired recovery (per question, 95% bootstrap over questions; definitions in "
                  "attack/report/paired.py)", text=PAIRED_NOTE, table=shown[[c for c in keep if c in shown.columns]])]


def recovery_table(r: ReportData) -> list[Block]:
    t = r.table
    short = ["model", "attack", "task", "metric", "seeds", "pre", "final", "final_lo", "final_hi", "max", "reference",
             *[c for c in t.columns if c.startswith("recovered@") and not c.endswith(("_lo", "_hi"))],
             "steps_to_50%", "steps_to_90%", "tokens_to_90%", "auc", "noise", "broken_at"]
    blocks = [Block("Recovery table", table=t[[c for c in short if c in t.columns]],
                    text=f"noise: the standard deviation of each curve's last {NOISE_POINTS} points (seeds averaged).")]
    # accuracy's change within its own noise: a smoother measure of the same questions says more
    quiet = t[(t.metric == "acc") & ((t.final - t.pre).abs() < 2 * t.noise)] if "noise" in t else t.iloc[:0]
    if len(quiet) and r.metric is None:
        items = [f"{x.model} / {x.attack} / {x.task}: change {x.final - x.pre:+.3f}, noise {x.noise:.3f}"
                 for x in quiet.itertuples()]
        blocks.append(Block("Accuracy changes within their noise (read correct_prob: --metric correct_prob, or the "
                            "held-out texts' bits per byte)", level=3, items=items, in_markdown=True))
    return blocks


def worst_case(r: ReportData) -> list[Block]:
    return [Block("Worst case per model (best attack setting at each budget)", table=r.worst)]


def side_by_side(r: ReportData) -> list[Block]:
    """Per model and task: the pre-attack score and each attack setting's final score (mean over
    seeds) in one row, so attacks of several kinds read across (attacks_side_by_side.csv)."""
    kinds = set(r.df.kind)
    if len(kinds) < 2 and not kinds_with(kinds, "curve_offset"):
        return []
    picked = r.picked
    last = picked[picked.step == picked.groupby("run").step.transform("max")]
    pre = picked[picked.step == 0].groupby(["model", "task"]).value.mean().rename("pre")
    final = last.groupby(["model", "task", "attack"]).value.mean().unstack("attack")
    table = pd.concat([pre, final], axis=1).reset_index()
    table["_u"] = table.task == r.utility_task
    table = table.sort_values(["model", "_u", "task"]).drop(columns="_u")
    table.to_csv(r.out / "attacks_side_by_side.csv", index=False)
    return [Block("Attacks side by side (final score, mean over seeds; pre = step 0)", table=table)]


def environment(r: ReportData) -> list[Block]:
    return [Block("Environment of the runs", items=environments(r.df))]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
