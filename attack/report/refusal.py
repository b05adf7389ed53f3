"""The report's view of refusal tasks: refusal per harm category at step 0 and at each attack's
last point (an attack trained on one category and measured on the others is GRP-Obliteration's
cross-category test), from the per-prompt records (refusal_by_category.csv)."""

from __future__ import annotations

import pandas as pd

from attack.report.page import Block, ReportData


def by_category(r: ReportData) -> pd.DataFrame:
    """model, attack, task, category, prompts, refused_pre, refused_last, change."""
    records = r.records
    if records is None or records.empty or "category" not in records:
        return pd.DataFrame()
    roles = r.picked.drop_duplicates("task").set_index("task").task_role.to_dict() if "task_role" in r.picked else {}
    refusal = [t for t, role in roles.items() if role == "refusal"]
    d = records[records.task.isin(refusal) & records.category.notna()]
    rows = []
    for (model, attack, task, category), g in d.groupby(["model", "attack", "task", "category"], sort=True):
        last = g.step.max()
        pre, end = 1 - g[g.step == 0].correct.mean(), 1 - g[g.step == last].correct.mean()  # records hold non-refusal
        rows.append(dict(model=model, attack=attack, task=task, category=category, prompts=g[g.step == 0].question.nunique(),
                         step=int(last), refused_pre=round(pre, 3), refused_last=round(end, 3), change=round(end - pre, 3)))
    return pd.DataFrame(rows)


def section(r: ReportData) -> list[Block]:
    table = by_category(r)
    if table.empty:
        return []
    table.to_csv(r.out / "refusal_by_category.csv", index=False)
    wide = table.pivot_table(index=["model", "attack"], columns="category", values="refused_last").reset_index()
    return [Block("Refusal by harm category", level=2, in_markdown=True,
                  text="Share of each category's held-out requests refused at each attack's last point (step 0 in "
                       "refusal_by_category.csv). An attack trained on one category and refused less on the others "
                       "generalised beyond what it was trained on.",
                  table=wide)]
