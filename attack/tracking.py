"""Experiment trackers (wandb, tensorboard) and the terminal while an attack runs."""

from __future__ import annotations

import importlib.util
import os

from attack.config import LoggingConfig
from attack.errors import UserError


def start_tracker(cfg: LoggingConfig) -> None:
    """Checked before the run directory opens: a tracker that is asked for must be installed."""
    if cfg.report_to == "none":
        return
    if importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to} needs {cfg.report_to}: pip install {cfg.report_to}")
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", cfg.project)


def finish_tracker(cfg: LoggingConfig) -> None:
    """One tracker run per attack, also when a sweep runs many attacks in one process."""
    if cfg.report_to == "wandb":
        import wandb

        wandb.finish()


def close_progress_bar(trainer) -> None:
    """Finish the training bar so an error message that follows gets a line of its own."""
    for cb in trainer.callback_handler.callbacks:
        bar = getattr(cb, "training_bar", None)
        if bar is not None:
            bar.close()
            cb.training_bar = None
