"""`python -m attack search FILE`: load and check the file, the tasks and the storage, run this
worker's share, and the report when the last worker finishes."""

from __future__ import annotations

from attack.config.files import grant_code
from attack.errors import ArgumentParser
from attack.records import Outcome
from attack.search.space import Search, load_search, range_value
from attack.search.study import check_storage, run_search
from attack.sweep import check_offline


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m attack search", description="Search the attack space for the strongest "
                       "adversary per model, chosen on selection tasks the verdict never reports.")
    p.add_argument("file", help="a sweep file with a search section (space, trials, selection_tasks, pruner)")
    p.add_argument("--storage", help="the study's storage: a database URL (postgresql://..., sqlite:///...), "
                   "journal:PATH, or nothing for OUTPUT/study.db")
    p.add_argument("--dry-run", action="store_true", help="check the file, the space and the tasks offline; train nothing")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let models that set model.trust_remote_code run their own code (a file alone cannot)")
    args = p.parse_args(argv)
    grant_code(args.trust_remote_code)  # cells and workers started from here inherit it
    s = load_search(args.file, args.trust_remote_code)
    _check_tasks(s)
    check_storage(args.storage)
    if args.dry_run:
        for m in s.models:
            print(f"{s.study_name(m)}: {s.search.trials} trials over {', '.join(s.search.space)} on {m.name}, chosen on "
                  f"{', '.join(s.search.selection_tasks)}, pruner {s.search.pruner}")
        print(f"{len(s.models)} studies; storage {args.storage or s.output / 'study.db'}; the space, tasks and paths check out")
        return 0
    outcome = run_search(s, args.storage)
    print(f"search {s.name}: {outcome[Outcome.DONE]} trials finished, {outcome[Outcome.PRUNED]} pruned, {outcome[Outcome.FAILED]} failed "
          f"here; runs under {s.output}; read them with python -m attack report {s.output}")
    if outcome["complete"]:  # the last worker: the report and the verdict as the last lines
        from attack.report import report_and_verdict

        report_and_verdict(s.output, utility_task=s.search.utility_task, max_utility_drop=s.search.max_utility_drop)
    return 1 if outcome[Outcome.FAILED] and not (outcome[Outcome.DONE] or outcome[Outcome.PRUNED]) else 0


def _check_tasks(s: Search) -> None:
    """Offline checks of a trial config (tasks found, local paths there), and the selection tasks'
    questions disjoint from the reported tasks' questions (compared by content)."""
    from attack.cells import Cell, SweepAttack
    from attack.evaluation import check_disjoint, find_eval_tasks
    from eval_callbacks import task_questions

    cfg, cell_id = s.config(s.models[0], _first(s), 0)
    check_offline([Cell(cell_id, s.models[0], None, SweepAttack(label="search"), cfg.seed, cfg)])
    reported = [t for t in cfg.eval.tasks if t not in s.search.selection_tasks and t != s.search.utility_task]
    if not reported:
        return
    manager = find_eval_tasks(cfg.eval, cfg.model.trust_remote_code)
    paths = cfg.eval.dataset_paths
    check_disjoint("search.selection_tasks task", task_questions(list(s.search.selection_tasks), manager, paths),
                   task_questions(reported, manager, paths))


def _first(s: Search) -> dict:
    return {k: (v[0] if isinstance(v, list) else range_value(v, v.low)) for k, v in s.search.space.items()}
