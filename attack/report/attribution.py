"""The report's view of attribution (runs with --attribution, after `python -m attack attribute`):
per run and task, the documents that carried the most recovery, the recovered questions' top
documents with their first line, whether those mention the entity asked about, and the
methods' recall@10, hit@10 and MRR where the corpus names each document's entity."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from attack.report.page import Block, ReportData
from attack.rundir import RunDir

NOTE = ("Each evaluation point's jump is credited to the documents trained on since the previous point: "
        "gradient = the question's gradient against each document's update (Bergson, LoRA, optimizer-scaled), "
        "TracIn = their raw inner product, beside BM25 and random. Rankings per question: attribution.jsonl.")


def section(r: ReportData) -> list[Block]:
    """Empty when no run has attribution_summary.json. Writes attribution_quality.csv when any
    run knows its gold documents."""
    blocks, quality = [], []
    for (run, path), meta in r.df.groupby(["run", "path"]).first().iterrows():
        file = RunDir(Path(path)).attribution_summary
        if not file.exists():
            continue
        summary = json.loads(file.read_text())
        blocks.append(Block(f"{run} ({meta['model']}, {meta['attack']})", level=3))
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
