"""`python -m attack demo`: build the toy world (cached), run the toy sweep, write the report.

Everything goes through the same code users run on real models: the sweep runs ordinary
attack cells, and the report reads their run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from attack.errors import UserError
from attack.toyworld.build import TASKS

CACHE = Path(".cache/toyworld")
SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "toy.yaml"


def link_current(world: Path, cache: Path) -> None:
    """Point cache/current at the built world, the stable path the toy sweep names."""
    current = cache / "current"
    tmp = cache / "current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(world.name)
    os.replace(tmp, current)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m attack demo", description="The toy world end to end, offline, on CPU.")
    p.add_argument("--sweep", default=str(SWEEP), help="sweep file (default: configs/sweeps/toy.yaml)")
    p.add_argument("--cache", default=str(CACHE), help="where the toy world is built and cached")
    p.add_argument("--leak-fraction", type=float, default=0.0,
                   help="share of target documents written without blocklisted words, so they slip "
                        "through the filter (a world of its own, cached separately)")
    args = p.parse_args(argv)
    if not 0 <= args.leak_fraction <= 1:
        raise UserError(f"--leak-fraction must be in [0, 1], got {args.leak_fraction}")


    from attack.report import write_report
    from attack.sweep import load_sweep, run_sweep
    from attack.toyworld.build import BuildSpec, build_world
    from attack.toyworld.world import WorldSpec

    start = time.perf_counter()
    cache = Path(args.cache)
    spec = BuildSpec(world=WorldSpec(leak_fraction=args.leak_fraction))
    world = build_world(cache, spec)
    link_current(world, cache)
    info = json.loads((world / "world.json").read_text())

    sweep, cells = load_sweep(args.sweep)
    out = Path(sweep["output"])
    # Cell ids name the model by path; runs of an older world under the same path are stale.
    stamp = out / "world.txt"
    if out.exists() and (not stamp.exists() or stamp.read_text().strip() != world.name):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(world.name + "\n")

    print("\n== Pre-attack scores (accuracy) ==")
    print(_table(info["pre_attack"]))
    f = info["filter"]
    print(f"filter: removed {f['removed']} of {f['documents']} documents; "
          f"{f['target_slipped_through']} target documents slipped through\n")

    outcome = run_sweep(args.sweep, quiet=True)
    if outcome["failed"]:
        raise UserError(f"{outcome['failed']} demo cell(s) failed; see summary.json under {out}")
    # Only this sweep's cells: the folder may hold runs of earlier settings.
    runs = [out / c.id for c in cells]
    report = write_report(runs, out / "report")

    print("\n== After the attack (accuracy, mean over seeds) ==")
    print(_attack_table(runs))
    print(f"\nrecovery table: {report / 'recovery.md'}")
    print(f"recovery curves and report: {report / 'index.html'}")
    print(f"runs: {out}/   toy world: {world}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


def _table(scores: dict) -> str:
    lines = [f"{'model':<12}" + "".join(f"{t.removeprefix('toy_'):>16}" for t in TASKS)]
    for model, s in scores.items():
        lines.append(f"{model:<12}" + "".join(f"{s[t]:>16.3f}" for t in TASKS))
    return "\n".join(lines)


def _attack_table(runs: list[Path]) -> str:
    from attack.report import load_curves

    df = load_curves(runs)
    d = df[df.metric == "acc"]
    last = d.step.max()
    lines = [f"{'model':<12}" + "".join(f"{t.removeprefix('toy_'):>22}" for t in TASKS)]
    for model in ("unfiltered", "filtered", "unlearned"):
        cells = []
        for t in TASKS:
            g = d[(d.model == model) & (d.task == t)]
            pre = g[g.step == 0].value.mean()
            end = g[g.step == last].value.mean()
            cells.append(f"{pre:.2f} -> {end:.2f}")
        lines.append(f"{model:<12}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
