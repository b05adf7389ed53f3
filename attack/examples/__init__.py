"""python -m attack example [NAME] [--copy DIR]: the shipped examples, each a folder with its
inputs (corpus, lm-eval task YAMLs over local JSONL) and an attack.yaml that runs from any
directory (`python -m attack --config NAME`). --copy makes an editable copy to start your own."""

from __future__ import annotations

import shutil
from pathlib import Path

from attack.config.files import EXAMPLES  # where `--config NAME` finds them too
from attack.errors import ArgumentParser, UserError


def names() -> list[str]:
    return sorted(p.parent.name for p in EXAMPLES.glob("*/attack.yaml"))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m attack example",
                       description="List the shipped examples, show one's folder, or copy it to edit.")
    p.add_argument("name", nargs="?", help=f"an example: {', '.join(names())}")
    p.add_argument("--copy", metavar="DIR", help="copy the example's files into DIR (a new folder) to make them yours")
    args = p.parse_args(argv)
    if args.name is None:
        for name in names():
            first = (EXAMPLES / name / "attack.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:<12} {EXAMPLES / name}  ({first})")
        return 0
    if args.name not in names():
        raise UserError(f"no example named {args.name!r}; examples: {', '.join(names())}")
    folder = EXAMPLES / args.name
    if args.copy is None:
        print(folder)
        return 0
    target = Path(args.copy)
    if target.exists():
        raise UserError(f"--copy {target}: it exists already; name a new folder")
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"copied to {target}: edit {target / 'attack.yaml'}, then python -m attack --config {target / 'attack.yaml'}")
    return 0
