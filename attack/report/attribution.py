"""The report's view of attribution (runs with --attribution, after `python -m attack attribute`):
per run and task, the documents that carried the most recovery, the recovered questions' top
documents with their first line, whether those mention the entity asked about, and the
methods' recall@10, hit@10 and MRR where the corpus names each document's entity. After
`python -m attack counterfactual` (counterfactual.csv beside the run): per method the recovery
its top-k documents' removal undid, against k, beside the random band, and which method's
documents mattered most."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from attack.report.page import Block, ReportData, figure, pyplot
from attack.rundir import COUNTERFACTUAL_RESULT, RunDir

NOTE = ("Each evaluation point's jump is credited to the documents trained on since the previous point: "
        "gradient = the question's gradient against each document's update (Bergson, LoRA, optimizer-scaled), "
        "TracIn = their raw inner product, beside BM25 and random. Rankings per question: attribution.jsonl. "
        "TrackStar (Bergson) and EK-FAC (Kronfluence), where the counterfactual ran them, score the documents "
        "from the final weights.")


def section(r: ReportData) -> list[Block]:
    """Empty when no run has attribution_summary.json. Writes attribution_quality.csv when any
    run knows its gold documents."""
    blocks, quality = [], []
    for (run, path), meta in r.df.groupby(["run", "path"]).first().iterrows():
        rundir = RunDir(Path(path))
        file = rundir.attribution_summary
        if not file.exists() and not rundir.counterfactual_table.exists():
            continue
        blocks.append(Block(f"{run} ({meta['model']}, {meta['attack']})", level=3))
        summary = json.loads(file.read_text()) if file.exists() else {"tasks": {}, "steps": [None]}
        if rundir.counterfactual_table.exists():
            result = rundir.counterfactual / COUNTERFACTUAL_RESULT
            cost = json.loads(result.read_text()).get("ranking_seconds", {}) if result.exists() else {}
            blocks += counterfactual_blocks(pd.read_csv(rundir.counterfactual_table), summary.get("validation", {}),
                                            r.out, str(run), cost)
        for task, t in summary["tasks"].items():
            lines = [f"{task}: {t['recovered']} of {t['questions']} questions recovered (wrong at step 0, right at "
                     f"step {summary['steps'][-1]})."]
            if t["recovered"] and t["top_documents_mentioning_entity"] is not None:
                share = t["top_documents_mentioning_entity"]
                lines.append(f"{share:.0%} of their top documents mention the entity asked about" + (
                    ": the recovery came from documents about other entities, not from documents stating these answers."
                    if share < 0.05 else "."))
            if t["carried_most"]:
                lines.append("Documents that carried the most recovery (TracIn summed over the recovered questions): "
                             + "; ".join(f"#{d['document']} \"{d['first_line']}\"" for d in t["carried_most"][:3]) + ".")
            for ex in t["recovered_examples"][:3]:
                lines.append(f"Recovered: \"{ex['text']}\" -> {ex['answer']}; top documents: "
                             + "; ".join(f"#{d['document']} \"{d['first_line']}\"" for d in ex["documents"]))
            blocks.append(Block(task, level=4, items=lines))
        for method, subsets in summary.get("validation", {}).items():
            for subset, q in subsets.items():
                quality.append(dict(run=run, model=meta["model"], method=method, questions_scored=subset, **q))
    if not blocks:
        return []
    blocks.insert(0, Block("Which attack documents drove the recovery", text=NOTE))
    if quality:
        table = pd.DataFrame(quality)
        table.to_csv(r.out / "attribution_quality.csv", index=False)
        blocks.append(Block(text="Attribution quality at the last point, gold = the documents about the entity asked "
                                 "about (recall@10: the share of a question's gold documents in its top 10; hit@10: any of "
                                 "them in the top 10; MRR: reciprocal rank of the first):",
                            table=table[table.questions_scored == "all"].drop(columns=["questions_scored"])))
    return blocks


def counterfactual_blocks(table: pd.DataFrame, validation: dict, out: Path, run: str, cost: dict | None = None) -> list[Block]:
    """Recovery removed per method: a sentence, a figure against k with the random band, and
    one table per method (with recall@10 and MRR where the corpus names the gold documents, and
    the seconds its ranking took where counterfactual.json recorded them)."""
    blocks = []
    for held_out, part in table.groupby("held_out"):
        which = "held-out questions (facts no attack document states)" if held_out else "recovered questions"
        blocks.append(Block(f"Removing each method's top documents: {which}", level=4,
                            text=verdict_sentence(part),
                            figure=figure(_plot(part, which), out, f"counterfactual_{run}_{'heldout' if held_out else 'seen'}.png")))
        for method, rows in part.groupby("method", sort=False):
            quality = validation.get(method, {}).get("all", {})
            shown = rows[["k", "documents", "removed", "removed_lo", "removed_hi", "questions", "seeds", "draws"]].copy()
            if quality:
                shown["recall_at_10"], shown["mrr"] = quality.get("recall_at_10"), quality.get("mrr")
            if (cost or {}).get(method) is not None:
                shown["ranking_s"] = round(cost[method], 1)
            blocks.append(Block(text=f"{method}:", table=shown.reset_index(drop=True)))
    return blocks


def verdict_sentence(part: pd.DataFrame) -> str:
    """Which method's documents mattered most, at the largest k all methods share, and whether
    its interval clears the random band's."""
    k = part.groupby("method").k.max().min()
    at = part[part.k == k].set_index("method")
    rand = at.loc["random"] if "random" in at.index else None
    others = at.drop(index="random", errors="ignore")
    if others.empty:
        return f"Removing {k} random documents undid {rand.removed:.0%} of the recovery [{rand.removed_lo:.0%}, {rand.removed_hi:.0%}]."
    best = others.removed.idxmax()
    b = others.loc[best]
    tied = [m for m in others.index if m != best and abs(others.loc[m].removed - b.removed) < 0.005]
    text = (f"Removing the top {k} documents of {best} undid {b.removed:.0%} of the recovery "
            f"[{b.removed_lo:.0%}, {b.removed_hi:.0%}], the most of any method"
            + (f" (tied with {', '.join(tied)})" if tied else "") + f" ({int(b.questions)} questions, {int(b.seeds)} seeds)")
    if rand is None:
        return text + "."
    text += f"; {k} random documents undid {rand.removed:.0%} [{rand.removed_lo:.0%}, {rand.removed_hi:.0%}]"
    if b.removed_lo <= rand.removed_hi:
        return text + f": {best} is not distinguishable from random at this k."
    return text + f", {100 * (b.removed - rand.removed):.0f} points less."


def _plot(part: pd.DataFrame, which: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, rows in part.groupby("method", sort=False):
        rows = rows.sort_values("k")
        if method == "random":
            ax.fill_between(rows.k, rows.removed_lo, rows.removed_hi, color="0.8", label="random (95% interval)")
            ax.plot(rows.k, rows.removed, color="0.5", lw=1)
        else:
            ax.errorbar(rows.k, rows.removed, yerr=[rows.removed - rows.removed_lo, rows.removed_hi - rows.removed],
                        marker="o", capsize=3, label=method)
    ax.set_xlabel("documents removed (k)")
    ax.set_ylabel("recovery removed")
    ax.set_title(which, fontsize=9)
    ax.set_ylim(min(-0.05, part.removed_lo.min() - 0.05), 1.05)
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return fig
