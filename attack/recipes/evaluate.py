"""No attack (kind: evaluate): the model scored as it is, step 0 alone.

    1. setup     the model as configured, the evaluation tasks; no run files
    2. open      the run directory
    3. step 0    the model as loaded -> summary.json

A sweep's reference model needs nothing else: the report reads only its pre-attack score, and
an attack on it (a quantization) would cost a second evaluation point that no table reads.
"""

from __future__ import annotations

from pathlib import Path

from attack.config import AdapterConfig, EvaluateConfig
from attack.model import load_model
from attack.recipes import common


def run(cfg: EvaluateConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    # 1. Setup: fp32 weights, as the edit kinds and full fine-tuning load them (evaluation runs
    # under the configured precision's autocast), so a sweep's attacks share this step 0.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    model = load_model(cfg.model, AdapterConfig(kind="full")).to(common.device())
    evaluator, task_info = common.evaluator(a, model)

    # 2-3. Open the run directory and score the model (a resumed run scores it again).
    common.open_run(a, task_info)
    with common.edit_run(a, evaluator) as edit:
        if a.main:  # one process scores; under `accelerate launch` the others have nothing to do
            edit.before()
    if not a.main:
        return a.run.path
    return common.finish(a, evaluator, edit.summary())
