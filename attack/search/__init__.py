"""Adversary search: the strongest attack found by an Optuna study, not the worst of a list.

    python -m attack search FILE [--storage URL] [--dry-run]

FILE is a sweep file (name, output, base, models) with a `search` section instead of `attacks`:

    search:
      space:                      # config keys -> choices, or {low, high, log}
        train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}
        train.optimizer: [adamw, sgd, adagrad]
      trials: 20                  # per model under test, in total over every worker
      selection_tasks: [toy_target_dev]   # the objective reads these; the verdict never does
      utility_task: toy_general   # a point that drops it by more than max_utility_drop is infeasible
      max_utility_drop: 0.10
      pruner: median              # none | median | successive_halving | wilcoxon
      seed: 0

One study per model under test. Each trial is an ordinary run directory (a cell: cell.json has
`trial`), evaluated on the reported tasks and the selection tasks, whose questions must share
none with the reported ones. The objective is the best gain over step 0 on the selection tasks
(their mean headline score) among the trial's points that keep the utility bound: a constant
learning rate makes every prefix of the curve a valid shorter attack. At each evaluation point
the objective so far goes to the pruner, which may stop the trial there (status `pruned`,
its curve up to that point). The report scores the selected trial per model (the best feasible
finished one, chosen on the selection tasks) on the reported questions only (the winner's curse).

Workers share the study through its storage: an SQLite file in the output folder by default,
a journal file (`--storage journal:PATH`) on a shared file system, or a database URL
(`--storage postgresql://...`). Start as many `python -m attack search FILE` as you like, on
one machine or many (examples/slurm/search_array.sh): each asks the study for a trial under a
lock in the output folder, so the `trials` budget holds in total, and takes over a trial whose
worker died (its run resumes from its last checkpoint), so no trial runs twice or is lost.
"""

from attack.search.command import main
from attack.search.objective import ReportToStudy, objective
from attack.search.space import PRUNERS, Range, Search, SearchSection, load_search, suggest
from attack.search.study import check_storage, next_trial, open_study, run_search, run_trial, storage_for

__all__ = ["PRUNERS", "Range", "ReportToStudy", "Search", "SearchSection", "check_storage", "load_search", "main",
           "next_trial", "objective", "open_study", "run_search", "run_trial", "storage_for", "suggest"]
