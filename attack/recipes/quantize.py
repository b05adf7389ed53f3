"""Quantization (kind: quantize): score the model under test, store its weights in a lower
precision (4-bit NF4, 8-bit, fp16 or bf16; attack/quantization.py), score it again.

    1. setup     the model in fp32, the evaluation tasks; no run files
    2. open      the run directory
    3. step 0    the unmodified model
    4. quantize  every linear weight but the head rounded to its nearest level (nf4, int8), or
                 the whole model cast (fp16, bf16)
    5. step 1    the quantized model -> summary.json (method, backend, relative weight change),
                 and its weights in final/ (unless quantize.save_weights is false)

Nothing trains, so the curve has the two points of an ablation, on the same step axis.
"""

from __future__ import annotations

from pathlib import Path

from attack.config import AdapterConfig, QuantizeConfig
from attack.model import load_model, save_model
from attack.quantization import quantize_model
from attack.recipes import common


def run(cfg: QuantizeConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    # 1. Setup: fp32 weights, so that the rounding is the method's alone.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    model = load_model(cfg.model, AdapterConfig(kind="full")).to(common.device())
    evaluator, task_info = common.evaluator(a, model)

    # 2. Open the run directory (a resumed run measures both points again: they take minutes).
    common.open_run(a, task_info)
    with common.edit_run(a, evaluator) as edit:
        if a.main:  # one process scores; under `accelerate launch` the others have nothing to do
            edit.before()  # 3-5. the unmodified model, the quantization, the quantized model
            model, done = quantize_model(model, cfg.quantize.method)
            a.say(f"{done['method']}: {done['weights']} weight tensors, relative change {done['relative_change']} "
                  f"({done['backend']})")
            edit.after()
            if cfg.quantize.save_weights:  # the weights the scores belong to, as an ordinary model folder
                save_model(model, a.tokenizer, a.run.final)
    if not a.main:
        return a.run.path
    return common.finish(a, evaluator, edit.summary(), quantize=done)
