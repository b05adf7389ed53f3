"""Check an attack's step-0 point against published pre-attack scores.

A step-0 score far from the paper's says the measurement differs (prompt, split, BOS handling,
checkpoint), not the model: every later point of the curve inherits that difference. The
tolerance is two binomial standard errors of the published score on the task's question count
(for 868 questions near 43%: 3.4 points), the spread two correct setups may show.
"""

from __future__ import annotations

import math
import sys

from transformers import TrainerCallback

from attack.records import read_curve
from eval_callbacks.task_lookup import headline_metric

Z = 2.0


def as_fraction(value: float) -> float:
    """Published scores come in percent (42.97) or as fractions (0.4297)."""
    return value / 100 if value > 1 else value


def check_published(expect: dict[str, float], step0: list[dict], tasks: dict[str, dict]) -> list[dict]:
    """One record per expected task: published, measured, difference, tolerance, ok."""
    checks = []
    for task, value in expect.items():
        published = as_fraction(float(value))
        info = tasks.get(task) or {}
        metric = headline_metric(info)
        measured = next((r["value"] for r in step0 if r["task"] == task and r["metric"] == metric), None)
        n = info.get("n") or 0
        tolerance = Z * math.sqrt(published * (1 - published) / n) if n else float("nan")
        diff = None if measured is None else measured - published
        ok = diff is not None and abs(diff) <= tolerance
        checks.append(dict(task=task, metric=metric, published=published, measured=measured, difference=diff,
                           tolerance=tolerance, n=n, ok=ok))
    return checks


def mismatch_message(c: dict) -> str:
    if c["measured"] is None:
        return f"{c['task']}: no step-0 {c['metric']} to compare with the published {100 * c['published']:.2f}"
    return (f"{c['task']}: step 0 {c['metric']} is {100 * c['measured']:.2f}, {100 * abs(c['difference']):.1f} points "
            f"from the published {100 * c['published']:.2f} (tolerance {100 * c['tolerance']:.1f} points for "
            f"{c['n']} questions): prompt, split, BOS or checkpoint differ")


class PublishedScoreCheck(TrainerCallback):
    """After the step-0 evaluation (the curve callback runs first), compare it with the published
    scores; a mismatch is a loud warning in the terminal and in summary.json."""

    def __init__(self, expect: dict[str, float], run, tasks: dict):
        self.expect, self.run, self.tasks = expect, run, tasks

    def on_train_begin(self, args, state, control, **kwargs):
        step0 = [r for r in read_curve(self.run.curve) if r["step"] == 0]
        checks = check_published(self.expect, step0, self.tasks)
        warnings = [mismatch_message(c) for c in checks if not c["ok"]]
        self.run.write_summary(published_checks=checks, warnings=warnings)
        for w in warnings:
            print(f"\n*** WARNING: {w} ***", file=sys.stderr, flush=True)
