"""Evaluation during training: lm-eval tasks on the live model at scheduled steps.

Usable with any transformers Trainer, without the `attack` package:

    from eval_callbacks import LiveEvaluator, RecoveryCurveCallback, linear_schedule
    evaluator = LiveEvaluator(model, tokenizer, ["my_task"], include_path=["tasks/"])
    trainer.add_callback(RecoveryCurveCallback(evaluator, linear_schedule(1000, 100), "curve.jsonl"))
"""

from eval_callbacks.callback import CurveRow, NonFiniteLossError, RecoveryCurveCallback, read_samples, samples_file
from eval_callbacks.runner import LiveEvaluator
from eval_callbacks.schedule import linear_schedule, log_schedule
from eval_callbacks.task_lookup import TaskDataError, UnknownTaskError, find_tasks, local_datasets, task_questions

__all__ = [
    "CurveRow",
    "LiveEvaluator",
    "NonFiniteLossError",
    "RecoveryCurveCallback",
    "TaskDataError",
    "UnknownTaskError",
    "find_tasks",
    "read_samples",
    "samples_file",
    "local_datasets",
    "linear_schedule",
    "log_schedule",
    "task_questions",
]
