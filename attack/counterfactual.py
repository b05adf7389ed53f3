"""`python -m attack counterfactual RUN_DIR --methods gradient,bm25,file:gold.jsonl --k 5,10,20`:
which method's documents drove the recovery, settled by removing them. A driver, like sweep.py:
it reruns the attack through the recipes.

The questions are those the run recovered at step N (wrong at step 0, right at N; for a refusal
task, refused at 0 and not at N) in the measured tasks (--task; default: the run's target,
target-seen and refusal tasks). Each method ranks the attack documents once: `gradient`,
`tracin` and `bm25` fuse their per-question rankings of attribution.jsonl up to N over the
recovered questions (the sum of 1/rank); `file:PATH` reads a ranking from a JSONL of corpus row
indices in rank order ({"doc": N}), so an outside method or the known gold documents take part.
For every method and k, the attack is rerun to N without the method's top k documents, per
training seed (--seeds); `random` is --draws draws of k documents, the same draws beside every
method. A seed other than the run's own gets its own rerun on the whole corpus (its original).

The measure, per seed and recovered question: recovery removed = (original - without) /
(original - pre), which for a question recovered at N (pre 0, original 1) is 1 - its score
without the documents (random: the mean over draws). The mean over questions and seeds, with a
95% bootstrap interval (questions resampled within each seed), goes to counterfactual.csv beside
the run, one row per method and k, apart for the held-out questions (tasks of role target in a
run that also has target-seen tasks, or --held-out): those whose facts no attack document states.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attack.attribution.rankings import check_sources, known_method, rank_documents
from attack.errors import ArgumentParser, UserError
from attack.files import write_atomic
from attack.records import Status
from attack.rundir import COUNTERFACTUAL_RESULT, RunDir
from attack.signals import worker_pool
from eval_callbacks.task_lookup import ORIENTED

RANDOM = "random"
MEASURED_ROLES = ("target", "target-seen", "refusal")
COLUMNS = ["method", "k", "documents", "removed", "removed_lo", "removed_hi", "questions", "seeds", "draws", "held_out"]
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Question:
    task: str
    question: int
    held_out: bool


def scores(run: RunDir, step: int, flip: set[str]) -> dict[tuple[str, int], dict[int, float]]:
    """{(task, question): {step: score}}, oriented so that higher is the suppressed side's way
    back (a refusal task's score is 1 - refused)."""
    from eval_callbacks.callback import read_samples

    out: dict = {}
    for r in read_samples(run.samples):
        if r["step"] in (0, step) and isinstance(r["correct"], (int, float)):
            value = float(r["correct"])
            out.setdefault((r["task"], r["question"]), {})[r["step"]] = 1 - value if r["task"] in flip else value
    return out


def recovered(score: dict, tasks: dict[str, bool], step: int) -> list[Question]:
    """The questions of `tasks` (task -> held out) wrong at step 0 and right at `step`."""
    return [Question(t, q, tasks[t]) for (t, q), s in sorted(score.items())
            if t in tasks and s.get(0, 1) < 0.5 and s.get(step, 0) >= 0.5]


def removal_measure(per_seed: dict[int, np.ndarray], rng: np.random.Generator) -> tuple[float, float, float]:
    """The mean recovery removed over every (seed, question) and its 95% bootstrap interval,
    the questions resampled within each seed (a seed's questions share its training run)."""
    pooled = np.concatenate(list(per_seed.values()))
    means = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        means[b] = np.concatenate([v[rng.integers(0, len(v), len(v))] for v in per_seed.values()]).mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(pooled.mean()), float(lo), float(hi)


def _documents(cfg):
    """The documents the attack trains on (a datasets.Dataset) and the config key that names them."""
    if cfg.supervised:
        from attack.documents import load_corpus

        return load_corpus(cfg.data), "data"
    if cfg.kind == "grpo":
        from attack.rewards import load_reward_split

        return load_reward_split(cfg.grpo), "grpo"
    raise UserError(f"a {cfg.kind} run trains on no documents; the counterfactual reruns fine-tuning (finetune) "
                    "or GRPO runs without some of their documents")


def _measured_tasks(info: dict, run: RunDir, asked: list[str] | None, held_out: list[str] | None) -> dict[str, bool]:
    """The measured tasks (tasks.json's `info`), each with whether its facts are held out."""
    if asked:
        unknown = [t for t in asked if t not in info]
        if unknown:
            raise UserError(f"task {', '.join(unknown)} was not evaluated in {run.path}; give one of its tasks "
                            f"({', '.join(info)}) with --task")
    roles = {t: e.get("role") for t, e in info.items()}
    tasks = asked or [t for t, r in roles.items() if r in MEASURED_ROLES] or \
        [t for t, e in info.items() if e.get("requested", True) and roles[t] not in ("utility", "over-refusal")]
    seen = "target-seen" in roles.values()
    return {t: (t in (held_out or [])) or (held_out is None and seen and roles[t] == "target") for t in tasks}


def counterfactual(run_path: str | Path, methods: list[str], ks: list[int], tasks: list[str] | None = None,
                   step: int | None = None, draws: int = 3, seeds: list[int] | None = None,
                   held_out: list[str] | None = None, trust_remote_code: bool = False, workers: int = 1,
                   log=print) -> pd.DataFrame:
    """Run every method's reruns (those already done are reused) and write counterfactual.csv
    and counterfactual/counterfactual.json into the run; returns the table."""
    from attack.config import load_config, read_yaml, refuse_file_trust
    from attack.config.files import grant_code

    run = RunDir(Path(run_path))
    if run.status != Status.DONE:
        raise UserError(f"{run.path} is not a finished run (status {run.status.value}); finish or rerun it first")
    cfg = load_config(read_yaml(run.config))
    refuse_file_trust(cfg, f"the run's {run.config}", trust_remote_code)  # the reruns would run its code
    grant_code(trust_remote_code)
    check_sources(run, methods)
    corpus, key = _documents(cfg)
    steps = sorted({json.loads(line)["step"] for line in open(run.curve)})
    step = step or steps[-1]
    if step not in steps or step == 0:
        raise UserError(f"--step {step} is not a later evaluation point of {run.path} (points: {', '.join(map(str, steps))})")
    info = json.loads(run.tasks_path.read_text()) if run.tasks_path.exists() else {}
    measured = _measured_tasks(info, run, tasks, held_out)
    flip = {t for t, e in info.items() if e.get("metric") in ORIENTED}  # the report's orientation: refused -> 1 - refused
    seeds = seeds or [cfg.seed, cfg.seed + 1]
    question_set = recovered(scores(run, step, flip), measured, step)
    if not question_set:
        raise UserError(f"no question of {', '.join(measured)} was recovered by step {step} (wrong at 0, right at "
                        f"{step}); nothing to undo. Pick a later --step or other --task")

    # 1. Every method's ranking of the documents, once (from the run at its own seed).
    n = len(corpus)
    ranking, cost = {}, {}
    for m in methods:
        if m != RANDOM:
            ranking[m], cost[m] = rank_documents(m, run, cfg, corpus, [(q.task, q.question) for q in question_set], step,
                                                 max(ks), trust_remote_code, log)
    draws_of = {k: [sorted(random.Random(f"{k}:{d}").sample(range(n), min(k, n))) for d in range(draws)] for k in ks}
    removals = {(m, k, 0): r[:k] for m, r in ranking.items() for k in ks}
    removals |= {(RANDOM, k, d): drop for k, drawn in draws_of.items() for d, drop in enumerate(drawn)}

    # 2. The reruns: per seed, its original (the run itself at its own seed) and each removal.
    out = run.counterfactual
    planned: dict = {}
    for seed in seeds:
        if seed != cfg.seed:
            planned[(seed, None)] = _rerun(cfg, corpus, key, [], out, f"original-seed{seed}", seed, step)
        for (m, k, d), drop in removals.items():
            name = f"{_slug(m)}-k{k}" + (f"-draw{d}" if m == RANDOM else "") + f"-seed{seed}"
            planned[(seed, (m, k, d))] = _rerun(cfg, corpus, key, drop, out, name, seed, step)
    pending = [c for c in planned.values() if RunDir.for_config(c).status != Status.DONE]
    log(f"  {len(planned)} reruns, {len(planned) - len(pending)} done before" + (f", {workers} at a time" if workers > 1 else ""))
    run_all(pending, workers)
    dirs = {at: RunDir.for_config(c) for at, c in planned.items()}
    if cfg.seed in seeds:
        dirs[(cfg.seed, None)] = run
    per_run = {at: (r, scores(r, step, flip)) for at, r in dirs.items()}
    recovered_in = {seed: recovered(per_run[(seed, None)][1], measured, step) for seed in seeds}

    # 3. Recovery removed on each seed's own recovered questions, by method, k and held out.
    rng = np.random.default_rng(0)
    rows = []
    for m in [*ranking, RANDOM]:
        for k in ks:
            for hidden in sorted({q.held_out for q in question_set}):
                per_seed = {}
                for seed in seeds:
                    mine = [q for q in recovered_in[seed] if q.held_out == hidden]
                    if not mine:
                        continue
                    keep = [per_run[(seed, (m, k, d))][1] for d in range(draws if m == RANDOM else 1)]
                    per_seed[seed] = np.array([1 - np.mean([s.get((q.task, q.question), {}).get(step, 0.0) for s in keep])
                                               for q in mine])
                if not per_seed:
                    continue
                removed, lo, hi = removal_measure(per_seed, rng)
                rows.append(dict(method=m, k=k, documents=len(removals[(m, k, 0)]), removed=removed, removed_lo=lo,
                                 removed_hi=hi, questions=sum(map(len, per_seed.values())), seeds=len(per_seed),
                                 draws=draws if m == RANDOM else 0, held_out=hidden))
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_atomic(run.counterfactual_table, table.to_csv(index=False))
    detail = dict(step=step, tasks=measured, seeds=seeds, draws=draws, ks=ks, methods=methods, ranking_seconds=cost,
                  recovered=[q.__dict__ for q in question_set],
                  removals=[dict(method=m, k=k, draw=d, documents=[int(x) for x in drop]) for (m, k, d), drop in removals.items()],
                  runs={f"{s}:{'original' if v is None else '/'.join(map(str, v))}": str(r.path) for (s, v), (r, _) in per_run.items()})
    write_atomic(out / COUNTERFACTUAL_RESULT, json.dumps(detail, indent=1))
    return table


def _slug(method: str) -> str:
    return "file-" + Path(method[5:]).stem if method.startswith("file:") else method.replace(":", "-p")


def _rerun(cfg, corpus, key: str, drop: list[int], out: Path, name: str, seed: int, step: int):
    """The config of the attack again, at `seed`, to `step`, without the documents `drop` (their
    corpus written beside it unless the rerun is done); evaluated at step 0 and `step` only
    (nothing else is read)."""
    from attack.config import load_config

    data = out / "corpora" / f"{name}.jsonl"
    settings = cfg.model_dump(mode="python")
    if key == "data":
        settings["data"].update(path=str(data), name=None, split="train")
    else:
        settings["grpo"]["prompts_path"] = str(data)
    settings["train"]["seed"] = seed
    settings["train"]["max_steps"] = step
    settings["eval"].update(schedule="linear", every=step, heldout_texts={}, kl_task=None)
    if "attribution" in settings:
        settings["attribution"]["enabled"] = False
    settings["output"].update(dir=str(out / "runs"), run_id=name, resume=False)
    rerun_cfg = load_config(settings)
    if RunDir.for_config(rerun_cfg).status != Status.DONE:
        data.parent.mkdir(parents=True, exist_ok=True)
        corpus.select(np.setdiff1d(np.arange(len(corpus)), drop)).to_json(str(data), lines=True, force_ascii=False)
    return rerun_cfg


def run_all(configs: list, workers: int) -> None:
    """The reruns, `workers` at a time, each in a process of its own (spawned: it inherits this
    process's grant of code, not its torch state)."""
    from attack.recipes import run_attack

    if workers <= 1 or len(configs) <= 1:
        for c in configs:
            run_attack(c, quiet=True)
        return
    with worker_pool(workers) as run:
        run(_run_in_process, [c.model_dump(mode="python") for c in configs])


def _run_in_process(settings: dict) -> None:
    import os

    import torch

    from attack.__main__ import quiet_libraries
    from attack.config import load_config
    from attack.recipes import run_attack

    if "OMP_NUM_THREADS" not in os.environ:  # the workers share the cores: one thread each
        torch.set_num_threads(1)
    quiet_libraries()
    run_attack(load_config(settings), quiet=True)


def describe(table: pd.DataFrame) -> str:
    """The table as printed: one line per method, k and question set."""
    lines = []
    for r in table.itertuples():
        which = "held-out" if r.held_out else "recovered"
        lines.append(f"  {r.method:<24} k={r.k:<4} recovery removed {r.removed:.2f} [{r.removed_lo:.2f}, {r.removed_hi:.2f}]"
                     f"  ({r.questions} {which} questions, {r.seeds} seeds" + (f", {r.draws} draws)" if r.draws else ")"))
    return "\n".join(lines)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated whole numbers, got '{text}'") from None
    least = 0 if flag == "--seeds" else 1
    if not values or min(values) < least:
        raise UserError(f"{flag} must be {'non-negative' if least == 0 else 'at least 1'}, got '{text}'")
    return sorted(set(values))


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack counterfactual", description="Rerun the attack without each method's "
                       "top-k documents (and k random ones) and measure the share of the recovery each removal undoes.")
    p.add_argument("run", help="a finished run directory of a finetune or grpo attack")
    p.add_argument("--methods", default="gradient,bm25,random",
                   help="comma-separated: gradient, tracin, bm25 (from attribution.jsonl), trackstar or "
                        "trackstar:PROJECTION (Bergson's TrackStar on the final weights, projection 16 by default), "
                        "random, file:PATH (a JSONL of {\"doc\": N} corpus rows in rank order) "
                        "(default gradient,bm25,random)")
    p.add_argument("--k", default="10", help="documents removed, comma-separated (default 10)")
    p.add_argument("--task", action="append", help="a task whose recovered questions are measured (repeatable; "
                   "default: the run's target, target-seen and refusal tasks)")
    p.add_argument("--held-out", action="append", help="a task whose facts no attack document states (repeatable; "
                   "default: the run's target tasks when it also has target-seen ones)")
    p.add_argument("--step", type=int, help="evaluation point (default: the last)")
    p.add_argument("--draws", type=int, default=3, help="random removals per k (default 3)")
    p.add_argument("--seeds", help="training seeds, comma-separated (default: the run's seed and the next)")
    p.add_argument("--workers", type=int, default=1, help="reruns at once, each in its own process (default 1)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the reruns run code the run's config names (a model's own code, a reward file)")
    args = p.parse_args(argv)
    ks = _ints(args.k, "--k")
    if args.draws < 1 or args.workers < 1:
        raise UserError(f"--draws and --workers must be at least 1, got --draws {args.draws} --workers {args.workers}")
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    bad = [m for m in methods if m != RANDOM and not known_method(m)]
    if bad or not methods:
        raise UserError(f"--methods: unknown {', '.join(bad) or 'nothing'}; use gradient, tracin, bm25, trackstar, "
                        "trackstar:PROJECTION, random or file:PATH")
    table = counterfactual(args.run, methods, ks, args.task, args.step, args.draws,
                           _ints(args.seeds, "--seeds") if args.seeds else None, args.held_out,
                           trust_remote_code=args.trust_remote_code, workers=args.workers)
    print("recovery removed = (original - without) / (original - pre) on the recovered questions, "
          "95% bootstrap interval over questions and seeds:")
    print(describe(table))
    print(f"counterfactual: {RunDir(Path(args.run)).counterfactual_table}")
    return 0
