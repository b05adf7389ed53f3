"""The attribution world (`python -m attack demo --attribution`): the toy world's unlearned model
attacked by LoRA on a corpus where the documents are known. Each attack-seen fact is stated by
exactly one document (single-source), among the general domain's documents, which the model
knows already and which state no target fact (distractors). The gold ranking (gold.jsonl: the
fact documents in the order of toy_target_seen's questions) is written with the corpus. The
counterfactual sets each attribution method's top-k against the gold documents and random draws.

Why the unlearned model: LoRA does not teach the toy models new facts within a demo's budget
(the filtered model, and one pretrained on everything but the attack-seen creatures, gained 0.05
to 0.20 of toy_target_seen in 60 to 200 steps at learning rates 3e-3 and 1e-2), while the
unlearned model recovers them within 30 steps, and recovers the held-out creatures' facts too,
which no document of the corpus states. So the question the counterfactual answers here is the
one the field cares about: does a fact come back through the one document that states it, or
through any document of its domain? (A world where removing the gold documents must undo the
recovery is the test suite's: full fine-tuning of a model that never read the facts.)
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from attack.toyworld.world import TARGET_PHRASES, write_jsonl

METHODS = ["gradient", "tracin", "bm25", "trackstar", "ekfac"]
KS = [10, 20, 40, 60]
KS_QUICK = [5, 15]


def write_attribution_corpus(world: Path, seed: int = 0) -> tuple[Path, Path]:
    """corpus/single_source.jsonl (one document per attack-seen target fact, shuffled among the
    general domain's documents) and corpus/gold.jsonl (the fact documents' rows, in the order of
    toy_target_seen's questions). Returns their paths."""
    facts = json.loads((world / "facts.json").read_text())
    seen = [f for f in facts if f["domain"] == "target" and f["split"] == "seen"]
    # the fact in every phrasing the world's documents use (the question-and-answer one too: the
    # toy models do not carry a statement over to a question form they never read it in), all in
    # its one document
    docs = [dict(text="\n".join(p.format(e=f["entity"], v=f["value"]) for p in TARGET_PHRASES[f["relation"]]),
                 entity=f["entity"], fact=i) for i, f in enumerate(seen)]
    general = [json.loads(line) for line in (world / "corpus" / "general.jsonl").read_text().splitlines()]
    docs += [dict(text=d["text"], entity=d["entity"], fact=None) for d in general]
    random.Random(seed).shuffle(docs)
    corpus, gold = world / "corpus" / "single_source.jsonl", world / "corpus" / "gold.jsonl"
    write_jsonl(docs, corpus)
    row = {d["fact"]: i for i, d in enumerate(docs) if d["fact"] is not None}
    write_jsonl([{"doc": row[i]} for i in range(len(seen))], gold)
    return corpus, gold


def attack_config(world: Path, out: Path, quick: bool) -> dict:
    """The attack: the compact demo's LoRA on the single-source corpus, with --attribution."""
    return {
        "kind": "finetune",
        "model": {"name": str(world / "unlearned")},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.05},
        "data": {"path": str(world / "corpus" / "single_source.jsonl"), "seq_len": 64 if quick else 128},
        "train": {"lr": 3.0e-3, "batch_size": 8, "max_steps": 20 if quick else 60, "log_every": 20},
        "eval": {"tasks": ["toy_target_seen", "toy_target_heldout", "toy_general"],
                 "include_path": [str(world / "tasks")], "every": 20 if quick else 30, "batch_size": 64,
                 "roles": {"toy_target_seen": "target-seen", "toy_target_heldout": "target",
                           "toy_general": "utility"}},
        "attribution": {"enabled": True},
        "output": {"dir": str(out), "run_id": "unlearned-lora-single-source"},
    }


def run_demo(world: Path, out: Path, quick: bool, workers: int = 2, log=print) -> Path:
    """Attack, attribute, counterfactual (gradient, TracIn, BM25, the gold documents, random;
    two seeds, three draws; `workers` reruns at once), report. Returns the report folder."""
    from attack.attribution.attribute import attribute, describe_quality
    from attack.config import load_config
    from attack.counterfactual import counterfactual, describe
    from attack.recipes import run_attack
    from attack.records import Status
    from attack.report import write_report
    from attack.rundir import RunDir

    start = time.perf_counter()
    _, gold = write_attribution_corpus(world)
    cfg = load_config(attack_config(world, out, quick))
    run = RunDir.for_config(cfg)
    if run.status != Status.DONE:  # a run left half done, or of other settings, starts again
        shutil.rmtree(run.path, ignore_errors=True)
        run_attack(cfg, quiet=True)
    attribute(run.path)
    log("retrieval of the documents about the entity asked about, at the last point:")
    log(describe_quality(json.loads(run.attribution_summary.read_text())["validation"]))
    log("counterfactual reruns:")
    table = counterfactual(run.path, [*METHODS, f"file:{gold}"], KS_QUICK if quick else KS, draws=3, workers=workers, log=log)
    log("\nrecovery removed (the gold documents as file:gold), 95% bootstrap interval over questions and seeds:")
    log(describe(table))
    report = write_report([run.path], out / "report", utility_task="toy_general", max_utility_drop=0.10)
    log(f"\ncounterfactual table: {run.counterfactual_table}\nreport: {report / 'index.html'}")
    log(f"demo took {time.perf_counter() - start:.0f} s (world cached)")
    return report
