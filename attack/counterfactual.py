"""`python -m attack counterfactual RUN_DIR --task T --k 10`: does removing the attributed
documents undo the recovery? A driver, like sweep.py: it reruns attacks through the recipes.

The question set is T's questions recovered at step N (wrong at step 0, right at N; all of T's
questions when none recovered). Its top-k documents fuse the method's per-question rankings of
attribution.jsonl up to N (the sum of 1/rank over questions and evaluation points). The attack
is run again, same settings and seed, to step N, once without those k documents and once per
draw without k documents drawn at random from the rest of the corpus. The set's accuracy at N in
each run, beside the original's, goes to counterfactual/counterfactual.json: if the attribution
found what drove the recovery, removing its documents lowers the set's accuracy more than
removing random ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attack.attribution.attribute import correctness
from attack.errors import ArgumentParser, UserError
from attack.files import write_atomic
from attack.rundir import COUNTERFACTUAL_RESULT, RunDir, Status


def question_set(run: RunDir, task: str, step: int) -> tuple[list[int], str]:
    correct = correctness(run)
    asked = sorted({q for t, q, _s in correct if t == task})
    if not asked:
        raise UserError(f"task '{task}' was not evaluated in {run.path}; give one of its tasks with --task")
    recovered = [q for q in asked if correct.get((task, q, 0)) == 0 and correct.get((task, q, step)) == 1]
    return (recovered, "recovered") if recovered else (asked, "all (none recovered)")


def top_documents(run: RunDir, task: str, questions: list[int], step: int, method: str, k: int) -> list[int]:
    """The k documents with the highest sum of 1/rank over the questions' rankings up to `step`."""
    score: dict[int, float] = {}
    wanted = set(questions)
    with open(run.attribution_rows) as f:
        for line in f:
            r = json.loads(line)
            if r["method"] == method and r["task"] == task and r["question"] in wanted and r["step"] <= step:
                score[r["document"]] = score.get(r["document"], 0.0) + 1.0 / r["rank"]
    return sorted(score, key=lambda d: (-score[d], d))[:k]


def accuracy(run: RunDir, task: str, questions: list[int], step: int) -> float:
    correct = correctness(run)
    return float(np.mean([correct[(task, q, step)] for q in questions]))


def counterfactual(run_path: str | Path, task: str, k: int = 10, method: str = "gradient", step: int | None = None,
                   draws: int = 1, seed: int = 0, trust_remote_code: bool = False) -> dict:
    from attack.config import load_config, read_yaml, refuse_file_trust
    from attack.config.files import grant_code
    from attack.data import load_corpus
    from attack.recipes import run_attack

    run = RunDir(Path(run_path))
    if not run.attribution_rows.exists():
        raise UserError(f"{run.path} has no {run.attribution_rows.name}; run `python -m attack attribute {run.path}` first")
    cfg = load_config(read_yaml(run.config))
    refuse_file_trust(cfg, f"the run's {run.config}", trust_remote_code)  # the reruns would run its code
    grant_code(trust_remote_code)
    if not cfg.supervised:
        raise UserError(f"{run.path} is a {cfg.kind} run; the counterfactual reruns supervised fine-tuning attacks")
    steps = sorted({json.loads(line)["step"] for line in open(run.attribution_rows)})
    step = step or steps[-1]
    if step not in steps:
        raise UserError(f"--step {step} is not an evaluation point of {run.path} (points: {', '.join(map(str, steps))})")
    questions, which = question_set(run, task, step)
    removed = top_documents(run, task, questions, step, method, k)
    if len(removed) < k:
        raise UserError(f"the {method} rankings name only {len(removed)} documents for {task}; lower --k")
    corpus = load_corpus(cfg.data)
    rng = np.random.default_rng(seed)
    rest = np.setdiff1d(np.arange(len(corpus)), removed)
    variants = {f"without-top{k}-{method}": removed}
    for d in range(draws):
        variants[f"without-random{k}-draw{d}"] = sorted(int(i) for i in rng.choice(rest, size=k, replace=False))

    out = run.counterfactual_dir(task, method, k, step)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(task=task, step=step, k=k, method=method, question_set=which, questions=len(questions),
                  pre=accuracy(run, task, questions, 0), original=accuracy(run, task, questions, step), runs={})
    for name, drop in variants.items():
        data = out / f"{name}.jsonl"
        settings = cfg.model_dump(mode="python")
        settings["data"].update(path=str(data), name=None, split="train")
        settings["train"]["max_steps"] = step
        settings["attribution"]["enabled"] = False
        settings["output"].update(dir=str(out / "runs"), run_id=name, resume=False)
        rerun_cfg = load_config(settings)
        rerun = RunDir.for_config(rerun_cfg)
        if rerun.status != Status.DONE:  # else: rerun earlier with these very documents removed
            corpus.select(np.setdiff1d(np.arange(len(corpus)), drop)).to_json(str(data), lines=True, force_ascii=False)
            run_attack(rerun_cfg, quiet=True)
        result["runs"][name] = dict(removed=[int(d) for d in drop], accuracy=accuracy(rerun, task, questions, step),
                                    run=str(rerun.path))
    top = result["runs"][f"without-top{k}-{method}"]["accuracy"]
    rand = float(np.mean([v["accuracy"] for n, v in result["runs"].items() if "random" in n]))
    result.update(without_top=top, without_random=rand,
                  recovery=dict(original=result["original"] - result["pre"], without_top=top - result["pre"],
                                without_random=rand - result["pre"]))
    write_atomic(out / COUNTERFACTUAL_RESULT, json.dumps(result, indent=1))
    return dict(result, file=str(out / COUNTERFACTUAL_RESULT))


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack counterfactual", description="Rerun the attack without the top-k "
                       "attributed documents of a task's recovered questions, and without k random documents.")
    p.add_argument("run", help="a run directory with attribution.jsonl")
    p.add_argument("--task", required=True, help="the evaluated task whose recovered questions form the set")
    p.add_argument("--k", type=int, default=10, help="documents removed (default 10)")
    p.add_argument("--method", default="gradient", choices=["gradient", "tracin", "bm25", "random"],
                   help="whose ranking picks the documents (default gradient)")
    p.add_argument("--step", type=int, help="evaluation point (default: the last)")
    p.add_argument("--draws", type=int, default=1, help="random removals to average (default 1)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a model whose run set model.trust_remote_code run its own code in the reruns")
    args = p.parse_args(argv)
    if args.k < 1 or args.draws < 1:
        raise UserError(f"--k and --draws must be at least 1, got --k {args.k} --draws {args.draws}")
    r = counterfactual(args.run, args.task, args.k, args.method, args.step, args.draws,
                       trust_remote_code=args.trust_remote_code)
    print(f"{r['task']}, {r['questions']} questions ({r['question_set']}), accuracy at step {r['step']}: "
          f"step 0 {r['pre']:.3f}, attack {r['original']:.3f}, without the top {r['k']} ({r['method']}) "
          f"{r['without_top']:.3f}, without {r['k']} random {r['without_random']:.3f}")
    print(f"counterfactual: {r['file']}")
    return 0
