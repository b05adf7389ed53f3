"""Evaluation during training: lm-eval tasks on the live model at scheduled steps.

Usable with any transformers Trainer, without the `attack` package:

    from eval_callbacks import LiveEvaluator, RecoveryCurveCallback, linear_schedule
    evaluator = LiveEvaluator(model, tokenizer, ["my_task"], include_path=["tasks/"])
    trainer.add_callback(RecoveryCurveCallback(evaluator, linear_schedule(1000, 100), "curve.jsonl"))
"""

from importlib import import_module

# name -> its module, imported on first use: the evaluator and the callback load torch, transformers
# and lm-eval, which a caller of the light modules (files, schedule) does not need
_WHERE = {
    "CurveRow": "callback", "NonFiniteLossError": "callback", "RecoveryCurveCallback": "callback",
    "read_samples": "callback", "samples_file": "callback", "LiveEvaluator": "runner",
    "linear_schedule": "schedule", "log_schedule": "schedule", "TaskDataError": "task_lookup",
    "UnknownTaskError": "task_lookup", "find_tasks": "task_lookup", "local_datasets": "task_lookup",
    "task_questions": "task_lookup",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'eval_callbacks' has no attribute {name!r}")
    return getattr(import_module(f"eval_callbacks.{_WHERE[name]}"), name)
