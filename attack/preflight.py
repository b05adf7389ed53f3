"""What can be checked of an attack's config before anything downloads or loads: the dry run
(`--dry-run`), and every sweep and search before its first cell runs."""

from __future__ import annotations

from pathlib import Path

from attack.config import check_dataset_copies
from attack.config.files import means_local_file
from attack.errors import UserError
from attack.evaluation import attack_requests, check_requests_held_out, find_eval_tasks, requested
from attack.model import model_source


def check_config_offline(cfg, known: dict | None = None) -> None:
    """One attack's config checked without downloads or model weights: task names (and the
    published scores' tasks), local dataset copies, the model's location, every input file.
    `known`: task names found so far, by task list and include path (shared across cells)."""
    known = {} if known is None else known
    key = (tuple(cfg.eval.tasks), tuple(cfg.eval.include_path), tuple(sorted(cfg.eval.heldout_texts.items())),
           cfg.model.trust_remote_code)
    if key not in known:  # the run's own route: held-out texts and task code checked as a run checks them
        known[key] = set(find_eval_tasks(cfg.eval, cfg.model.trust_remote_code).all_tasks)
    unknown = sorted(set(cfg.eval.expect) - known[key])
    if unknown:
        raise UserError(f"expect names unknown task(s) {', '.join(unknown)}")
    check_dataset_copies(cfg.eval)
    model_source(cfg.model)
    for name, path in cfg.input_files().items():
        if not Path(path).expanduser().exists():
            raise UserError(f"{name} file not found: {path} (relative paths are taken from the current directory)")
    data = cfg.data.path if cfg.uses_data else ""
    if data and means_local_file(data) and not Path(data).expanduser().exists():
        raise UserError(f"attack data not found: {data} (relative paths are taken from the current directory; "
                        "hub dataset ids look like org/name)")
    requests = attack_requests(cfg, local_only=True)
    if requests:  # the requests it trains on are not the ones it is scored on
        from eval_callbacks import TaskDataError, task_questions

        try:
            evaluated = task_questions(requested(cfg.eval)[0], find_eval_tasks(cfg.eval, cfg.model.trust_remote_code),
                                       cfg.eval.dataset_paths)
        except (TaskDataError, OSError):  # a task's data is on the hub (offline: ConnectionError): the run checks it
            return
        check_requests_held_out(requests, evaluated)
