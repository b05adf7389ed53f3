"""What the toy demo costs: the world build and one cell of each attack setting, the figures
behind `python -m attack demo`'s settings and its expected time (attack/toyworld/demo.py,
COST_S). Prints one JSON line per measurement.

    python bench/demo_cost.py [--cache .cache/toyworld] [--sweep compact,full] [--quick]

Each cell runs on one torch thread, alone, on the unlearned model (seed 0), as the demo runs it;
the last lines fit each kind's cost as a fixed part plus a part per training step (COST_S).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from attack.__main__ import quiet_libraries  # noqa: E402
from attack.cells import load_sweep  # noqa: E402
from attack.sweep import run_cell  # noqa: E402
from attack.toyworld.build import BuildSpec, build_world, quick_spec, world_dir  # noqa: E402
from attack.toyworld.sweeps import cost_kind, toy_sweep  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=".cache/toyworld", help="the world's cache (built when absent)")
    p.add_argument("--sweep", default="compact,full", help="which demo sweeps' attack settings to time")
    p.add_argument("--quick", action="store_true", help="the quick world and 20-step attacks")
    args = p.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    spec = quick_spec() if args.quick else BuildSpec()
    cached = (world_dir(Path(args.cache), spec) / "world.json").exists()
    start = time.perf_counter()
    world = build_world(Path(args.cache).absolute(), spec, log=lambda m: print(m, file=sys.stderr))
    info = json.loads((world / "world.json").read_text())
    print(json.dumps(dict(what="world_build", quick=args.quick, built_now=not cached,
                          s=round(time.perf_counter() - start, 1), build_s=info.get("build_s"))), flush=True)
    measured: dict[str, list[tuple[int, float]]] = {}
    for name in args.sweep.split(","):
        spec_ = toy_sweep(world, full=name == "full", quick=args.quick)
        spec_["models"] = [m for m in spec_["models"] if m["label"] == "unlearned"]
        spec_["seeds"] = [0]
        with tempfile.TemporaryDirectory() as tmp:
            spec_["output"] = str(Path(tmp) / "runs")
            (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(spec_))
            _, cells = load_sweep(Path(tmp) / "sweep.yaml")
            for cell in cells:
                t = time.perf_counter()
                outcome = run_cell(cell, "bench", quiet=True, log=lambda m: None)
                s = time.perf_counter() - t
                steps = cell.config.training_steps()
                print(json.dumps(dict(what="cell", sweep=name, attack=cell.attack.label, kind=cell.config.kind,
                                      steps=steps, eval_points=len(cell.config.curve_steps()),
                                      outcome=outcome, s=round(s, 1))), flush=True)
                kind = cost_kind(cell.config.kind, cell.config.kind == "ablation" and cell.config.ablation.then_finetune)
                measured.setdefault(kind, []).append((steps if kind != "ablation" else 0, s))
    # COST_S's (fixed, per step) of each kind: a least-squares line through its cells
    for kind, points in measured.items():
        x, y = np.array(points, dtype=float).T
        per_step = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0
        fixed = float(np.mean(y - per_step * x))
        print(json.dumps(dict(what="cost_fit", kind=kind, fixed_s=round(fixed, 1), per_step_s=round(per_step, 3),
                              cells=len(points))), flush=True)


if __name__ == "__main__":
    main()
