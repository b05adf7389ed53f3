"""The report's view of directional ablation: every attack kind side by side per model (also
whenever the runs are of several kinds), the
dose-response of each ablation run, and the direction each one chose (with its controls read
beside it: a random direction, and a model that never had the knowledge)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from attack.runs import run_records  # noqa: E402


def side_by_side(picked: pd.DataFrame, utility_task: str | None) -> pd.DataFrame:
    """Per model and task: the pre-attack score and each attack setting's final score (mean over
    seeds), in one row, so fine-tuning, ablation and ablate-then-fine-tune read across."""
    last = picked[picked.step == picked.groupby("run").step.transform("max")]
    pre = picked[picked.step == 0].groupby(["model", "task"]).value.mean().rename("pre")
    final = last.groupby(["model", "task", "attack"]).value.mean().unstack("attack")
    table = pd.concat([pre, final], axis=1).reset_index()
    order = [utility_task] if utility_task else []
    table["_u"] = table.task.isin(order)
    return table.sort_values(["model", "_u", "task"]).drop(columns="_u")


def dose_response(df: pd.DataFrame) -> pd.DataFrame:
    """dose.jsonl of every ablation run: model, attack, seed, strength, task, metric, value."""
    return run_records(df, _dose_rows)


def _dose_rows(run: Path) -> list[dict]:
    f = run / "dose.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def three_places(table: pd.DataFrame) -> pd.DataFrame:
    """Floats of a report table to 3 decimals (the text is what markdown and HTML show)."""
    return table.map(lambda v: f"{v:.3f}" if isinstance(v, float) else v)


def chosen_directions(df: pd.DataFrame) -> pd.DataFrame:
    """The direction each ablation run chose (summary.json) and how many candidates kept the KL bound."""
    rows = []
    for (_run, path), meta in df.groupby(["run", "path"]).first().iterrows():
        summary = Path(path) / "summary.json"
        found = json.loads(summary.read_text()).get("ablation") if summary.exists() else None
        if not found:
            continue
        candidates = Path(path) / "candidates.jsonl"
        records = [json.loads(line) for line in candidates.read_text().splitlines()] if candidates.exists() else []
        rows.append(dict(model=meta["model"], attack=meta["attack"], seed=meta["seed"], direction=found.get("kind"),
                         layer=found.get("layer"), position=found.get("position"), dev_score=found.get("dev_score"),
                         kl=found.get("kl"), strength=found.get("strength"),
                         within_bound=f"{sum(r['kept'] for r in records)}/{len(records)}"))
    return pd.DataFrame(rows)


def plot_dose(dose: pd.DataFrame, task: str, refs: dict):
    d = dose[dose.task == task]
    fig, ax = plt.subplots(figsize=(6, 3.6))
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


def ablation_section(df: pd.DataFrame, picked: pd.DataFrame, refs: dict, utility_task: str | None, out: Path,
                     png) -> tuple[list[str], list[str]]:
    """Markdown lines and HTML parts: attacks side by side when the runs are of several kinds
    (attacks_side_by_side.csv), and the ablation runs' directions and dose-response
    (ablation_directions.csv, dose_response.csv). `png(fig)` gives a figure's base64 PNG."""
    if "kind" not in df or df.kind.nunique() < 2 and not (df.kind == "ablation").any():
        return [], []
    side = side_by_side(picked, utility_task)
    side.to_csv(out / "attacks_side_by_side.csv", index=False)
    md = ["", "## Attacks side by side (final score, mean over seeds; pre = step 0)", "", three_places(side).to_markdown(index=False)]
    html = ["<h2>Attacks side by side</h2>" + three_places(side).to_html(index=False)]
    if not (df.kind == "ablation").any():
        return md, html
    directions = chosen_directions(df[df.kind == "ablation"])
    directions.to_csv(out / "ablation_directions.csv", index=False)
    dose = dose_response(df[df.kind == "ablation"])
    md += ["", "## Directional ablation: the chosen directions", "",
           "Chosen on the dev split by the score they restore, within the KL bound; controls: a random direction, "
           "and models that never had the knowledge (filtered).", "", three_places(directions).to_markdown(index=False)]
    html.append("<h2>Directional ablation: chosen directions</h2>" + three_places(directions).to_html(index=False))
    if not dose.empty:
        headline = dose.merge(picked[["task", "metric"]].drop_duplicates(), on=["task", "metric"])
        headline.to_csv(out / "dose_response.csv", index=False)
        table = headline.groupby(["model", "attack", "task", "strength"]).value.mean().unstack("strength").reset_index()
        md += ["", "## Dose-response (score at each ablation strength)", "", three_places(table).to_markdown(index=False)]
        html.append("<h2>Dose-response</h2>" + three_places(table).to_html(index=False))
        for task in sorted(set(headline.task) - {utility_task}):
            b64 = png(plot_dose(headline, task, refs))
            html.append(f"<h3>{task}</h3><img src='data:image/png;base64,{b64}'/>")
    return md, html
