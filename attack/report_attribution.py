"""The report's view of attribution (runs with --attribution, after `python -m attack attribute`):
per run and task, the documents that carried the most recovery, the recovered questions' top
documents with their first line, whether those mention the entity asked about, and the
methods' recall@10 where the corpus names each document's entity."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd


def attribution_section(df: pd.DataFrame, out: Path) -> tuple[list[str], list[str]]:
    """Markdown lines and HTML parts; empty when no run has attribution_summary.json. Writes
    attribution_quality.csv when any run knows its gold documents."""
    md, parts, quality = [], [], []
    for (run, path), meta in df.groupby(["run", "path"]).first().iterrows():
        file = Path(path) / "attribution_summary.json"
        if not file.exists():
            continue
        summary = json.loads(file.read_text())
        md += ["", f"### {run} ({meta['model']}, {meta['attack']})"]
        parts.append(f"<h3>{html.escape(run)} ({html.escape(str(meta['model']))}, {html.escape(str(meta['attack']))})</h3>")
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
            md += ["", *[f"- {line}" for line in lines]]
            parts.append(f"<h4>{html.escape(task)}</h4><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
        for method, subsets in summary.get("validation", {}).items():
            for subset, q in subsets.items():
                quality.append(dict(run=run, model=meta["model"], method=method, questions_scored=subset, **q))
    if not parts:
        return [], []
    note = ("Each evaluation point's jump is credited to the documents trained on since the previous point: "
            "gradient = the question's gradient against each document's update (Bergson, LoRA, optimizer-scaled), "
            "TracIn = their raw inner product, beside BM25 and random. Rankings per question: attribution.jsonl.")
    md = ["", "## Which attack documents drove the recovery", "", note, *md]
    parts = [f"<h2>Which attack documents drove the recovery</h2><p>{html.escape(note)}</p>", *parts]
    if quality:
        table = pd.DataFrame(quality)
        table.to_csv(out / "attribution_quality.csv", index=False)
        shown = table[table.questions_scored == "all"].drop(columns=["questions_scored"]).round(3)
        md += ["", "Attribution quality at the last point, gold = the documents about the entity asked about "
               "(recall@10: a gold document in the top 10):", "", shown.to_markdown(index=False)]
        parts.append("<p>Attribution quality at the last point (gold = documents about the entity asked about)</p>"
                     + shown.to_html(index=False))
    return md, parts
