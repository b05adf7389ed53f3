"""The report's view of in-context attacks (kind incontext): each task's score as the model is,
after the adversary's passages or solved examples, and after as many passages of an unrelated
corpus (the control), with the share of questions whose passages held the gold answer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attack.records import read_curve
from attack.report.page import Block, ReportData
from attack.report.runs import runs_with_section
from attack.rundir import RunDir


def table(r: ReportData) -> pd.DataFrame:
    d = runs_with_section(r.picked, "incontext")
    rows = []
    for (model, attack, task), g in d.groupby(["model", "attack", "task"]):
        metric = g.metric.iloc[0]
        control, held = [], []
        for path in g.path.unique():
            run = RunDir(Path(path))
            control += [x["value"] for x in read_curve(run.control) if x["task"] == task and x["metric"] == metric]
            share = ((run.summary or {}).get("incontext") or {}).get("answer_in_passages", {}).get(task) or {}
            if isinstance(share, dict) and share.get("attack") is not None:
                held.append(share["attack"])
        rows.append(dict(model=model, attack=attack, task=task, metric=metric, as_is=g[g.step == 0].value.mean(),
                         in_context=g[g.step == 1].value.mean(),
                         control=sum(control) / len(control) if control else float("nan"),
                         answer_in_passages=sum(held) / len(held) if held else float("nan")))
    return pd.DataFrame(rows)


def section(r: ReportData) -> list[Block]:
    t = table(r)
    if t.empty:
        return []
    t.to_csv(r.out / "incontext.csv", index=False)
    return [Block("Knowledge in the context", in_markdown=True, table=t,
                  text="Each task as the model is (step 0), with the adversary's passages or solved examples before "
                       "every question (step 1), and with as many passages of an unrelated corpus (control). "
                       "answer_in_passages: the share of questions whose passages contain the gold answer's text. "
                       "A model that answers from its context has not lost the ability to use the knowledge; the "
                       "verdict's worst case spans these attacks and the weight attacks (incontext.csv).")]
