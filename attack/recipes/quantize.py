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

import time
from pathlib import Path

from attack.config import AdapterConfig, QuantizeConfig
from attack.model import load_model, save_model
from attack.quantization import quantize_model
from attack.recipes import common
from attack.tracking import finish_tracker


def run(cfg: QuantizeConfig, extra_callbacks: list | None = None, quiet: bool = False,
        cell: dict | None = None, progress: bool | None = None) -> Path:
    # 1. Setup: fp32 weights, so that the rounding is the method's alone.
    a = common.setup(cfg, extra_callbacks, quiet, cell, progress)
    model = load_model(cfg.model, AdapterConfig(kind="full")).to(common.device())
    evaluator, task_info = common.evaluator(a, model)

    # 2. Open the run directory (a resumed run measures both points again: they take minutes).
    common.open_run(a, task_info)
    if not a.main:  # one process scores; under `accelerate launch` the others have nothing to do
        a.procs.wait_for_everyone()
        return a.run.path
    curve = common.edit_curve(a, evaluator)
    try:
        # 3-5. The unmodified model, the quantization, the quantized model.
        curve.record(0, 0)
        start = time.perf_counter()
        model, done = quantize_model(model, cfg.quantize.method)
        quantize_s = time.perf_counter() - start
        a.say(f"{done['method']}: {done['weights']} weight tensors, relative change {done['relative_change']} "
              f"({done['backend']})")
        curve.record(1, 0)
        if cfg.quantize.save_weights:  # the weights the scores belong to, as an ordinary model folder
            save_model(model, a.tokenizer, a.run.final)
    except BaseException as e:
        common.ended_early(a, e)
        raise
    finally:
        finish_tracker(cfg.logging)
        a.procs.wait_for_everyone()
    return common.finish(a, evaluator, common.edit_summary(a, curve, quantize_s), quantize=done)
