"""What the adversary search costs on the toy world: a trial against a plain cell of the same
settings, and a pruned search against the same search run to the end.

    python bench/search_cost.py [--cache .cache/toyworld] [--trials 8] [--model unlearned]

Prints JSON lines:
- what=trial_overhead: seconds of one plain cell (run_attack) and of the same settings as a
  search trial (the objective read at every point, the study told), and their ratio;
- what=search, pruner=none|median: trials, pruned, optimizer steps spent, wall seconds, the
  selected trial, its held-out change at the chosen point with its paired 95% interval;
- what=pruning: the share of steps the pruned search saved, and whether its selected
  adversary's held-out change lies within the unpruned search's interval.
Both searches draw the same settings (TPE with the same seed sees the same finished trials
until the first prune, so the pruned one is a fair copy of the other up to there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _search_spec(world: Path, out: Path, model: str, trials: int, pruner: str) -> dict:
    from attack.toyworld.sweeps import toy_search

    spec = toy_search(world)
    spec["models"] = [m for m in spec["models"] if m["label"] == model]
    spec["search"].update(trials=trials, pruner=pruner)
    return {**spec, "output": str(out), "name": f"cost-{pruner}"}


def _heldout_interval(run: Path, step: int, task: str = "toy_target_heldout") -> tuple[float, float, float]:
    import pandas as pd

    from attack.report.paired import paired_curve
    from attack.rundir import RunDir
    from eval_callbacks import read_samples

    rec = pd.DataFrame(read_samples(RunDir(run).samples))
    rec = rec[rec.task == task].assign(seed=0)
    curve = paired_curve(rec).set_index("step")
    return tuple(float(curve.loc[step, k]) for k in ("change", "change_lo", "change_hi"))


def _run_search(world: Path, root: Path, model: str, trials: int, pruner: str) -> dict:
    import yaml

    from attack.records import Outcome
    from attack.report.runs import load_curves
    from attack.report.search import selected
    from attack.report.search import trials as trial_table
    from attack.search import load_search, run_search

    out = root / pruner
    out.mkdir(parents=True)
    (out / "search.yaml").write_text(yaml.safe_dump(_search_spec(world, out, model, trials, pruner)))
    start = time.perf_counter()
    run_search(load_search(out / "search.yaml"), log=lambda m: None)
    wall = time.perf_counter() - start
    table = trial_table(load_curves(out))
    steps = sum(json.loads((out / r / "summary.json").read_text()).get("steps", 0) for r in table.run)
    pick = selected(table).iloc[0]
    change, lo, hi = _heldout_interval(out / pick.run, int(pick.selection_step))
    return dict(what="search", pruner=pruner, model=model, trials=len(table), pruned=int((table.state == Outcome.PRUNED).sum()),
                steps=int(steps), wall_s=round(wall, 1), selected_trial=int(pick.trial), selected=pick.attack,
                selected_step=int(pick.selection_step), heldout_change=round(change, 4),
                heldout_lo=round(lo, 4), heldout_hi=round(hi, 4))


def _trial_overhead(world: Path, root: Path, model: str) -> dict:
    """One setting as a plain cell and as a search trial (a study of one trial, no pruning)."""
    import yaml

    from attack.config import load_config
    from attack.recipes import run_attack
    from attack.search import Search, load_search, run_search

    spec = _search_spec(world, root / "one", model, 1, "none")
    spec["search"]["space"] = {"train.lr": [3.0e-3]}
    (root / "one").mkdir()
    (root / "one" / "search.yaml").write_text(yaml.safe_dump(spec))
    s: Search = load_search(root / "one" / "search.yaml")
    cfg, _ = s.config(s.models[0], {"train.lr": 3.0e-3}, 0)
    plain = load_config({**cfg.model_dump(mode="python"), "output": {"dir": str(root / "plain")}})
    times = {}
    for what, go in (("plain", lambda: run_attack(plain, quiet=True)), ("trial", lambda: run_search(s, log=lambda m: None))):
        start = time.perf_counter()
        go()
        times[what] = time.perf_counter() - start
    return dict(what="trial_overhead", model=model, plain_s=round(times["plain"], 2), trial_s=round(times["trial"], 2),
                ratio=round(times["trial"] / times["plain"], 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=".cache/toyworld", help="where the toy world is built and cached")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--model", default="unlearned", choices=["filtered", "unlearned", "rmu"])
    args = p.parse_args()
    import torch

    from attack.__main__ import quiet_libraries
    from attack.toyworld.build import BuildSpec, build_world

    torch.set_num_threads(1)
    quiet_libraries()
    world = build_world(Path(args.cache).absolute(), replace(BuildSpec()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(json.dumps(_trial_overhead(world, root, args.model)), flush=True)
        runs = {}
        for pruner in ("none", "median"):
            runs[pruner] = _run_search(world, root, args.model, args.trials, pruner)
            print(json.dumps(runs[pruner]), flush=True)
        full, pruned = runs["none"], runs["median"]
        print(json.dumps(dict(what="pruning", steps_saved=round(1 - pruned["steps"] / full["steps"], 3),
                              within_unpruned_interval=full["heldout_lo"] <= pruned["heldout_change"] <= full["heldout_hi"])))


if __name__ == "__main__":
    main()
