"""The code's structure, read from the code: no import loop among the package's modules (imports
inside functions included), checkpoint file names spelled in attack/checkpoints.py only, and
eval_callbacks standing alone (it imports nothing of attack)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attack", "eval_callbacks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, at any depth (deferred imports too). `from a import b`
    counts a.b when that is a module, else a."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py")]
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_loop():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_eval_callbacks_imports_nothing_of_attack():
    assert not {m: d for m, d in graph().items() if m.startswith("eval_callbacks") and any(x.startswith("attack") for x in d)}


def test_checkpoint_file_names_are_spelled_in_one_module():
    from attack import checkpoints

    names = [checkpoints.TRAINER_STATE, checkpoints.MANIFEST, checkpoints.ROWS_TRAINED, checkpoints.OPTIMIZER_RECORD,
             checkpoints.OPTIMIZER_STATE, checkpoints.SCHEDULER_STATE]
    spelled = {}
    for f in (ROOT / "attack").rglob("*.py"):
        if f.name == "checkpoints.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.setdefault(str(f.relative_to(ROOT)), []).append(node.value)
    assert spelled == {}


def test_every_kind_has_its_recipe_and_nothing_else():
    """The config's kind table and the recipe table name the same kinds: a kind added to one and
    not the other fails here, not in a user's run."""
    from attack.config.kinds import KINDS
    from attack.recipes import RECIPES

    assert set(KINDS) == set(RECIPES)


def test_a_kind_is_in_every_table_a_kind_needs():
    """docs/layout.md's checklist for a new kind, checked: its recipe, its summary field, its demo
    cost, its section in docs/attacks.md. A kind missing from any of them fails here. A kind with a
    config section of its own name (ablation, grpo, ...) records what it did in summary.json."""
    from attack.config.kinds import KINDS
    from attack.recipes import RECIPES
    from attack.records import Summary
    from attack.toyworld.sweeps import COST_S

    attacks = (ROOT / "docs" / "attacks.md").read_text()
    missing = {kind: [where for where, ok in [
        ("RECIPES", kind in RECIPES),
        ("records.Summary", kind not in KINDS[kind].model_fields or kind in Summary.__annotations__),
        ("demo COST_S", kind in COST_S),
        ("docs/attacks.md section", f"(`kind: {kind}`)" in attacks)] if not ok] for kind in KINDS}
    assert {k: v for k, v in missing.items() if v} == {}


def test_the_default_metric_and_kind_are_named_once():
    spelled = {}
    for f in [*(ROOT / "attack").rglob("*.py"), *(ROOT / "eval_callbacks").rglob("*.py")]:
        text = f.read_text()
        for pattern in ('or "acc"', 'get("kind", "finetune")'):
            if pattern in text:
                spelled.setdefault(str(f.relative_to(ROOT)), []).append(pattern)
    assert spelled == {"eval_callbacks/task_lookup.py": ['or "acc"']}


def test_every_input_a_kind_reads_is_found_from_its_config_file():
    """Each config key a kind names as an input file (its input_files) is one the sweep and
    config loaders resolve from the file's own folder: a key missing there is read from the
    current directory instead (the many-shot dialogues of a shipped sweep once were)."""
    from attack.config.files import INPUT_PATHS

    named = set()
    for f in (ROOT / "attack" / "config").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "input_files":
                named |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                          and re.fullmatch(r"[a-z_]+\.[a-z_]+", c.value)}
    assert named and named <= set(INPUT_PATHS), named - set(INPUT_PATHS)
