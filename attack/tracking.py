"""Experiment trackers (wandb, tensorboard) and the terminal while an attack runs."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from attack.config import LoggingConfig
from attack.errors import UserError
from eval_callbacks.task_lookup import headline_metric


def check_tracker(cfg: LoggingConfig) -> None:
    """Checked before the run directory opens: a tracker that is asked for must be installed
    (`open_tracker` starts it, with the project name, once the run directory exists)."""
    if cfg.report_to == "none":
        return
    if importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to} needs {cfg.report_to}: pip install {cfg.report_to}")


def open_tracker(cfg, run_dir) -> None:
    """Start the tracker's run with the attack's whole config, its files inside the run directory
    (unless WANDB_DIR says otherwise). The Trainer's own integration then logs into this run."""
    if cfg.logging.report_to != "wandb":
        return
    import wandb

    from attack.config import to_dict

    wandb.init(project=cfg.logging.project, name=run_dir.name, dir=os.environ.get("WANDB_DIR", str(run_dir)),
               config={"attack_config": to_dict(cfg)})


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


class Bar(ProgressCallback):
    """The Trainer's progress bar without its raw log dicts; `ProgressLines` prints clean ones."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class ProgressLines(TrainerCallback):
    """One line per evaluation point (step, elapsed, ETA, the scores of the tasks asked for) and
    per logged loss, then "done in N s": what a terminal or a sweep's log shows while it runs."""

    def __init__(self, curve, max_steps: int, tasks: dict, show_loss: bool):
        self.curve, self.max_steps, self.show_loss = curve, max_steps, show_loss
        # the tasks asked for, each on its headline metric
        self.headline = {t: headline_metric(i) for t, i in tasks.items() if i.get("requested", True)}
        self.start, self.first_step = None, 0

    def _say(self, text: str) -> None:
        tqdm.write(text, file=sys.stdout)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step
        self._report(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._report(state)

    def _report(self, state) -> None:
        step, rows = state.global_step, self.curve.last_rows
        if not rows or rows[0]["step"] != step + self.curve.step_offset or not state.is_world_process_zero:
            return
        scores = "  ".join(f"{r['task']} {r['value']:.3f}" for r in rows
                           if self.headline.get(r["task"]) == r["metric"])
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        eta = f", eta {elapsed / done * (self.max_steps - step):.0f} s" if done else ""
        self._say(f"  step {step}/{self.max_steps} ({elapsed:.0f} s{eta})  {scores}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.show_loss and logs and "loss" in logs and state.is_world_process_zero:
            shown = ("reward", "frac_reward_zero_std", "learning_rate", "grad_norm")  # reward: GRPO's
            extra = "".join(f", {k.replace('_', ' ')} {logs[k]:.3g}" for k in shown if logs.get(k) is not None)
            self._say(f"  step {state.global_step}: loss {logs['loss']:.4f}{extra}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._say(f"  done in {time.perf_counter() - self.start:.0f} s")

