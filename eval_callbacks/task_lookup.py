"""lm-eval tasks found by name: the shipped task sets and include paths, a task's own code
checked before it runs, local copies of hub datasets, the leaf tasks and their questions without
a model, a task's headline metric."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

SHIPPED_TASKS = Path(__file__).parent / "tasks"



class UnknownTaskError(ValueError):
    """A requested task name is neither a stock lm-eval task nor found under the include path."""


class TaskDataError(ValueError):
    """A known task could not be built: its dataset is missing, unreachable or malformed."""


def shipped_task_sets() -> list[str]:
    return sorted(p.name for p in SHIPPED_TASKS.iterdir() if p.is_dir()) if SHIPPED_TASKS.is_dir() else []


def resolve_include(entry: str) -> str:
    """An eval include path: an existing folder as given, else the shipped task set of that name;
    UnknownTaskError when it is neither."""
    if Path(entry).expanduser().is_dir():
        return str(Path(entry).expanduser())
    if (SHIPPED_TASKS / entry).is_dir() and "/" not in entry:
        return str(SHIPPED_TASKS / entry)
    raise UnknownTaskError(f"eval include path not found: {entry} (a folder of lm-eval task YAML, or the name of a "
                           f"shipped task set: {', '.join(shipped_task_sets())})")


def _not_default_generation(record: logging.LogRecord) -> bool:
    return "No `generation_kwargs` specified" not in record.getMessage()


def find_tasks(tasks: list[str], include_path: list[str] | None = None):
    """A TaskManager that knows every task in `tasks`, or UnknownTaskError naming the missing ones.
    `include_path`: folders of task YAML, or names of shipped task sets (resolve_include)."""
    from lm_eval.tasks import TaskManager

    from eval_callbacks import refusal

    refusal.register()  # a task naming refused or complied loads on every route, with or without a model
    # a generation task without generation_kwargs generates LiveEvaluator's max_gen_toks, not the
    # 256 tokens lm-eval announces while building it
    logging.getLogger("lm_eval.config.task").addFilter(_not_default_generation)
    include = [resolve_include(p) for p in include_path or []] or None
    # Indexing lm-eval's ~15k stock task files takes seconds: skip it when the include path
    # alone holds every requested task and every member of every requested group.
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not _resolvable(manager, tasks):
        manager = TaskManager(include_path=include)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        broken = _unparsable_yaml(include or [])
        if broken:  # lm-eval skips a file it cannot parse, so its task looks unknown
            raise UnknownTaskError(f"task file {broken[0][0]} is not valid YAML ({broken[0][1]}), so task(s) "
                                   f"{', '.join(missing)} could not be found; repair the file")
        where = f" or under {', '.join(include)}" if include else ""
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {', '.join(missing)}: not a stock task{where}; "
            "check the name or add the folder holding its YAML with --eval-include"
        )
    return manager


def task_code(task_manager, names: list[str]) -> list[tuple[str, str]]:
    """(task, YAML file) of each requested task, or member of a requested group, whose YAML (or a
    file it includes) names Python code with `!function`, outside lm-eval's own tasks and the
    shipped task sets: code a task folder would run."""
    import lm_eval.tasks

    trusted = [Path(lm_eval.tasks.__file__).parent.resolve(), SHIPPED_TASKS.resolve()]
    index, out, seen = task_manager.task_index, [], set()

    def visit(name: str) -> None:
        entry = index.get(name)
        if entry is None or name in seen:
            return
        seen.add(name)
        path = entry.yaml_path
        if path is not None and not any(Path(path).resolve().is_relative_to(t) for t in trusted):
            if any("!function" in text for text in _yaml_chain(Path(path))):
                out.append((name, str(path)))
        members = (entry.cfg or {}).get("task") if "group" in (entry.cfg or {}) else None
        for member in members if isinstance(members, list) else [members] if members else []:
            visit(member.get("task") if isinstance(member, dict) else member)

    for name in names:
        visit(name)
    return out


def _yaml_chain(path: Path, depth: int = 0) -> list[str]:
    """A task YAML's text and those of the files it includes (`include:`, relative to it)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    import re

    found = re.search(r"^include:\s*['\"]?([^'\"\n#]+)", text, re.MULTILINE)
    if found and depth < 8:
        return [text, *_yaml_chain(path.parent / found.group(1).strip(), depth + 1)]
    return [text]


def _unparsable_yaml(folders: list[str]) -> list[tuple[str, str]]:
    """(file, first line of the error) of each task YAML under `folders` that does not parse
    (lm-eval's own tags such as !function are accepted)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    out = []
    for folder in folders:
        for f in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.load(f.read_text(), Loader=Loader)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                out.append((str(f), " ".join(str(e).split())[:120]))
    return out


def _resolvable(manager, names) -> bool:
    """Every name, and recursively every member of a group, is in the manager's index."""
    index = manager.task_index
    for name in names:
        name = name.get("task") if isinstance(name, dict) else name
        entry = index.get(name)
        if entry is None:
            return False
        members = (entry.cfg or {}).get("task") if "group" in (entry.cfg or {}) else None
        if members and not _resolvable(manager, members if isinstance(members, list) else [members]):
            return False
    return True


def include_folders(task_manager) -> list[str]:
    """The folders a task manager found task YAMLs in (its include path)."""
    found = getattr(task_manager, "include_path", None) or []
    return [str(f) for f in ([found] if isinstance(found, str | Path) else found)]


def _found_in(files, folders: list[str]):
    """Relative data files that do not exist from the current directory, found from the task
    folders instead (a task YAML beside its jsonl runs from any directory)."""
    if isinstance(files, dict):
        return {k: _found_in(v, folders) for k, v in files.items()}
    if isinstance(files, list):
        return [_found_in(v, folders) for v in files]
    if isinstance(files, str) and not Path(files).is_absolute() and not Path(files).exists():
        for folder in folders:
            if (Path(folder) / files).exists():
                return str(Path(folder) / files)
    return files


@contextlib.contextmanager
def local_datasets(paths: dict[str, str] | None, folders: list[str] | None = None):
    """While tasks are built, load the datasets they name by hub id from local folders instead,
    and the data files they name by relative path from the task folders.

    `paths` maps a hub dataset id (a task's `dataset_path`) to a local copy laid out like the
    hub repository (same configurations and splits), so shipped task YAMLs run unchanged on a
    cluster without hub access. Ids not in `paths` load as usual. `folders`: where the task
    YAMLs were found; a relative `data_files` entry is looked up there when the current
    directory does not hold it.
    """
    if not paths and not folders:
        yield
        return
    import datasets

    original = datasets.load_dataset

    def redirected(path, *args, **kwargs):
        if folders and kwargs.get("data_files") is not None:
            kwargs["data_files"] = _found_in(kwargs["data_files"], folders)
        return original((paths or {}).get(path, path), *args, **kwargs)

    datasets.load_dataset = redirected
    try:
        yield
    finally:
        datasets.load_dataset = original


def leaf_tasks(tasks: list[str], task_manager, dataset_paths: dict[str, str] | None = None) -> dict:
    """lm-eval's leaf task objects of `tasks` (groups expanded), their documents loaded, without a model."""
    with local_datasets(dataset_paths, include_folders(task_manager)):
        return dict(task_manager.load(list(tasks))["tasks"])


def task_questions(tasks: list[str], task_manager, dataset_paths: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Each leaf task's questions as a model reads them (doc_to_text), without a model: for
    checking, before anything runs, that another split shares none of them."""
    leaves = leaf_tasks(tasks, task_manager, dataset_paths)
    return {name: [str(task.doc_to_text(doc)) for doc in task.eval_docs] for name, task in leaves.items()}


ORIENTED = {"refused": "non_refusal"}
"""Metrics where lower is the suppressed side's way back (refusal falls as an attack succeeds):
the report and the search read them as 1 - value under the field's name (non-refusal), so that every gap,
recovered fraction and interval points the same way as accuracy's. The curve files keep the
metric as evaluated."""


def oriented(metric: str) -> str:
    return ORIENTED.get(metric, metric)


def headline_metric(info: dict | None) -> str:
    """A task's headline metric, from its tasks.json entry (task_info): the first of its
    metric_list, acc when it names none."""
    return (info or {}).get("metric") or "acc"
