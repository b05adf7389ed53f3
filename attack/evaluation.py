"""The evaluator every recipe attaches: the tasks asked for, found and checked before anything is
written; the live-model evaluator with each task's facts; the schedule of evaluation points."""

from __future__ import annotations

import re

from attack.config import EvalConfig, check_dataset_copies
from attack.config.files import code_granted
from attack.errors import UserError
from attack.published import as_fraction
from eval_callbacks import LiveEvaluator, TaskDataError, UnknownTaskError, find_tasks
from eval_callbacks.task_lookup import task_code


def requested(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """The tasks an evaluation point scores and where they are found: eval.tasks, then the held-out
    texts as tasks of their own (attack/heldout.py)."""
    from attack.heldout import task_folder

    folder = task_folder(cfg)
    if folder is None:
        return list(cfg.tasks), list(cfg.include_path)
    clash = set(cfg.heldout_texts) & set(cfg.tasks)
    if clash:
        raise UserError(f"eval.heldout_texts names {', '.join(sorted(clash))}, which eval.tasks has too; give the "
                        "held-out text a name of its own")
    return [*cfg.tasks, *sorted(cfg.heldout_texts)], [*cfg.include_path, str(folder)]


def find_eval_tasks(cfg: EvalConfig, trust_code: bool = False):
    """lm-eval's task manager for the requested tasks (and the held-out texts); unknown names and
    missing local dataset copies are the user's to fix. A task whose YAML names Python code
    (`!function`) from a task folder is refused unless `trust_code` (the command line's
    --trust-remote-code): a task folder is never enough to run code. The one route by which runs,
    sweeps, searches and dry runs find their tasks."""
    check_dataset_copies(cfg)
    tasks, include = requested(cfg)
    try:
        manager = find_tasks(tasks, include)
    except UnknownTaskError as e:
        raise UserError(str(e)) from None
    code = task_code(manager, tasks)
    if code and not (trust_code or code_granted()):
        task, path = code[0]
        raise UserError(f"task {task} ({path}) runs Python code named by !function; code from a task folder runs only "
                        "when the command line says so: add --trust-remote-code if you trust that folder")
    return manager


def open_evaluator(cfg: EvalConfig, model, tokenizer, autocast_dtype, task_manager, chat_template: bool = False,
                   judge=None, kl_reference=None) -> tuple[LiveEvaluator, dict]:
    """The evaluator on the live model, and tasks.json's content: per task its kind, questions,
    chance, headline metric, role, and the published score when eval.expect gives one."""
    if cfg.kl_task is not None and cfg.kl_task not in cfg.tasks:
        raise UserError(f"eval.kl_task {cfg.kl_task} is not in eval.tasks ({', '.join(cfg.tasks)}); name an evaluated "
                        "task of harmless requests")
    try:
        evaluator = LiveEvaluator(model, tokenizer, requested(cfg)[0], batch_size=cfg.batch_size, limit=cfg.limit,
                                  autocast_dtype=autocast_dtype, task_manager=task_manager,
                                  dataset_paths=cfg.dataset_paths, fast=cfg.fast, chat_template=chat_template,
                                  max_gen_toks=cfg.max_gen_toks, judge=judge, kl_task=cfg.kl_task,
                                  kl_reference=kl_reference)
    except (UnknownTaskError, TaskDataError) as e:
        raise UserError(str(e)) from None
    task_info = evaluator.task_info()
    for task, role in cfg.roles.items():  # (a sweep's roles may name tasks one attack does not evaluate)
        if task in task_info:
            task_info[task]["role"] = role
    for task, value in cfg.expect.items():
        if task not in task_info:
            raise UserError(f"--expect names task {task} that is not evaluated; "
                            f"evaluated: {', '.join(sorted(task_info))}")
        task_info[task]["published"] = as_fraction(value)
    return evaluator, task_info


def score_table(rows: list[dict], tasks: list[str] | None = None) -> str:
    """Each task's scores at the first and the last evaluated step; only `tasks` (the names asked
    for: a group's headline, not its subtasks) when given."""
    if not rows:
        return "(no evaluation points)"
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    lines = [f"{'task':<28} {'metric':<14} {'step ' + str(first):>10} {'step ' + str(last):>10}"]
    for task in tasks or sorted({r["task"] for r in rows}):
        for metric in ("acc", "acc_norm", "correct_prob", "exact_match", "bits_per_byte"):
            at = {r["step"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric}
            if at:
                lines.append(
                    f"{task:<28} {metric:<14} {at.get(first, float('nan')):>10.4f} {at.get(last, float('nan')):>10.4f}"
                )
    return "\n".join(lines)


def _normal(text: str) -> str:
    """A question as compared across splits: case, whitespace and punctuation folded, so a
    template that adds a question mark or a colon does not hide a shared question."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def check_disjoint(what: str, questions: dict[str, list[str]], evaluated: dict[str, list[str]]) -> None:
    """Refuse questions of another split (`what`, e.g. "ablation.dev_tasks") that an evaluated
    task also asks, compared by content: a score chosen or trained on them is not held out."""
    asked = {}
    for task, texts in evaluated.items():
        for text in texts:
            asked.setdefault(_normal(text), task)
    for name, texts in questions.items():
        shared = [t for t in texts if _normal(t) in asked]
        if shared:
            raise UserError(f"{' '.join(filter(None, (what, name)))} shares {len(shared)} question(s) with evaluated task "
                            f"{asked[_normal(shared[0])]} (e.g. {shared[0][:60]!r}); use a split disjoint from "
                            "the evaluation")


def check_texts_disjoint(what: str, texts: list[str], evaluated: dict[str, list[str]], min_chars: int = 24) -> None:
    """Refuse texts that contain an evaluated question verbatim (questions shorter than
    `min_chars` are too generic to tell)."""
    asked = {_normal(q): task for task, qs in evaluated.items() for q in qs if len(_normal(q)) >= min_chars}
    for text in texts:
        flat = _normal(text)
        for q, task in asked.items():
            if q in flat:
                raise UserError(f"{what} contains a question of evaluated task {task} ({q[:60]!r}); "
                                "fit on text the evaluation does not ask about")


def attack_requests(cfg, local_only: bool = False) -> dict[str, list[str]]:
    """The requests an attack trains or fits on, by where they come from: GRPO's prompts, the user
    turns of a conversational attack corpus, an ablation's target texts. `local_only`: a corpus
    from the hub is not read (the dry run downloads nothing)."""
    from attack.config.files import means_local_file
    from attack.documents import load_documents, user_turns

    out = {}
    if cfg.kind == "grpo":
        from attack.rewards import load_reward_split

        out[f"grpo.prompts_path ({cfg.grpo.prompts_path})"] = [str(p) for p in load_reward_split(cfg.grpo)["prompt"]]
    elif cfg.kind == "ablation":
        from attack.config import DataConfig

        a = cfg.ablation  # the texts the run reads: the fitting ones, then refusal mode's selection prompts
        used = a.fit_examples + (a.dev_prompts if a.mode == "refusal" else 0)
        out[f"ablation.target_path ({a.target_path})"] = load_documents(DataConfig(path=a.target_path,
                                                                                   text_field=a.text_field))[:used]
    if cfg.uses_data and cfg.data.path and (means_local_file(cfg.data.path) or not local_only):
        turns = user_turns(cfg.data)
        if turns:
            out[f"attack data {cfg.data.path} (its user turns)"] = turns
    return out


def check_requests_held_out(requests: dict[str, list[str]], evaluated: dict[str, list[str]]) -> None:
    """Refuse an attack that trains or fits on a request (`attack_requests`) an evaluated task
    asks, equal by content or contained verbatim: its refusal would be measured on requests it was
    trained to answer. The runs and the dry run call this one check, so they agree."""
    for source, texts in requests.items():
        check_disjoint(source, {"": texts}, evaluated)
        check_texts_disjoint(source, texts, evaluated)
