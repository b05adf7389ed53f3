"""Does the random projection limit attribution, and what does each method cost? The attribution
world (`demo --attribution`: the toy world's unlearned model, LoRA on single-source facts among
distractors) attacked once per projection size, each ranked by `attribute` and settled by the
counterfactual (gradient and TracIn, k = 10, 20, 40, 60, 3 random draws, training seeds 0 and 1);
then, on the first run, the methods computed after the attack from its final weights (TrackStar at
each projection, EK-FAC), each against the gold documents and by the same counterfactual.

    python bench/attribution_projection.py [--projections 16,64] [--after trackstar,trackstar:64,ekfac] [--workers 2]

Prints JSON lines: {"what": "retrieval", "projection", "method", "recall_at_10", "mrr"},
{"what": "counterfactual", "projection", "method", "k", "held_out", "removed", "removed_lo",
"removed_hi", "questions"}, {"what": "wall", "projection", "attack_s", "attribute_s",
"counterfactual_s", "stored_mb"} and, per method computed after the attack, {"what": "after",
"method", "gold_in_top_k": {k: share}, "seconds", "seconds_per_document", "peak_rss_mb"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    import torch

    from attack.attribution.attribute import attribute
    from attack.config import load_config
    from attack.counterfactual import counterfactual
    from attack.recipes import run_attack
    from attack.records import Status
    from attack.rundir import RunDir
    from attack.toyworld.attribution import KS, attack_config, write_attribution_corpus
    from attack.toyworld.build import BuildSpec, build_world

    p = argparse.ArgumentParser()
    p.add_argument("--projections", default="16,64")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--after", default="trackstar,trackstar:64,ekfac",
                   help="methods computed after the attack from the final weights ('' for none)")
    p.add_argument("--output", default="runs/bench-attribution-projection")
    args = p.parse_args()
    torch.set_num_threads(1)
    world = build_world(Path(".cache/toyworld").absolute(), BuildSpec(), log=lambda m: None)
    write_attribution_corpus(world)
    runs = []
    for size in (int(x) for x in args.projections.split(",")):
        spec = attack_config(world, Path(args.output).absolute(), quick=False)
        spec["attribution"]["projection_dim"] = size
        spec["output"]["run_id"] = f"projection-{size}"
        cfg = load_config(spec)
        run = RunDir.for_config(cfg)
        start = time.perf_counter()
        if run.status != Status.DONE:
            run_attack(cfg, quiet=True)
        attack_s = time.perf_counter() - start
        start = time.perf_counter()
        attribute(run.path)
        attribute_s = time.perf_counter() - start
        quality = json.loads(run.attribution_summary.read_text())["validation"]
        for method in ("gradient", "tracin"):
            q = quality[method]["all"]
            print(json.dumps(dict(what="retrieval", projection=size, method=method, recall_at_10=round(q["recall_at_10"], 3),
                                  mrr=round(q["mrr"], 3), questions=q["questions"])), flush=True)
        start = time.perf_counter()
        table = counterfactual(run.path, ["gradient", "tracin"], KS, draws=3, workers=args.workers, log=lambda m: None)
        counterfactual_s = time.perf_counter() - start
        for r in table.itertuples():
            print(json.dumps(dict(what="counterfactual", projection=size, method=r.method, k=int(r.k),
                                  held_out=bool(r.held_out), removed=round(r.removed, 3), removed_lo=round(r.removed_lo, 3),
                                  removed_hi=round(r.removed_hi, 3), questions=int(r.questions))), flush=True)
        stored = sum(f.stat().st_size for f in run.attribution.train.rglob("*") if f.is_file()) / 1e6
        print(json.dumps(dict(what="wall", projection=size, attack_s=round(attack_s, 1), attribute_s=round(attribute_s, 1),
                              counterfactual_s=round(counterfactual_s, 1), stored_mb=round(stored, 1))), flush=True)
        runs.append(run)
    after = [m for m in args.after.split(",") if m]
    if after:
        after_the_attack(runs[0], world, after, args.workers)


def after_the_attack(run, world: Path, methods: list[str], workers: int) -> None:
    """TrackStar and EK-FAC from the run's final weights: the share of the gold documents among
    each method's top k, its seconds (and per document), the process's peak memory so far; then
    the counterfactual of their rankings."""
    import resource

    from attack.attribution.rankings import rank_documents
    from attack.config import load_config, read_yaml
    from attack.counterfactual import _documents, _measured_tasks, counterfactual, recovered, scores
    from attack.toyworld.attribution import KS

    cfg = load_config(read_yaml(run.config))
    corpus, _ = _documents(cfg)
    step = max(json.loads(line)["step"] for line in open(run.curve))
    asked = [(q.task, q.question) for q in recovered(scores(run, step, set()), _measured_tasks(
        json.loads(run.tasks_path.read_text()), run, None, None), step)]
    gold = {json.loads(line)["doc"] for line in open(world / "corpus" / "gold.jsonl")}
    for method in methods:
        ranking, seconds = rank_documents(method, run, cfg, corpus, asked, step, max(KS), log=lambda m: None)
        share = {k: round(len(set(ranking[:k]) & gold) / k, 3) for k in KS}
        print(json.dumps(dict(what="after", method=method, gold_in_top_k=share, questions=len(asked),
                              documents=len(corpus), seconds=round(seconds, 1),
                              seconds_per_document=round(seconds / len(corpus), 3),
                              peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))), flush=True)
    table = counterfactual(run.path, methods, KS, draws=3, workers=workers, log=lambda m: None)
    for r in table.itertuples():
        print(json.dumps(dict(what="counterfactual", projection=None, method=r.method, k=int(r.k),
                              held_out=bool(r.held_out), removed=round(r.removed, 3), removed_lo=round(r.removed_lo, 3),
                              removed_hi=round(r.removed_hi, 3), questions=int(r.questions))), flush=True)


if __name__ == "__main__":
    main()
