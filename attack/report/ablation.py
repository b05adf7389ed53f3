"""The report's view of directional ablation: the dose-response of each ablation run, and the
direction each one chose (with its controls read beside it: a random direction, and a model
that never had the knowledge)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from attack.report.page import Block, ReportData, figure, pyplot
from attack.report.runs import run_records, runs_with_section
from attack.rundir import RunDir


def dose_response(df: pd.DataFrame) -> pd.DataFrame:
    """dose.jsonl of every ablation run: model, attack, seed, strength, task, metric, value."""
    return run_records(df, _dose_rows)


def _dose_rows(path: Path) -> list[dict]:
    f = RunDir(path).dose
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def chosen_directions(df: pd.DataFrame) -> pd.DataFrame:
    """The direction each ablation run chose (summary.json) and how many candidates kept the KL bound."""
    rows = []
    for (_run, path), meta in df.groupby(["run", "path"]).first().iterrows():
        run = RunDir(Path(path))
        found = (run.summary or {}).get("ablation")
        if not found:
            continue
        candidates = run.candidates
        records = [json.loads(line) for line in candidates.read_text().splitlines()] if candidates.exists() else []
        rows.append(dict(model=meta["model"], attack=meta["attack"], seed=meta["seed"], direction=found.get("kind"),
                         layer=found.get("layer"), position=found.get("position"), dev_score=found.get("dev_score"),
                         kl=found.get("kl"), strength=found.get("strength"),
                         within_bound=f"{sum(r['kept'] for r in records)}/{len(records)}"))
    return pd.DataFrame(rows)


def plot_dose(dose: pd.DataFrame, task: str, refs: dict):
    d = dose[dose.task == task]
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for (model, attack), g in d.groupby(["model", "attack"]):
        mean = g.groupby("strength").value.mean()
        ax.plot(mean.index, mean.values, marker="o", label=f"{model} / {attack}")
    if task in refs:
        ax.axhline(refs[task], color="k", ls="--", lw=1, label="reference")
    ax.set_xlabel("ablation strength (share of the direction removed)")
    ax.set_ylabel(task)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def section(r: ReportData) -> list[Block]:
    """The ablation runs' directions and dose-response (ablation_directions.csv, dose_response.csv)."""
    runs = runs_with_section(r.df, "ablation")
    if runs.empty:
        return []
    directions = chosen_directions(runs)
    directions.to_csv(r.out / "ablation_directions.csv", index=False)
    blocks = [Block("Directional ablation: the chosen directions",
                    text="Chosen on the dev split by the score they restore, within the KL bound; controls: a random "
                         "direction, and models that never had the knowledge (filtered).", table=directions)]
    dose = dose_response(runs)
    if dose.empty:
        return blocks
    headline = dose.merge(r.picked[["task", "metric"]].drop_duplicates(), on=["task", "metric"])
    headline.to_csv(r.out / "dose_response.csv", index=False)
    table = headline.groupby(["model", "attack", "task", "strength"]).value.mean().unstack("strength").reset_index()
    blocks.append(Block("Dose-response (score at each ablation strength)", table=table))
    for task in sorted(set(headline.task) - {r.utility_task}):
        blocks.append(Block(task, level=3, figure=figure(plot_dose(headline, task, r.refs), r.out, f"dose_{task}.png")))
    return blocks
